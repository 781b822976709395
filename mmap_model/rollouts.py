"""Rollout records: a candidate prompt set on live traffic beside the task's live set, declared in the prompt directory.

`<prompts>/_rollouts/<task>.json` names the task, the candidate (a prompt-set directory of the same prompt directory)
and a mode: `canary` (the candidate answers `share` % of the task's requests), `shadow` (it also scores `share` %
of them; the caller gets the live answer) or `aborted` (it gets no traffic). While a record names it, the candidate
never takes the task, however new its publication; the live version is the newest publication of the task among
the other sets. A record is written whole (temporary file, then one rename), so every HTTP worker, every pod and
every Ray replica reading the directory follows the same state. `training.publish` and the admin API write records;
the service reads them (docs/architecture.md, "Rollouts").

Promotion bumps the candidate's publication (its promptset.json's mtime: the newest publication serves a task) and
removes the record; abort rewrites the record as `aborted`, so the candidate stays out of the task until the next
rollout of it replaces the record or the candidate is removed.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from .prompts import NAME_PATTERN, check_name
from .promptset import CONFIG_FILE, _write_durably

ROLLOUTS_DIR = "_rollouts"  # '_'-prefixed: never taken for a prompt set
MAX_RECORD_BYTES = 64 << 10
MODES = ("canary", "shadow", "aborted")
Mode = Literal["canary", "shadow", "aborted"]
_FIELDS = {"task", "candidate", "mode", "share", "abort_below", "min_requests", "reason", "updated"}


class RolloutError(ValueError):
    """A rollout record that cannot be used, or an operation on rollouts that is refused; the message says why."""


class NoRollout(RolloutError):
    """The task has no rollout record."""


@dataclass(frozen=True)
class Rollout:
    task: str
    candidate: str  # a prompt-set directory name
    mode: Mode
    share: float = 100.0  # % of the task's requests the candidate answers (canary) or also scores (shadow)
    abort_below: float | None = None  # shadow: abort when top-1 agreement with the live answer falls below this...
    min_requests: int = 200  # ...once this many requests were compared
    reason: str | None = None  # why it was aborted
    updated: str = ""  # UTC, ISO 8601: when the record was written

    def to_json(self) -> bytes:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2).encode()


def rollout(task: str, candidate: str, mode: str, share: float = 100.0, abort_below: float | None = None,
            min_requests: int = 200, reason: str | None = None) -> Rollout:
    """A checked record (RolloutError says what is wrong), stamped now."""
    return check(Rollout(task, candidate, mode, share, abort_below, min_requests, reason,  # type: ignore[arg-type]
                         time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))


def check(record: Rollout) -> Rollout:
    for what, name in (("task", record.task), ("candidate", record.candidate)):
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise RolloutError(f"{what} {name!r} is not a name: 1-64 letters, digits, '_' or '-'")
    if record.mode not in MODES:
        raise RolloutError(f"mode {record.mode!r}: one of {', '.join(MODES)}")
    if not _number(record.share) or not 0 < record.share <= 100:
        raise RolloutError(f"share {record.share!r}: a percentage above 0 and at most 100")
    if record.abort_below is not None and (not _number(record.abort_below) or not 0 <= record.abort_below <= 1):
        raise RolloutError(f"abort_below {record.abort_below!r}: a top-1 agreement from 0 to 1")
    if record.abort_below is not None and record.mode == "canary":
        raise RolloutError("abort_below needs mode shadow: only a shadow compares the candidate with the live answer")
    if isinstance(record.min_requests, bool) or not isinstance(record.min_requests, int) or record.min_requests < 1:
        raise RolloutError(f"min_requests {record.min_requests!r}: an integer of at least 1")
    if record.reason is not None and not isinstance(record.reason, str):
        raise RolloutError("reason: a string")
    return record


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse(blob: bytes, task: str) -> Rollout:
    """The record of `<task>.json`; RolloutError naming what is wrong."""
    try:
        data = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RolloutError(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise RolloutError("not a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    missing = sorted({"task", "candidate", "mode"} - set(data))
    if unknown or missing:
        raise RolloutError("; ".join([*([f"unknown fields {unknown}"] if unknown else []),
                                      *([f"missing fields {missing}"] if missing else [])]))
    if data["task"] != task:
        raise RolloutError(f"names task {data['task']!r}, but the file is {task}.json")
    return check(Rollout(**data))


def directory_of(prompts: Path) -> Path:
    return Path(prompts) / ROLLOUTS_DIR


def signature(prompts: Path) -> tuple[tuple[str, int, int], ...]:
    """What changes whenever a record is written or removed (file names, mtimes, sizes): cheap to poll."""
    try:
        with os.scandir(directory_of(prompts)) as entries:
            found = []
            for e in entries:
                if e.name.endswith(".json") and not e.name.startswith("."):
                    try:
                        st = e.stat()
                    except OSError:  # removed between the listing and the stat
                        continue
                    found.append((e.name, st.st_mtime_ns, st.st_size))
            return tuple(sorted(found))
    except OSError:  # no _rollouts directory: no rollouts
        return ()


def read_all(prompts: Path) -> tuple[dict[str, Rollout], dict[str, str]]:
    """Every record of the prompt directory, and why each of the others cannot be used ({task: reason})."""
    records: dict[str, Rollout] = {}
    errors: dict[str, str] = {}
    for name, _, size in signature(prompts):
        task = name[:-len(".json")]
        path = directory_of(prompts) / name
        try:
            if not NAME_PATTERN.fullmatch(task):
                raise RolloutError("the file name is not <task>.json")
            if size > MAX_RECORD_BYTES:
                raise RolloutError(f"{size} bytes: a record is at most {MAX_RECORD_BYTES}")
            records[task] = parse(path.read_bytes(), task)
        except (RolloutError, OSError) as e:
            errors[task] = f"{path}: {e}"
    return records, errors


def write(prompts: Path, record: Rollout) -> Path:
    """Write (or replace) the task's record in one rename."""
    check(record)
    folder = directory_of(prompts)
    folder.mkdir(exist_ok=True)
    path = folder / f"{record.task}.json"
    _write_durably(path, record.to_json())
    return path


