"""The prompt-set registry: an immutable snapshot {task -> handle}, swapped atomically.

Each sub-directory `<name>/` of the prompt directory is one prompt set, identified by that
directory name. Loading one validates it against the served backbone (`PromptSet.load`) and
computes every task's class-text embeddings and visual prompts ONCE; then a new `Snapshot` is built
and published by a single reference assignment. A request holds the snapshot it started with, so a
swap never breaks it. A failed load publishes nothing (the old version keeps serving) and is
reported: log, `status()` (the admin listing), and `mmap_prompt_set_loads_total{result="failure"}`.

A task defined by several loaded sets is served by the newest publication: the set whose
promptset.json was written last (mtime; ties by name). So retraining one task into a new set, or
regrouping tasks into new sets, moves each task in the one swap that publishes its new set, with no
request failing and no manual step; the older set keeps serving what nobody newer claims, and takes
its tasks back if the newer set goes. What is served is a function of the directory's contents,
whatever order sets were loaded in.

Publishing a prompt set atomically (what the directory watcher relies on):
- Directories whose names start with '.' or '_' are ignored: write a new set as `.<name>.tmp/`
  (prompts.safetensors, then promptset.json) and `rename` it to `<name>/`. To replace a served
  set, rename the old directory away and the new one in; the watcher's debounce covers the gap.
- Or rewrite the files in place: prompts.safetensors first, promptset.json LAST, each written to a
  temporary name and renamed. promptset.json carries the sha256 of the weights, so a half-updated
  pair fails validation instead of loading, and the old version keeps serving until it is whole.
- The watcher applies a change (added, changed, removed) only once the directory has looked the
  same for `debounce_s` (mtimes and sizes of both files and the sha256 of promptset.json).

Sample images for the web page are read from `<name>/samples/<task>/*.{png,jpg,jpeg,webp}`.

What arrives in the directory is untrusted: symlinks are followed only while they stay inside it
(a set, its two files, its samples), and the weights file is size-limited before it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import stat
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor

from mmap_model import Backbone, PromptedCLIP, PromptSet, PromptSetError, class_text_features
from mmap_model.prompts import NAME_PATTERN, check_name
from mmap_model.promptset import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, publication_key

from .metrics import Metrics

log = logging.getLogger(__name__)

SAMPLE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
MAX_SAMPLE_BYTES = 8 * 1024 * 1024  # a sample image above this is not served
MAX_SAMPLES = 8

DirState = tuple  # what the watcher compares: (sha256 of the config, (mtime, size) of each file)


@dataclass(frozen=True)
class TaskHandle:
    """Everything needed to serve one task, computed at load time."""

    task: str
    prompt_set: str
    version: str
    method: str
    group: str | None
    classnames: tuple[str, ...]
    template: str
    text_prompts: Tensor | None  # the task's learned text prompts on the model's device (for caller labels)
    text_features: Tensor  # [C, D], normalised, fp32 on the model's device (scores are computed there)
    visual_prompts: Tensor | None  # [J, m, d_v] on the model's device; None = image tower unprompted
    sample_dir: Path
    samples: tuple[str, ...]  # file names in sample_dir
    card: Mapping[str, Any]  # `evaluation` and `trained`: PromptSet.card

    @property
    def signature(self) -> tuple[int, int] | None:
        """(J, m): tasks with equal signatures share one image-tower forward."""
        return None if self.visual_prompts is None else (self.visual_prompts.shape[0], self.visual_prompts.shape[1])


@dataclass(frozen=True)
class LoadedSet:
    name: str
    version: str
    method: str
    loaded_at: float  # unix time
    published_ns: int  # mtime of its promptset.json: the newest publication of a task serves it
    handles: Mapping[str, TaskHandle]  # every task it defines, served or shadowed by a newer set

    @property
    def precedence(self) -> tuple[int, str]:
        return publication_key(self.published_ns, self.name)


@dataclass(frozen=True)
class PromptSlot:
    """Where a task's visual prompts sit: row `index` of a stacked bank [N, J, m, d_v] (None: unprompted)."""

    bank: Tensor | None
    index: int


@dataclass(frozen=True)
class Snapshot:
    """What is served at one instant; never mutated, replaced whole."""

    sets: Mapping[str, LoadedSet] = field(default_factory=dict)
    tasks: Mapping[str, TaskHandle] = field(default_factory=dict)
    slots: Mapping[str, PromptSlot] = field(default_factory=dict)
    serial: int = 0  # 1, 2, 3, ... in the order published: tells two snapshots apart (an id() can be reused)

    @classmethod
    def of(cls, sets: Mapping[str, LoadedSet], serial: int) -> Snapshot:
        """Give each task to its newest publication, and stack the visual prompts of equal signature into one
        bank each."""
        tasks = {t: h for s in sorted(sets.values(), key=lambda s: s.precedence) for t, h in s.handles.items()}
        by_signature: dict[tuple[int, int], list[str]] = {}
        for task in sorted(tasks):
            if tasks[task].signature is not None:
                by_signature.setdefault(tasks[task].signature, []).append(task)
        slots = {task: PromptSlot(None, 0) for task in tasks}
        for names in by_signature.values():
            bank = torch.stack([tasks[t].visual_prompts for t in names])
            slots.update({t: PromptSlot(bank, i) for i, t in enumerate(names)})
        return cls(MappingProxyType(dict(sets)), MappingProxyType(tasks), MappingProxyType(slots), serial)


