"""The engine's operations off the hot path: the admin API's prompt-set listing, load and unload, rollouts, and
sample files. They run on the engine's loader thread (and in the Ray engine deployment), never in the
batching loop; a refusal is a `CallRefused` with the HTTP status the worker answers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from mmap_model import PromptSetError, rollouts
from mmap_model.prompts import check_name
from mmap_model.promptset import read_file_within
from mmap_model.rollouts import NoRollout, Rollout, RolloutError
from service.schema import ErrorCode, PromptSetListing, RolloutListing, RolloutRequest
from service.transport import (
    EndRollout,
    GetSample,
    ListRollouts,
    ListSets,
    LoadSet,
    Operation,
    Reply,
    Sample,
    StartRollout,
    UnloadSet,
)

from .registry import Registry
from .rollouts import Evidence
from .sets import MAX_SAMPLE_BYTES, SAMPLE_TYPES

log = logging.getLogger(__name__)


class CallRefused(Exception):
    """An operation refused with an HTTP status (the worker answers it as is)."""

    def __init__(self, status: int, error: ErrorCode, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error

    def reply(self, request: int) -> Reply:
        return Reply(request, self.status, error=self.error, detail=str(self))


def _named(*names: str) -> None:
    """Prompt-set and task names as the directory takes them (422 `invalid_name` otherwise)."""
    try:
        for name in names:
            check_name(name)
    except ValueError as e:
        raise CallRefused(422, "invalid_name", str(e)) from e


class Operations:
    """Runs one `Operation` against the registry and answers it as a `Reply`."""

    def __init__(self, registry: Registry, evidence: Evidence):
        self.registry = registry
        self.evidence = evidence

    def run(self, request: int, op: Operation) -> Reply:
        """The answer to `op` (CallRefused when refused); reads files, so not on the batching loop."""
        match op:
            case ListSets():
                return Reply(request, 200, listing=self.listing())
            case LoadSet(name):
                return Reply(request, 200, listing=self._load(name))
            case UnloadSet(name):
                if not self.registry.unload(name):
                    raise CallRefused(404, "not_loaded", f"prompt set {name!r} is not loaded")
                return Reply(request, 200, listing=self.listing())
            case GetSample(task, filename):
                return Reply(request, 200, sample=self._sample(task, filename))
            case ListRollouts(task):
                return Reply(request, 200, rollouts=self.rollouts(task))
            case StartRollout(task, wanted):
                self._start(task, wanted)
                return Reply(request, 200, rollouts=self.rollouts(task, required=False))
            case EndRollout(task, action):
                self._end(task, action)
                return Reply(request, 200, rollouts=self.rollouts(task, required=False))
        raise CallRefused(400, "unknown_operation", f"unknown operation {type(op).__name__}")

    def listing(self) -> PromptSetListing:
        return PromptSetListing(str(self.registry.directory), self.registry.directory_error, self.registry.status())

    def _load(self, name: str) -> PromptSetListing:
        _named(name)
        if not (self.registry.directory / name).is_dir():
            raise CallRefused(404, "not_found", f"no prompt-set directory {name!r} in {self.registry.directory}")
        try:
            self.registry.load(name)
        except PromptSetError as e:
            serving = self.registry.snapshot.sets.get(name)
            keeps = f"; version {serving.version} keeps serving" if serving else ""
            raise CallRefused(422, "load_failed", f"{e}{keeps}") from e
        return self.listing()

    # ---- rollouts (mmap_model/rollouts.py: the records; rollouts.py: how they are served) ----

    def rollouts(self, task: str | None = None, required: bool = True) -> RolloutListing:
        """Every rollout record of the directory (those refused too) with its evidence, or `task`'s (404 if it has
        none and one is `required`; else its state is "none": after a promotion)."""
        snapshot, records = self.registry.snapshot, self.registry.records
        errors = dict(records.errors)
        tasks = sorted(set(snapshot.rollouts) | set(records.effective) | set(errors)) if task is None else [task]
        if required and task is not None and not (task in snapshot.rollouts or task in records.effective
                                                  or task in errors):
            raise CallRefused(404, "no_rollout", f"task {task!r} has no rollout")
        return RolloutListing(str(self.registry.directory), [
            self.evidence.status(t, snapshot.tasks.get(t), snapshot.rollouts.get(t), records.effective.get(t),
                                 errors.get(t, (0, None))[1]) for t in tasks])

    def _start(self, task: str, wanted: RolloutRequest) -> None:
        """Write the task's record: its candidate must be loaded and define the task, and another set must serve it."""
        _named(task, wanted.candidate)
        snapshot = self.registry.snapshot
        candidate = snapshot.sets.get(wanted.candidate)
        if candidate is None or task not in candidate.handles:
            raise CallRefused(409, "rollout_refused", f"candidate {wanted.candidate!r} is not a loaded prompt set "
                              f"defining task {task!r}" if candidate is None else
                              f"candidate {wanted.candidate!r} does not define task {task!r}")
        if not any(task in s.handles for name, s in snapshot.sets.items() if name != wanted.candidate):
            raise CallRefused(409, "rollout_refused", f"no other prompt set serves task {task!r}: there is no live "
                                                      "version to roll out against")
        self._write(lambda: rollouts.start(self.registry.directory, task, wanted.candidate, wanted.mode,
                                           wanted.share, wanted.abort_below, wanted.min_requests))

    def _end(self, task: str, action: str) -> None:
        _named(task)
        directory = self.registry.directory
        if action == "abort":
            self._write(lambda: rollouts.abort(directory, task))
            return
        promoted = self._write(lambda: rollouts.promote(directory, task), apply=False)
        try:  # its publication is now the newest: take that in before the record's removal, which lets it serve
            self.registry.load(promoted.candidate)
        except PromptSetError as e:
            log.error("promoted candidate %r failed to reload: %s", promoted.candidate, e)
        self.registry.apply_rollouts()

    def _write(self, change: Callable[[], Rollout], apply: bool = True) -> Rollout:
        """Change a record (CallRefused if that is refused or the directory cannot be written), then take it in."""
        try:
            done = change()
        except NoRollout as e:
            raise CallRefused(404, "no_rollout", str(e)) from e
        except RolloutError as e:
            raise CallRefused(422, "invalid_request", str(e)) from e
        except OSError as e:
            raise CallRefused(409, "rollout_refused", f"cannot change the prompt directory's rollout records: {e}"
                              ) from e
        if apply:
            self.registry.apply_rollouts()
        return done

    def check_rollouts(self) -> None:
        """Abort every shadow whose top-1 agreement fell below its record's `abort_below` after `min_requests`; in
        the directory when it can be written (every engine follows), else in this engine alone. Forget the evidence
        of rollouts that ended."""
        snapshot = self.registry.snapshot
        for task, active in snapshot.rollouts.items():
            r = active.record
            if active.candidate is None or r.mode != "shadow" or r.abort_below is None:
                continue
            compared, agreement = self.evidence.agreement(task, active.candidate.version)
            if compared < r.min_requests or agreement >= r.abort_below:
                continue
            reason = f"automatic: top-1 agreement {agreement:.3f} below {r.abort_below} after {compared} requests"
            log.warning("aborting the rollout of %r (%s): %s", task, r.candidate, reason)
            try:
                rollouts.abort(self.registry.directory, task, reason)
                self.registry.apply_rollouts()
            except (OSError, RolloutError) as e:
                log.error("cannot write the abort (%s): this engine alone stops it", e)
                self.registry.apply_rollouts(replace(r, mode="aborted", reason=reason))
        self.evidence.forget(set(self.registry.snapshot.rollouts))

    def _sample(self, task: str, filename: str) -> Sample:
        handle = self.registry.snapshot.tasks.get(task)
        if handle is None:
            raise CallRefused(404, "unknown_task", f"unknown task {task!r}")
        missing = CallRefused(404, "unknown_sample", f"task {task!r} has no sample {filename!r}")
        if filename not in handle.samples:  # only listed names: no path ever comes from the client
            raise missing
        # Read now, judged on the opened file: it may have been removed since the load, or replaced by a
        # symlink out of the prompt directory (even for just the moment of the open).
        try:
            data = read_file_within(handle.sample_dir / filename, MAX_SAMPLE_BYTES, self.registry.directory.resolve())
        except PromptSetError:
            raise missing from None
        return Sample(data, SAMPLE_TYPES[Path(filename).suffix.lower()])