def read(prompts: Path, task: str) -> Rollout:
    path = directory_of(prompts) / f"{check_name(task)}.json"
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise NoRollout(f"task {task!r} has no rollout in {prompts}") from None
    return parse(blob, task)


def start(prompts: Path, task: str, candidate: str, mode: str, share: float = 100.0,
          abort_below: float | None = None, min_requests: int = 200) -> Rollout:
    """Declare `candidate` for `task` (replacing the task's record, if any); the candidate's directory need not
    exist yet: publish the record first, then the set, and the set never takes the task."""
    if mode == "aborted":
        raise RolloutError("a rollout starts as canary or shadow")
    record = rollout(task, candidate, mode, share, abort_below, min_requests)
    write(prompts, record)
    return record


def abort(prompts: Path, task: str, reason: str = "by hand") -> Rollout:
    """The candidate gets no more traffic for the task and stays out of it."""
    record = read(prompts, task)
    aborted = rollout(task, record.candidate, "aborted", record.share, record.abort_below, record.min_requests, reason)
    write(prompts, aborted)
    return aborted


def promote(prompts: Path, task: str) -> Rollout:
    """The candidate takes the task: its publication becomes the newest, then the record goes."""
    record = read(prompts, task)
    if record.mode == "aborted":
        raise RolloutError(f"the rollout of {task!r} was aborted ({record.reason}); start a new one to promote")
    config = Path(prompts) / record.candidate / CONFIG_FILE
    if not config.is_file():
        raise RolloutError(f"candidate {record.candidate!r} is not a prompt set in {prompts}")
    now = time.time_ns()
    os.utime(config, ns=(now, max(now, config.stat().st_mtime_ns + 1)))
    (directory_of(prompts) / f"{task}.json").unlink()
    return record