@dataclass(frozen=True)
class SetStatus:
    """One line of the admin listing."""

    name: str
    state: str  # "loaded" | "failed" (never loaded, or not since its last failure) | "available" (on disk, not loaded)
    version: str | None
    method: str | None
    tasks: list[str]  # the tasks it serves
    shadowed: list[str]  # the tasks it defines that a newer publication serves
    loaded_at: float | None
    last_error: str | None
    last_error_at: float | None


def inside(path: Path, root: Path) -> bool:
    """`path`, with every symlink followed, is within `root` (an already resolved directory)."""
    return path.resolve().is_relative_to(root)


def dir_state(path: Path) -> DirState | None:
    """A cheap fingerprint of a prompt-set directory; None when it has no promptset.json.

    A promptset.json that cannot be hashed safely (not a regular file: a FIFO would block the read forever;
    over MAX_CONFIG_BYTES; unreadable) is a state of its own, never an exception: loading it says why.
    """
    config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        st = config.stat()
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CONFIG_BYTES:
            return "not hashed", (st.st_mtime_ns, st.st_size, st.st_mode), _stamp(weights)
        digest = hashlib.sha256(config.read_bytes()).hexdigest()
        return digest, (st.st_mtime_ns, st.st_size), _stamp(weights)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable: {e}", None, None


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:  # missing or unreadable: loading it reports which
        return None
    return st.st_mtime_ns, st.st_size


