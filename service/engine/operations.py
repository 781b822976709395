"""The engine's operations off the hot path: the admin API's prompt-set listing, load and unload, and
sample files. They run on the engine's loader thread (and in the Ray engine deployment), never in the
batching loop; a refusal is a `CallRefused` with the HTTP status the worker answers."""

from __future__ import annotations

from pathlib import Path

from mmap_model import PromptSetError
from mmap_model.prompts import check_name
from mmap_model.promptset import read_file_within
from service.schema import ErrorCode, PromptSetListing
from service.transport import GetSample, ListSets, LoadSet, Operation, Reply, Sample, UnloadSet

from .registry import Registry
from .sets import MAX_SAMPLE_BYTES, SAMPLE_TYPES


class CallRefused(Exception):
    """An operation refused with an HTTP status (the worker answers it as is)."""

    def __init__(self, status: int, error: ErrorCode, detail: str):
        super().__init__(detail)
        self.status = status
        self.error = error

    def reply(self, request: int) -> Reply:
        return Reply(request, self.status, error=self.error, detail=str(self))


class Operations:
    """Runs one `Operation` against the registry and answers it as a `Reply`."""

    def __init__(self, registry: Registry):
        self.registry = registry

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
        raise CallRefused(400, "unknown_operation", f"unknown operation {type(op).__name__}")

    def listing(self) -> PromptSetListing:
        return PromptSetListing(str(self.registry.directory), self.registry.directory_error, self.registry.status())

    def _load(self, name: str) -> PromptSetListing:
        try:
            check_name(name)
        except ValueError as e:
            raise CallRefused(422, "invalid_name", str(e)) from e
        if not (self.registry.directory / name).is_dir():
            raise CallRefused(404, "not_found", f"no prompt-set directory {name!r} in {self.registry.directory}")
        try:
            self.registry.load(name)
        except PromptSetError as e:
            serving = self.registry.snapshot.sets.get(name)
            keeps = f"; version {serving.version} keeps serving" if serving else ""
            raise CallRefused(422, "load_failed", f"{e}{keeps}") from e
        return self.listing()

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
