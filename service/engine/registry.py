"""The prompt-set registry: an immutable snapshot {task -> handle}, swapped atomically.

Each sub-directory `<name>/` of the prompt directory is one prompt set, identified by that
directory name. Loading one validates it against the served backbone (`PromptSet.load`) and
computes every task's class-text embeddings ONCE (the sets loaded together share text-tower
forwards); its visual prompts are written into free rows of a bank (one per prompt shape); then a new
`Snapshot` is published by a single reference assignment, at a cost that grows with the sets that
changed, not with the tasks served (docs/architecture.md, "Many tasks"). A request holds the
snapshot it started with, so a swap never breaks it. A failed load publishes nothing (the old
version keeps serving) and is reported: log, `status()` (the admin listing), and
`mmap_prompt_set_loads_total{result="failure"}`.

A task defined by several loaded sets is served by the newest publication: the set whose promptset.json was
written last (mtime; ties by name), but for a rollout's candidate (rollouts.py: `_rollouts/` records). So
retraining one task into a new set, or regrouping tasks into new sets, moves each task in the one swap that
publishes its new set, with no request failing and no manual step; the older set keeps serving what nobody newer
claims, and takes its tasks back if the newer set goes. What is served is a function of the directory's contents,
whatever order sets were loaded in. How to publish a set atomically: README.md, "Publishing prompt sets while
serving"; the watcher applies a change once it has settled (watcher.py). Sample images for the web page are read
from `<name>/samples/<task>/*.{png,jpg,jpeg,webp}`.

What arrives in the directory is untrusted: symlinks are followed only while they stay inside it
(a set, its two files, its samples), and the weights file is size-limited before it is read.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor

from mmap_model import Backbone, ClassTexts, PromptedCLIP, Prompts, PromptSetError, TaskSpec
from mmap_model.encoders import TokenizedTexts, encode_class_texts, tokenize_class_texts
from mmap_model.prompts import NAME_PATTERN, check_name
from mmap_model.rollouts import Rollout
from service.metrics import Metrics
from service.schema import PromptSetStatus

from .rollouts import Records, resolve
from .sets import SetRead, read_set
from .snapshot import LoadedSet, PromptBank, PromptSlot, Snapshot, TaskHandle
from .watcher import DirectoryWatcher

log = logging.getLogger(__name__)

SETS_PER_STEP = 256  # sets read, embedded and counted in /readyz's progress together during a scan
CHANGE_LOG = 4096  # publications whose changed tasks are remembered (catalog deltas); older: a full catalog


@dataclass
class _Prepared:
    """Sets read, their tasks' prompts computed and class texts tokenized: what their embedding needs."""

    reads: list[SetRead]
    tasks: list[tuple[SetRead, str, TaskSpec, Prompts]]
    texts: list[ClassTexts]
    tokens: TokenizedTexts