class Registry:
    """Loads, reloads and unloads prompt sets of one directory for one backbone.

    Mutations (load / unload / scan / poll) are serialised by a lock and meant to run off the
    event loop: they read files and run the text tower. Readers only take `snapshot`.
    """

    def __init__(self, backbone: Backbone, directory: Path, metrics: Metrics, debounce_s: float = 1.0):
        self.backbone = backbone
        self.directory = Path(directory)
        self.metrics = metrics
        self.debounce_s = debounce_s
        self._prompted = PromptedCLIP(backbone.model)
        self._snapshot = Snapshot()
        self._errors: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._applied: dict[str, DirState] = {}  # per directory: the state last acted on
        self._pending: dict[str, tuple[DirState | None, float]] = {}  # changed state and when first seen
        self.directory_error: str | None = None  # why the watcher cannot list the directory now, if it cannot

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    def candidates(self) -> list[str]:
        """Sub-directories that may hold prompt sets: valid names, not '.'- or '_'-prefixed (work in progress)."""
        return [name for name in self._subdirectories() if NAME_PATTERN.fullmatch(name)]

    def _subdirectories(self) -> list[str]:
        try:
            return sorted(p.name for p in self.directory.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
        except OSError:  # missing or unreadable: nothing to offer (poll reports it)
            return []

    def scan(self) -> None:
        """Load every prompt set in the directory (start-up); failures are reported, not raised."""
        for name in sorted(set(self._subdirectories()) - set(self.candidates())):
            log.warning("ignoring %s: prompt-set directory names are 1-64 letters, digits, '_' or '-'",
                        self.directory / name)
        for name in self.candidates():
            if dir_state(self.directory / name) is None:
                continue  # no promptset.json (yet): not a prompt set; the watcher picks it up when it is
            with contextlib.suppress(PromptSetError):  # reported by load; the others still load
                self.load(name)

    def load(self, name: str) -> LoadedSet:
        """(Re)load `<directory>/<name>` and publish it; on failure raise PromptSetError, serving what was.

        An invalid name raises ValueError and is no load attempt.
        """
        check_name(name)
        with self._lock:
            try:
                path = self.directory / name
                state = dir_state(path)
                if state is not None:
                    self._applied[name] = state  # the watcher must not redo what this call reads
                loaded = self._read(name, path, state[1][0] if state and state[1] else time.time_ns())
            except Exception as e:  # any failure (validation, I/O, the text tower) leaves the old version
                message = str(e) if isinstance(e, PromptSetError) else f"{type(e).__name__}: {e}"
                self._errors[name] = (time.time(), message)
                self.metrics.prompt_set_loads.labels("failure").inc()
                log.error("prompt set %r not loaded (%s): %s", name,
                          "old version keeps serving" if name in self._snapshot.sets else "not served", message)
                raise PromptSetError(message) from e
            before = self._snapshot.tasks
            self._publish({**self._snapshot.sets, name: loaded})
            self._errors.pop(name, None)
            self.metrics.prompt_set_loads.labels("success").inc()
            served = self._snapshot.tasks
            log.info("prompt set %r version %s serving tasks %s%s", name, loaded.version,
                     sorted(t for t in loaded.handles if served[t].prompt_set == name),
                     "".join(f"; {t!r} taken over from {before[t].prompt_set!r}" for t in sorted(loaded.handles)
                             if t in before and before[t].prompt_set != name and served[t].prompt_set == name))
            return loaded

    def unload(self, name: str) -> bool:
        """Stop serving a prompt set; False if it was not loaded."""
        with self._lock:
            if name not in self._snapshot.sets:
                return False
            self._publish({n: s for n, s in self._snapshot.sets.items() if n != name})
            log.info("prompt set %r unloaded", name)
            return True

    def status(self) -> list[SetStatus]:
        """Every prompt set that is loaded, failed, or on disk."""
        snapshot, errors = self._snapshot, dict(self._errors)
        lines = []
        for name in sorted(set(snapshot.sets) | set(errors) | set(self.candidates())):
            s = snapshot.sets.get(name)
            error_at, error = errors.get(name, (None, None))
            state = "loaded" if s else "failed" if error else "available"
            defined = sorted(s.handles) if s else []
            served = [t for t in defined if snapshot.tasks[t].prompt_set == name]
            lines.append(SetStatus(name, state, s and s.version, s and s.method, served,
                                   [t for t in defined if t not in served], s and s.loaded_at, error, error_at))
        return lines

    def poll(self, now: float) -> None:
        """One watcher step: apply every change that has been stable for `debounce_s`.

        A prompt directory that is missing or cannot be listed is not "every set removed": nothing changes,
        what is loaded keeps serving, and `directory_error` (admin listing, log) says why until it is back.
        """
        try:
            next(self.directory.iterdir(), None)
        except OSError as e:
            if self.directory_error is None:
                log.error("prompt directory %s cannot be read (%s: %s): the loaded prompt sets keep serving",
                          self.directory, type(e).__name__, e)
            self.directory_error = f"{type(e).__name__}: {e}"
            return
        if self.directory_error is not None:
            log.info("prompt directory %s can be read again", self.directory)
            self.directory_error = None
        current = {n: st for n in self.candidates() if (st := dir_state(self.directory / n)) is not None}
        for name in sorted(set(current) | set(self._applied)):
            state = current.get(name)
            if state == self._applied.get(name):
                self._pending.pop(name, None)
                continue
            seen = self._pending.get(name)
            if seen is None or seen[0] != state:
                self._pending[name] = (state, now)
                continue
            if now - seen[1] < self.debounce_s:
                continue
            del self._pending[name]
            if state is None:
                del self._applied[name]
                self._errors.pop(name, None)
                self.unload(name)
                continue
            with contextlib.suppress(PromptSetError):  # reported by load; retried when the directory changes again
                self.load(name)

    def _read(self, name: str, path: Path, published_ns: int) -> LoadedSet:
        if not path.is_dir():
            raise PromptSetError(f"{path}: no such prompt-set directory")
        root = self.directory.resolve()
        ps = PromptSet.load(path, self.backbone, within=root)  # untrusted: no symlink may lead out of root
        if ps.name != name:
            log.warning("prompt set in %s calls itself %r; it is served as %r (its directory name)",
                        path, ps.name, name)
        handles = {}
        device = self.backbone.device
        with torch.inference_mode():
            for task, spec in ps.tasks.items():
                prompts = ps.prompts(task)
                text_prompts = None if prompts.text is None else prompts.text.to(device)
                text = class_text_features(self._prompted, self.backbone.tokenizer, spec.classnames, spec.template,
                                           text_prompts)
                visual = None if prompts.visual is None else prompts.visual.to(device, torch.float32)
                sample_dir = path / "samples" / task
                samples = (tuple(sorted(p.name for p in sample_dir.glob("*") if p.suffix.lower() in SAMPLE_TYPES
                                        and p.is_file() and inside(p, root))[:MAX_SAMPLES])
                           if sample_dir.is_dir() else ())
                handles[task] = TaskHandle(task, name, ps.version, ps.method, spec.group, tuple(spec.classnames),
                                           spec.template, text_prompts, text.float(), visual, sample_dir, samples,
                                           MappingProxyType(ps.card(task)))
        return LoadedSet(name, ps.version, ps.method, time.time(), published_ns, MappingProxyType(handles))

    def _publish(self, sets: Mapping[str, LoadedSet]) -> None:
        with torch.inference_mode():
            snapshot = Snapshot.of(sets, self._snapshot.serial + 1)
        self._snapshot = snapshot  # one reference assignment: readers see the old or the new, never a mix
        self.metrics.tasks_loaded.set(len(snapshot.tasks))
