"""The catalog the HTTP side answers from (tasks, classes, versions, readiness), as the engine hands it out.

Every change of the registry's snapshot or of the readiness gives a new `generation`. Workers get the
whole `Catalog` once (when they connect, or when they have missed a change) and otherwise
`CatalogDelta`s: the tasks added or replaced since the generation before, and the tasks gone. A
delta costs the tasks that changed, not the tasks served (docs/architecture.md, "Many tasks").

Which tasks carry their own request metrics (`TaskInfo.metered`) is decided here, so that every
worker labels a task the same way: the first `max_metered` tasks to appear (in name order among those
that appear together, as at start-up), keeping their place until they are gone.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable

from service.schema import TaskInfo, sample_path
from service.transport import Catalog, CatalogDelta

from .registry import CHANGE_LOG, Registry
from .snapshot import TaskHandle


class CatalogFeed:
    """Full catalogs and deltas of one engine's registry; not thread-safe (the engine's loop owns it)."""

    def __init__(self, registry: Registry, reason: Callable[[], str | None], state: Callable[[], Hashable],
                 max_metered: int):
        self.registry = registry
        self.reason = reason  # None when ready, else why not
        self.state = state  # cheap; the reason may change only when it does
        self.max_metered = max_metered
        self.source = os.urandom(6).hex()  # generations of another engine (or an earlier one) do not compare
        self.generation = 0
        self.metered: set[str] = set()
        self._serials: OrderedDict[int, int] = OrderedDict({0: 0})  # generation -> snapshot serial it reflects
        self._key: tuple[int, Hashable] = (0, self.state())
        self._reason = self.reason()

    def advance(self) -> bool:
        """Take in the registry's and the readiness's changes since the last call; True (and a new generation)
        if there were any."""
        key = (self.registry.snapshot.serial, self.state())
        if key == self._key:
            return False
        serial, reason = key[0], self.reason()
        if serial == self._key[0] and reason == self._reason:
            self._key = key
            return False
        changed = self.registry.changed_since(self._key[0])
        tasks = self.registry.snapshot.tasks
        if changed is None:  # beyond the change log: every task is new to the metered choice
            changed = set(tasks) | self.metered
        for task in sorted(changed):
            if task not in tasks:
                self.metered.discard(task)
            elif len(self.metered) < self.max_metered:
                self.metered.add(task)
        self.generation += 1
        self._serials[self.generation] = serial
        while len(self._serials) > CHANGE_LOG:
            self._serials.popitem(last=False)
        self._key, self._reason = key, reason
        return True

    def change(self) -> CatalogDelta | Catalog | None:
        """What changed since the last `advance`, as the delta every worker needs; None if nothing did."""
        return self.since(self.source, self.generation - 1) if self.advance() else None

    def catch_up(self, source: str, generation: int) -> Catalog | CatalogDelta:
        """What a copy at `generation` of catalog `source` needs, with every change up to now taken in."""
        self.advance()
        return self.since(source, generation)

    def full(self) -> Catalog:
        tasks = self.registry.snapshot.tasks
        reason = self._reason
        return Catalog(self.source, self.generation, reason is None, reason,
                       [self._info(tasks[t]) for t in sorted(tasks)])

    def since(self, source: str, generation: int) -> Catalog | CatalogDelta:
        """What a copy at `generation` of catalog `source` needs: a delta, or the whole catalog when the changes
        since then are no longer known. (A delta may also carry changes published after this generation was
        taken; applying one twice changes nothing, and the next delta carries them again.)"""
        serial = self._serials.get(generation) if source == self.source else None
        changed = None if serial is None else self.registry.changed_since(serial)
        if changed is None:
            return self.full()
        tasks, reason = self.registry.snapshot.tasks, self._reason
        return CatalogDelta(self.source, self.generation, generation, reason is None, reason,
                            [self._info(tasks[t]) for t in sorted(changed) if t in tasks],
                            sorted(t for t in changed if t not in tasks))

    def _info(self, h: TaskHandle) -> TaskInfo:
        rollout = self.registry.snapshot.rollouts.get(h.task)
        return TaskInfo(h.task, h.prompt_set, h.version, h.method, h.group, list(h.classnames),
                        [sample_path(h.task, name) for name in h.samples],
                        h.template, dict(h.card.get("evaluation", {})), dict(h.card.get("trained", {})),
                        h.task in self.metered, rollout.info() if rollout is not None else None, h.temperature,
                        h.min_score)
