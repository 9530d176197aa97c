"""What a study leaves under `--output` for `--resume`: `studies/<name>.json`, one small file per study name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sbn_study.errors import UserError

StudyStatus = Literal["running", "interrupted", "finished"]


def prepare_output(output: Path) -> Path:
    """The output folder, absolute and created; UserError when it cannot be written."""
    output = output.expanduser().resolve()
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"--output: cannot write to {output} ({exc.strerror or exc})") from None
    return output


def state_path(output: Path, name: str) -> Path:
    return output / "studies" / f"{name}.json"


def unsent_path(output: Path, name: str) -> Path:
    """Where the study's MLflow writes that the store never took are saved."""
    return output / "studies" / f"{name}.unsent.jsonl"


@dataclass
class StudyState:
    status: StudyStatus
    parent_run_id: str
    experiment_id: str
    tune_path: str  # Tune's experiment folder: <storage>/<name>-<timestamp>
    tracking_uri: str  # without credentials
    # Set when an execution ends.
    unsent_writes: int | None = None
    unsent_path: str | None = None

    @classmethod
    def load(cls, path: Path) -> StudyState | None:
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, path: Path) -> None:
        """Replaces the file at once: a driver killed mid-write leaves the old state, never a broken one."""
        fields: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp")  # same folder: the rename cannot cross file systems
        temporary.write_text(json.dumps(fields, indent=2))
        temporary.replace(path)

    @property
    def tune_storage_and_name(self) -> tuple[str, str]:
        storage, name = self.tune_path.rstrip("/").rsplit("/", 1)
        return storage, name