class Registry:
    """Loads, reloads and unloads prompt sets of one directory for one backbone.

    Mutations (load / unload / scan / poll) are serialised by a lock and meant to run off the
    event loop: they read files and run the text tower. Readers only take `snapshot`; the thread that
    answers requests calls `reclaim` so that bank rows of replaced tasks can be used again.
    """

    def __init__(self, backbone: Backbone, directory: Path, metrics: Metrics, debounce_s: float = 1.0):
        self.backbone = backbone
        self.directory = Path(directory)
        self.metrics = metrics
        self.watcher = DirectoryWatcher(debounce_s)
        self._prompted = PromptedCLIP(backbone.model)
        self._snapshot = Snapshot()
        self._errors: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()
        self._banks: dict[tuple[int, ...], PromptBank] = {}
        self._definers: dict[str, set[str]] = {}  # task -> the loaded sets that define it
        self._changes: deque[tuple[int, tuple[str, ...]]] = deque(maxlen=CHANGE_LOG)  # (serial, tasks changed)
        self._retired: deque[tuple[int, PromptBank, list[int]]] = deque()  # rows no snapshot from serial on names
        self.directory_error: str | None = None  # why the watcher cannot list the directory now, if it cannot
        self.progress: tuple[int, int] | None = None  # (sets read, of) while a scan runs
        self.records = Records(self.directory)  # rollouts (rollouts.py): read before any set, so no candidate serves

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @property
    def retiring(self) -> bool:  # bank rows wait for `reclaim`
        return bool(self._retired)

    @property
    def banks(self) -> list[PromptBank]:
        return list(self._banks.values())

    def candidates(self, subdirectories: list[str] | None = None) -> list[str]:
        """Sub-directories that may hold prompt sets: valid names, not '.'- or '_'-prefixed (work in progress);
        of `subdirectories` when given (a listing already made), else of a new listing."""
        names = self._subdirectories() if subdirectories is None else subdirectories
        return [name for name in names if NAME_PATTERN.fullmatch(name)]

    def _subdirectories(self) -> list[str]:
        try:  # scandir: no stat per entry (a poll lists tens of thousands of sets)
            with os.scandir(self.directory) as entries:
                return sorted(e.name for e in entries if not e.name.startswith((".", "_")) and e.is_dir())
        except OSError:  # missing or unreadable: nothing to offer (poll reports it)
            return []

    # ---- loading ----

    def scan(self, after_step: Callable[[], None] | None = None) -> None:
        """Load every prompt set in the directory (start-up), in one publication; failures are reported, not
        raised. `progress` counts the sets read meanwhile; `after_step` is called after each step's sets are
        embedded."""
        listed = self._subdirectories()  # once: tens of thousands of entries at start-up
        candidates = self.candidates(listed)
        for name in sorted(set(listed) - set(candidates)):
            log.warning("ignoring %s: prompt-set directory names are 1-64 letters, digits, '_' or '-'",
                        self.directory / name)
        with self._lock:
            states = {n: st for n in candidates if (st := self.watcher.state(self.directory, n)) is not None}
            self.watcher.applied.update(states)  # (no promptset.json yet: not a set; the watcher sees it later)
            self.progress = (0, len(states))
            self.records.refresh()
            try:
                self._apply(list(states), [], after_step)
            finally:
                self.progress = None

    def load(self, name: str) -> LoadedSet:
        """(Re)load `<directory>/<name>` and publish it; on failure raise PromptSetError, serving what was.

        An invalid name raises ValueError and is no load attempt.
        """
        check_name(name)
        with self._lock:
            state = self.watcher.state(self.directory, name)
            if state is not None:
                self.watcher.applied[name] = state  # the watcher must not redo what this call reads
            loaded = self._apply([name], [], tasks=self.records.refresh())  # (records as they are now)
        if name not in loaded:
            raise PromptSetError(self._errors[name][1])
        return loaded[name]

    def unload(self, name: str) -> bool:  # False if it was not loaded
        with self._lock:
            if name not in self._snapshot.sets:
                return False
            self._publish({}, {name})
            log.info("prompt set %r unloaded", name)
            return True

    def poll(self, now: float) -> float:
        """One watcher step: apply, in one publication, every change that has settled (watcher.py); returns
        when a change still settling is due (time.monotonic(); inf: none).

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
            return float("inf")
        if self.directory_error is not None:
            log.info("prompt directory %s can be read again", self.directory)
            self.directory_error = None
        with self._lock:
            changes = self.watcher.poll(self.directory, self.candidates(), now)
            for name in changes.remove:
                self._errors.pop(name, None)
            rollouts = self.records.refresh()
            if changes.load or changes.remove or rollouts:  # a refused load is retried when the directory changes
                self._apply(list(changes.load), changes.remove, tasks=rollouts)
        return changes.due

    def apply_rollouts(self, override: Rollout | None = None) -> None:
        """Take in the rollout records as they are now (after the admin API wrote one), and `override`."""
        with self._lock:
            tasks = self.records.refresh()
            if override is not None:
                self.records.override(override)
                tasks.add(override.task)
            if tasks:
                self._publish({}, set(), tasks)

    def _apply(self, names: list[str], removed: list[str], after_step: Callable[[], None] | None = None,
               tasks: set[str] | frozenset[str] = frozenset()) -> dict[str, LoadedSet]:
        """Read and embed the sets `names` (SETS_PER_STEP at a time), then publish them, the removal of `removed`
        and `tasks`' rollout records in one snapshot; a set that fails is reported and its old version keeps
        serving. Holds the lock. (Reading and tokenizing on another thread, or in another process, while the text
        tower ran was measured slower on two cores: docs/architecture.md, "Many tasks".)"""
        loaded: dict[str, LoadedSet] = {}
        steps = [names[i:i + SETS_PER_STEP] for i in range(0, len(names), SETS_PER_STEP)]
        for k, step in enumerate(steps):
            loaded.update((s.name, s) for s in self._embed(self._prepare([r for r in map(self._read, step) if r])))
            if self.progress is not None:
                self.progress = (min((k + 1) * SETS_PER_STEP, len(names)), len(names))
            if after_step is not None:
                after_step()
        gone = {n for n in removed if n in self._snapshot.sets}
        if loaded or gone or tasks:
            before = self._snapshot.tasks
            self._publish(loaded, gone, tasks)
            for s in loaded.values():
                self._errors.pop(s.name, None)
                self.metrics.prompt_set_loads.labels("success").inc()
                self._log_loaded(s, before)
            for name in sorted(gone - set(loaded)):
                log.info("prompt set %r unloaded", name)
        return loaded

    def _failed(self, name: str, error: BaseException) -> None:
        message = str(error) if isinstance(error, PromptSetError) else f"{type(error).__name__}: {error}"
        self._errors[name] = (time.time(), message)
        self.metrics.prompt_set_loads.labels("failure").inc()
        log.error("prompt set %r not loaded (%s): %s", name,
                  "old version keeps serving" if name in self._snapshot.sets else "not served", message)

    def _read(self, name: str) -> SetRead | None:
        """Read and validate a set; None when it fails (reported)."""
        try:
            state = self.watcher.applied.get(name)
            published_ns = state[1][0] if state and state[1] else time.time_ns()
            return read_set(self.directory, name, self.backbone, published_ns)
        except Exception as e:  # any failure (validation, I/O) leaves the old version
            self._failed(name, e)
            return None

    def _prepare(self, reads: list[SetRead]) -> _Prepared:
        """The sets' tasks, their prompts and their tokenized class texts."""
        device = self.backbone.device
        with torch.inference_mode():
            tasks = [(r, task, spec, r.prompt_set.prompts(task)) for r in reads
                     for task, spec in r.prompt_set.tasks.items()]
            texts = [ClassTexts(spec.classnames, spec.template, None if p.text is None else p.text.to(device))
                     for _, _, spec, p in tasks]
        return _Prepared(reads, tasks, texts, tokenize_class_texts(self.backbone.tokenizer, texts))

    def _embed(self, prepared: _Prepared) -> list[LoadedSet]:
        """The sets' text features in shared text-tower forwards, and their visual prompts in the banks; if that
        fails, set by set, so that one broken set fails alone."""
        try:
            return self._embed_together(prepared)
        except Exception as e:
            if len(prepared.reads) == 1:
                self._failed(prepared.reads[0].name, e)
                return []
        done = []
        for read in prepared.reads:
            try:
                done.extend(self._embed_together(self._prepare([read])))
            except Exception as e:  # e.g. the text tower refused this set's prompts or templates
                self._failed(read.name, e)
        return done

    def _embed_together(self, prepared: _Prepared) -> list[LoadedSet]:
        if not prepared.reads:
            return []
        added: list[PromptSlot] = []
        handles: dict[str, dict[str, TaskHandle]] = {r.name: {} for r in prepared.reads}
        try:
            with torch.inference_mode():
                features = encode_class_texts(self._prompted, prepared.tokens)
                for (r, task, spec, prompts), texts, feature in zip(prepared.tasks, prepared.texts, features,
                                                                    strict=True):
                    slot = PromptSlot(None, 0) if prompts.visual is None else self._bank_row(prompts.visual)
                    added.append(slot)
                    ps = r.prompt_set
                    handles[r.name][task] = TaskHandle(
                        task, r.name, ps.version, ps.method, spec.group, tuple(spec.classnames), spec.template,
                        texts.prompts, feature.float().clone(), slot, r.path / "samples" / task, r.samples[task],
                        MappingProxyType(ps.card(task)), spec.temperature, spec.min_score)
        except BaseException:
            self._release(added)  # never published: its rows are free at once
            raise
        return [LoadedSet(r.name, r.prompt_set.version, r.prompt_set.method, time.time(), r.published_ns,
                          MappingProxyType(handles[r.name])) for r in prepared.reads]

    def _bank_row(self, visual: Tensor) -> PromptSlot:
        shape = tuple(visual.shape)
        bank = self._banks.get(shape)
        if bank is None:
            bank = self._banks[shape] = PromptBank(shape, self.backbone.device)
        return PromptSlot(bank, bank.add(visual.to(self.backbone.device, torch.float32)))

    @staticmethod
    def _release(slots: Iterable[PromptSlot]) -> None:
        for slot in slots:
            if slot.bank is not None:
                slot.bank.release([slot.index])

    # ---- publishing ----

    def _publish(self, loaded: Mapping[str, LoadedSet], removed: set[str], tasks_: Iterable[str] = ()) -> None:
        """A new snapshot with the sets `loaded` (new or replacing) and without `removed`. Costs what changed:
        the tasks of those sets (and `tasks_`, whose rollout records changed) are resolved again (the newest
        publication of each serves it, a rollout's candidate left out: rollouts.resolve) and the other
        tasks' handles are shared with the old snapshot (one dict copy, in C); the replaced sets' bank rows are
        retired until no request can read them (`reclaim`)."""
        old = self._snapshot
        sets, tasks, rollouts = dict(old.sets), dict(old.tasks), dict(old.rollouts)
        affected, retired = set(tasks_), []
        for name in removed | set(loaded):
            previous = sets.pop(name, None)
            if previous is not None:
                affected.update(previous.handles)
                retired.extend(h.slot for h in previous.handles.values() if h.slot.bank is not None)
                for task in previous.handles:
                    self._definers[task].discard(name)
        for name, s in loaded.items():
            sets[name] = s
            affected.update(s.handles)
            for task in s.handles:
                self._definers.setdefault(task, set()).add(name)
        changed = []
        for task in sorted(affected):
            definers = self._definers.get(task)
            if not definers:
                self._definers.pop(task, None)
                rollouts.pop(task, None)  # (a task has a rollout entry only while it has a handle)
                if tasks.pop(task, None) is not None:
                    changed.append(task)
                continue
            handle, active = resolve(task, definers, sets, self.records.effective.get(task))
            same = active.same(rollouts.get(task)) if active else task not in rollouts
            if tasks.get(task) is not handle or not same:
                tasks[task] = handle
                changed.append(task)
            if active is None:
                rollouts.pop(task, None)
            else:
                rollouts[task] = active
        snapshot = Snapshot(MappingProxyType(sets), MappingProxyType(tasks), old.serial + 1, MappingProxyType(rollouts))
        self._snapshot = snapshot  # one reference assignment: readers see the old or the new, never a mix
        self._changes.append((snapshot.serial, tuple(changed)))
        if retired:
            self._retired.append((snapshot.serial, retired))
        self.metrics.tasks_loaded.set(len(tasks))
        self.metrics.prompt_sets_loaded.set(len(sets))

    def changed_since(self, serial: int) -> set[str] | None:
        """The tasks whose serving handle changed after snapshot `serial` (added, replaced or removed); None when
        that is further back than the change log reaches."""
        changes = list(self._changes)  # a copy: the loader thread appends
        current = self._snapshot.serial
        if serial >= current:
            return set()
        if not changes or changes[0][0] > serial + 1:
            return None
        return {task for s, names in changes if s > serial for task in names}

    def reclaim(self, oldest_in_use: int) -> None:
        """Bank rows retired by publications up to snapshot `oldest_in_use` become free: every request still
        queued or on the device arrived in that snapshot or a later one, none of which names them. Called by
        the thread that answers requests; never waits for the lock (a load holds it): it tries again later."""
        if not self._retired or self._retired[0][0] > oldest_in_use or not self._lock.acquire(blocking=False):
            return
        try:
            while self._retired and self._retired[0][0] <= oldest_in_use:
                self._release(self._retired.popleft()[1])
        finally:
            self._lock.release()

    # ---- reporting ----

    def status(self) -> list[PromptSetStatus]:
        """Every prompt set that is loaded, failed, or on disk."""
        snapshot, errors = self._snapshot, dict(self._errors)
        lines = []
        for name in sorted(set(snapshot.sets) | set(errors) | set(self.candidates())):
            s = snapshot.sets.get(name)
            error_at, error = errors.get(name, (None, None))
            state = "loaded" if s else "failed" if error else "available"
            defined = sorted(s.handles) if s else []
            served = [t for t in defined if snapshot.tasks[t].prompt_set == name]
            lines.append(PromptSetStatus(name, state, s and s.version, s and s.method, served,
                                   [t for t in defined if t not in served], s and s.loaded_at, error, error_at))
        return lines

    def _log_loaded(self, s: LoadedSet, before: Mapping[str, TaskHandle]) -> None:
        served = self._snapshot.tasks
        log.info("prompt set %r version %s serving tasks %s%s", s.name, s.version,
                 sorted(t for t in s.handles if served[t].prompt_set == s.name),
                 "".join(f"; {t!r} taken over from {before[t].prompt_set!r}" for t in sorted(s.handles)
                         if t in before and before[t].prompt_set != s.name and served[t].prompt_set == s.name))
