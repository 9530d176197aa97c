"""What a trial costs the machine it runs on, measured once per epoch (`system/...` result keys), so that
packing several trials on one node or one GPU can be judged from their runs.

Measured in the trial process itself: the driver, the one MLflow writer, cannot see a trial's process or
GPU, and MLflow's own system-metrics thread would need a run of its own in the trial. Each `sample()` costs
a few system calls (no GPU synchronisation), against an epoch of seconds.

- `system/cpu_percent`: this process's CPU time over the epoch, in percent of one core (200 = two cores).
- `system/host_cpu_percent`, `system/host_memory_percent`: the whole machine's, over the epoch and now.
- `system/rss_mb`: this process's resident memory now.
- On CUDA, `system/gpu_memory_allocated_mb` (this trial's tensors now), `system/gpu_memory_peak_reserved_mb`
  (the most its caching allocator held during the epoch: what another trial could not have),
  `system/gpu_memory_used_mb` (the whole device's, every process included), and, where NVML answers
  (`nvidia-ml-py` installed), `system/gpu_utilization_percent`: NVML's share of the last sample period
  (≤ 1 s) in which a kernel ran, read at the epoch's end: a sample, not the epoch's mean.
"""

from __future__ import annotations

import torch

from sbn_study.protocol import SYSTEM_PREFIX

_MB = 2**20


class SystemSampler:
    """Samples at every `sample()` what the epoch since the previous one (or since construction) cost."""

    def __init__(self, device: torch.device) -> None:
        import psutil

        self._psutil = psutil
        self._process = psutil.Process()
        # cpu_percent measures since its previous call: these first calls start the first epoch's interval.
        self._process.cpu_percent(None)
        psutil.cpu_percent(None)
        self._cuda = device if device.type == "cuda" else None
        self._nvml = self._cuda is not None and _nvml_answers(self._cuda)
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)

    def sample(self) -> dict[str, float]:
        values = {
            "cpu_percent": self._process.cpu_percent(None),
            "host_cpu_percent": self._psutil.cpu_percent(None),
            "rss_mb": self._process.memory_info().rss / _MB,
            "host_memory_percent": self._psutil.virtual_memory().percent,
        }
        if self._cuda is not None:
            free, total = torch.cuda.mem_get_info(self._cuda)
            values["gpu_memory_allocated_mb"] = torch.cuda.memory_allocated(self._cuda) / _MB
            values["gpu_memory_peak_reserved_mb"] = torch.cuda.max_memory_reserved(self._cuda) / _MB
            values["gpu_memory_used_mb"] = (total - free) / _MB
            torch.cuda.reset_peak_memory_stats(self._cuda)
            if self._nvml:
                values["gpu_utilization_percent"] = torch.cuda.utilization(self._cuda)
        return {f"{SYSTEM_PREFIX}{name}": float(value) for name, value in values.items()}


def _nvml_answers(device: torch.device) -> bool:
    # torch reads utilisation through NVML (the nvidia-ml-py package), which torch does not require.
    try:
        torch.cuda.utilization(device)
    except Exception:  # ModuleNotFoundError without the package, pynvml's NVMLError without a driver's NVML
        return False
    return True
