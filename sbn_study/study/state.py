"""What a study leaves under `--output` for `--resume`: `studies/<name>.json`, one small file per study name;
the lock that keeps a second driver off a study while one runs it; and the MLflow writes saved beside them
(`<name>.unsent.jsonl`) when the store did not take them, sent again from here."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from sbn_study.durable import replace_file
from sbn_study.errors import UserError, one_line
from sbn_study.store.uri import check_reachable, redact_uri, use_server_credentials
from sbn_study.store.writer import RecordHandle

StudyStatus = Literal["running", "interrupted", "finished"]

# What a resumed execution may state otherwise than the one it continues: where its record is (the state names
# its store, which is compared on its own) and where Tune keeps its state (the state names that folder).
# Everything else of the resolved spec decides what its trials are, how many, and how they are sampled.
NOT_TRIAL_DEFINING = ("tracking", "storage")


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


@contextlib.contextmanager
def hold_study(output: Path, name: str) -> Iterator[Path]:
    """Holds `<output>/studies/<name>.lock` while a study runs (yielding the prepared output folder): a second
    driver of the same study and output would share its state file, Tune's folder and its runs, and race the
    first on MLflow's tables. UserError, naming the holder's pid, when another process holds it."""
    from filelock import FileLock, Timeout

    output = prepare_output(output)
    folder = output / "studies"
    folder.mkdir(exist_ok=True)
    lock, owner = FileLock(folder / f"{name}.lock"), folder / f"{name}.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        pid = _read_pid(owner)
        raise UserError(f"study '{name}' is running in {output}{f' (pid {pid})' if pid else ''}") from None
    try:
        with contextlib.suppress(OSError):  # the pid only names the holder; a full disk must not refuse
            owner.write_text(f"{os.getpid()}\n")
        yield output
    finally:
        owner.unlink(missing_ok=True)
        lock.release()


def _read_pid(path: Path) -> str | None:
    try:
        pid = path.read_text().strip()
    except OSError:  # the holder has not written it yet
        return None
    return pid if pid.isdigit() else None


@dataclass
class StudyState:
    status: StudyStatus
    parent_run_id: str
    experiment_id: str
    tune_path: str  # Tune's experiment folder: <storage>/<name>-<timestamp>
    tracking_uri: str  # without credentials
    # The resolved spec the execution started with (`model_dump(mode="json")`, without credentials): what a
    # resume compares its own with. None in a state an older sbn-study wrote.
    spec: dict[str, Any] | None = None
    # The sampler's Optuna study: its database (without credentials) and name. None in an older state.
    optuna_storage: str | None = None
    optuna_study: str | None = None
    # The trial ids of the executions a larger num_samples extended (`--resume` of a finished study): their
    # runs are the parent run's, their Tune trials another Tune experiment's.
    earlier_trials: list[str] | None = None
    # The parent run's progress metrics at the end of those executions (`TrackingCallback` adds this one's).
    earlier_progress: dict[str, float] | None = None
    # Set when an execution ends.
    unsent_writes: int | None = None
    unsent_path: str | None = None

    @classmethod
    def load(cls, path: Path) -> StudyState | None:
        """The state saved in `path`, None when there is none; UserError when the file cannot be read back."""
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:  # ValueError: cut short, not JSON, not text
            raise _damaged(path, exc) from None
        try:
            state = cls(**fields)
        except TypeError as exc:  # not an object, or not the fields of one
            raise _damaged(path, exc) from None
        if state.status not in get_args(StudyStatus):
            raise _damaged(path, ValueError(f"unknown status {state.status!r}"))
        return state

    def save(self, path: Path) -> None:
        """Replaces the file at once: a driver killed mid-write, or a disk that fills, leaves the old state,
        never a broken one. UserError when it cannot be written."""
        fields: dict[str, Any] = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, json.dumps(fields, indent=2).encode())
        except OSError as exc:
            raise UserError(
                f"--output: cannot save the study's state to {path} ({exc.strerror or exc}); it keeps the state "
                "saved before: free space (or make it writable) and continue with --resume"
            ) from None

    @property
    def tune_storage_and_name(self) -> tuple[str, str]:
        storage, name = self.tune_path.rstrip("/").rsplit("/", 1)
        return storage, name


def send_saved_writes(uri: str, state: StudyState, unsent: Path) -> int:
    """Sends the MLflow writes that `state`'s execution saved to `unsent` (the store did not take them then),
    in order; returns how many. UserError when the store does not take them now: they stay in the file."""
    writer = RecordHandle(uri, state.experiment_id, state.parent_run_id, unsent).writer()
    try:
        return writer.send_saved()
    except Exception as exc:
        raise UserError(
            f"the MLflow store {redact_uri(uri)} did not take the writes saved in {unsent} ({one_line(exc)}); "
            "they stay there: send them with `sbn-study replay` once it does"
        ) from None
    finally:
        writer.close()


def replay(output: Path, name: str, tracking_uri: str | None) -> str:
    """`sbn-study replay`: sends the saved writes of study `name` in `output` to the store its state names
    (`tracking_uri` may give that store with credentials); the line that says what was done."""
    with hold_study(output, name) as output:
        state, unsent = StudyState.load(state_path(output, name)), unsent_path(output, name)
        if state is None or not unsent.exists():
            return f"study '{name}' has no saved MLflow writes in {output}"
        uri = use_server_credentials(tracking_uri or state.tracking_uri)
        if redact_uri(uri) != state.tracking_uri:
            raise UserError(
                f"--tracking-uri: study '{name}' is recorded in {state.tracking_uri}, not in {redact_uri(uri)}"
            )
        check_reachable(uri)
        sent = send_saved_writes(uri, state, unsent)
        return f"sent {sent} saved MLflow writes of study '{name}' to {state.tracking_uri}"


def _damaged(path: Path, exc: BaseException) -> UserError:
    return UserError(
        f"the study's state file {path} is damaged ({one_line(exc)}): restore it to continue the study with "
        "--resume, or delete it (or give the study another name) to start a new execution"
    )


def changed_keys(started: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The keys of two resolved specs (`model_dump(mode="json")`) whose values differ, dotted, but those that
    define no trial (`NOT_TRIAL_DEFINING`); a searched key's distribution counts as one value. A setting only
    one of them has (one that another version of sbn-study added or dropped) counts as searched keys only."""
    before, after = _leaves(started), _leaves(now)
    return sorted(
        key
        for key in before.keys() | after.keys()
        if key.split(".")[0] not in NOT_TRIAL_DEFINING
        and (key in before.keys() & after.keys() or key.startswith("search.space."))
        and before.get(key, ...) != after.get(key, ...)
    )


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and prefix != "search.space.":
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
