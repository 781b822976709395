"""Which prompt-set directories changed, and when a change is settled enough to apply.

The registry's watcher polls the prompt directory every `watch_interval_s`. A set's state is the
(mtime, size) of its two files and the sha256 of its promptset.json; the file is read and hashed
only when its (mtime, size) changed, so a poll costs two `stat` calls a set however many are
served. A change (added, changed, removed) is applied once it is settled: its state has looked the
same for `debounce_s`, or no file of the set has been written for `debounce_s` (a set renamed into
place whole is applied at the first poll that sees it, or `debounce_s` after its files were
written). `poll` says when a change it holds back becomes due, so the next poll can come then
rather than a whole interval later.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mmap_model.promptset import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE

PAUSE_EVERY = 64  # sets a poll looks at between two pauses (`_paced`)
PAUSE_S = 0.0001
Stamp = tuple[int, int] | None  # (mtime_ns, size) of a file; None: missing or unreadable
DirState = tuple  # what is compared: (sha256 of the config, its stamp, the weights' stamp)


def dir_state(path: Path) -> DirState | None:
    """A fingerprint of a prompt-set directory; None when it has no promptset.json.

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


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)
    except OSError:  # missing or unreadable: loading it reports which
        return None
    return st.st_mtime_ns, st.st_size


@dataclass
class _Pending:
    state: DirState | None
    since: float  # monotonic: when this state was first seen
    quiet_s: float  # how long none of its files had been written then (0: unknown, or none to write)

    @property
    def settles(self) -> float:
        """When it has been the same, or unwritten, for the debounce: `since` + debounce - `quiet_s`."""
        return self.since - self.quiet_s


@dataclass(frozen=True)
class Changes:
    """What a poll found settled: sets to (re)load with their states, sets gone; `due`: when a held-back change
    settles (time.monotonic(); inf: none)."""

    load: dict[str, DirState]
    remove: list[str]
    due: float


class DirectoryWatcher:
    """The states of a prompt directory's sets: what was applied, what is changing. Not thread-safe."""

    def __init__(self, debounce_s: float):
        self.debounce_s = debounce_s
        self.applied: dict[str, DirState] = {}  # per set: the state last acted on (loaded or refused)
        self._pending: dict[str, _Pending] = {}
        self._known: dict[str, tuple[tuple[Stamp, Stamp], DirState | None]] = {}  # stamps -> state read for them

    def state(self, directory: Path | str, name: str) -> DirState | None:
        """The state of set `name` in `directory`, its config hashed again only when the stamps of its files
        changed. (Plain strings: a poll looks at every set, and pathlib costs more than the two `stat`s.)"""
        path = os.path.join(directory, name)
        stamps = _stamp(os.path.join(path, CONFIG_FILE)), _stamp(os.path.join(path, WEIGHTS_FILE))
        known = self._known.get(name)
        if known is not None and known[0] == stamps and stamps[0] is not None:
            return known[1]
        state = dir_state(Path(path))
        self._known[name] = (stamps, state)
        return state

    def poll(self, directory: Path, names: list[str], now: float) -> Changes:
        """Compare the sets `names` of `directory` with what was applied; return the settled changes."""
        wall_ns = time.time_ns()
        root = str(directory)
        current = {n: st for n in _paced(names) if (st := self.state(root, n)) is not None}
        for gone in set(self._known) - set(names):
            del self._known[gone]
        load, remove, due = {}, [], float("inf")
        for name in _paced(sorted(set(current) | set(self.applied))):
            state = current.get(name)
            if state == self.applied.get(name):
                self._pending.pop(name, None)
                continue
            seen = self._pending.get(name)
            if seen is None or seen.state != state:
                written = _written_ns(state)
                seen = self._pending[name] = _Pending(state, now, max(0.0, (wall_ns - written) / 1e9) if written
                                                      else 0.0)
            if now < seen.settles + self.debounce_s:
                due = min(due, seen.settles + self.debounce_s)
                continue
            del self._pending[name]
            if state is None:
                self.applied.pop(name, None)
                remove.append(name)
            else:
                self.applied[name] = state
                load[name] = state
        return Changes(load, remove, due)


def _paced(names: list[str]) -> Iterator[str]:
    """`names`, with a short sleep every PAUSE_EVERY of them. A poll of tens of thousands of sets is Python work on
    the engine's loader thread: without the pauses it keeps the GIL for up to the switch interval (5 ms) each time
    the engine's loop wants it back after an operation, and a batch's forward waits that many times (the tail
    latency it costs: docs/benchmarks.md, "Many tasks"). A pause lets the loop take the GIL at once, for a small
    cost to the poll itself."""
    for i, name in enumerate(names):
        if i and not i % PAUSE_EVERY:
            time.sleep(PAUSE_S)
        yield name


def _written_ns(state: DirState | None) -> int:
    """The newest mtime among the files of a state (0 when unknown)."""
    if state is None:
        return 0
    stamps = [s for s in state[1:] if isinstance(s, tuple) and len(s) >= 2]
    return max((s[0] for s in stamps), default=0)
