"""Trials sharing one GPU (`resources.gpu: 0.25` packs four on a card): images/s of one ResNet-18 SBN34 training
process alone and of four at once, and the GPU memory each one holds — what a spec's fractional `gpu` must
leave room for (Ray does not split GPU memory).

Each trial is its own process, as under Ray: batch 128, channels_last, bf16 autocast (what `train()` does on
CUDA), the model's training step only (the data pipeline is measured by the `data` benchmark). All processes
of a setting warm up, wait for each other (a file per process in a shared folder), then start timing
together; the throughput of a setting is all the images they trained over the span from the first start to
the last finish.

Without a GPU the full run reports nothing (the figure is about GPUs); `--quick` runs the same processes on
the CPU with a small batch, one and two at once, to check the machinery.

Run: `python -m benchmarks gpu_share` from the repository root.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAME = "gpu_share"
TARGET = "images/s of 1 and of 4 trials sharing a GPU, and GPU memory per trial (figures, no target)"

REPO = Path(__file__).resolve().parents[1]
RESULT_MARKER = "GPU-SHARE "
SETUP_TIMEOUT_S = 300.0  # for every process to start and warm up


def _wait_for_all(barrier: Path, processes: int) -> None:
    (barrier / f"ready-{len(list(barrier.iterdir()))}-{time.time_ns()}").touch()
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    while len(list(barrier.iterdir())) < processes:
        if time.monotonic() > deadline:
            raise TimeoutError("the other processes never got ready")
        time.sleep(0.005)


def _child(device_name: str, batch: int, steps: int, barrier: Path, processes: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from sbn_study.spec.config import TrainConfig, TrialConfig
    from sbn_study.trial.models import create_model
    from sbn_study.trial.train import make_optimizer

    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    if not on_cuda:
        torch.set_num_threads(1)  # as a `resources.cpu: 1` trial
    model = create_model("resnet18", 100, norm="sbn", placement="34").to(device)
    memory_format = torch.channels_last if on_cuda else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = make_optimizer(model, TrialConfig(train=TrainConfig(lr=0.1)))
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=memory_format)
    y = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    _wait_for_all(barrier, processes)
    start = time.time()
    for _ in range(steps):
        step()
    if on_cuda:
        torch.cuda.synchronize()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan")
    return {"start": start, "end": time.time(), "images": batch * steps, "memory_gib": memory}


def _setting(processes: int, device: str, batch: int, steps: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as barrier:
        command = [sys.executable, "-m", "benchmarks.gpu_share", "--child", device, str(batch), str(steps)]
        children = [
            subprocess.Popen(
                [*command, barrier, str(processes)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(processes)
        ]
        outputs = [child.communicate(timeout=SETUP_TIMEOUT_S + 600) for child in children]
    results = []
    for child, (out, err) in zip(children, outputs, strict=True):
        lines = [line for line in out.splitlines() if line.startswith(RESULT_MARKER)]
        if child.returncode != 0 or not lines:
            raise RuntimeError(f"a gpu_share process failed (exit {child.returncode}):\n{err[-3000:]}")
        results.append(json.loads(lines[-1][len(RESULT_MARKER) :]))
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    total = sum(r["images"] for r in results)
    return {
        "trials at once": processes,
        "device": device,
        "batch": batch,
        "images/s (all)": round(total / span, 1),
        "images/s per trial": round(total / span / processes, 1),
        "GiB per trial (max allocated)": "-"
        if device == "cpu"
        else round(max(r["memory_gib"] for r in results), 2),
    }


def run(quick: bool = False) -> list[dict[str, object]]:
    import torch

    if torch.cuda.is_available():
        device, batch, steps, settings = "cuda", 128, 10 if quick else 100, (1, 4)
    elif quick:
        device, batch, steps, settings = "cpu", 8, 2, (1, 2)
    else:
        return [{"trials at once": "-", "device": "cpu", "note": "no CUDA device: nothing to share"}]
    rows = [_setting(n, device, batch, steps) for n in settings]
    alone = float(str(rows[0]["images/s (all)"]))
    for row in rows:
        row["× one trial alone"] = round(float(str(row["images/s (all)"])) / alone, 2)
    return rows


def verdict(rows: list[dict[str, object]]) -> str:
    if rows[0]["trials at once"] == "-":
        return "not measured: no CUDA device"
    most = rows[-1]
    text = (
        f"{most['trials at once']} trials at once: {most['images/s (all)']} images/s in all, "
        f"{most['× one trial alone']}× one trial alone ({rows[0]['images/s (all)']} images/s)"
    )
    if most["device"] == "cuda":
        text += f"; at most {most['GiB per trial (max allocated)']} GiB of GPU memory per trial"
    return f"figure only (no target): {text}"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        device_name, batch_text, steps_text, barrier_text, processes_text = sys.argv[2:7]
        result = _child(
            device_name, int(batch_text), int(steps_text), Path(barrier_text), int(processes_text)
        )
        print(RESULT_MARKER + json.dumps(result))
    else:
        from benchmarks.__main__ import markdown_table

        table = run("--quick" in sys.argv[1:])
        print(f"{NAME} (target: {TARGET})\n{markdown_table(table)}\n{verdict(table)}")
