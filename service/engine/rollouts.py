"""Rollouts on the engine: which version answers a request, shadow scoring, and the evidence per task and version.

The records come from the prompt directory (`mmap_model.rollouts`); the registry resolves them into each snapshot
(`resolve`): the live handle of a task and, while a canary or shadow runs, its candidate's handle. Both are loaded
like any set (a few KB of prompts and their class-text features), so a candidate costs rows in a batch, not a
second model.

- Canary: `Router.route` sends the record's share of the task's requests to the candidate; with a client key
  (X-Client-ID) the choice is a hash of task and key, so a client keeps its version (and keeps it while the share
  grows); without one it is random per request.
- Shadow: the chosen requests are answered by the live version; their pixels are kept and scored again by the
  candidate in a forward of their own, once a full batch of them waits or the oldest is SHADOW_MAX_AGE_S old, so
  the live rows' forward is exactly what it would be without the rollout. `Evidence` compares the two top-1 answers.
- Evidence: requests and mean top-1 score per task and version, shadow agreement; in the admin listing, /tasks
  and Prometheus (only tasks with a rollout get series).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import Counter

from mmap_model import rollouts
from mmap_model.rollouts import Rollout
from service.errors import version_not_served_detail
from service.schema import RolloutInfo, RolloutStatus, ShadowFigures, VersionFigures

from .batch import Pending, ShadowPair
from .snapshot import LoadedSet, TaskHandle

if TYPE_CHECKING:
    from service.metrics import Metrics

log = logging.getLogger(__name__)

SHADOW_MAX_AGE_S = 0.5  # shadow rows run once a batch of them waits, or the oldest has waited this long


@dataclass(frozen=True, eq=False)
class ActiveRollout:
    """A task's rollout record as resolved in one snapshot: its candidate's handle while the candidate gets traffic,
    else None and why not."""

    record: Rollout
    candidate: TaskHandle | None
    note: str | None = None

    @property
    def state(self) -> str:
        return "active" if self.candidate is not None else "aborted" if self.record.mode == "aborted" else "inactive"

    def same(self, other: ActiveRollout | None) -> bool:
        """Resolved alike (handles compared by identity: a reloaded candidate is a change)."""
        return (other is not None and other.record == self.record and other.candidate is self.candidate
                and other.note == self.note)

    def info(self) -> RolloutInfo:
        c = self.candidate
        return RolloutInfo(self.record.candidate, c.version if c else None, self.record.mode, self.record.share,
                           self.state, self.note)


def resolve(task: str, definers: set[str], sets: Mapping[str, LoadedSet], record: Rollout | None
            ) -> tuple[TaskHandle, ActiveRollout | None]:
    """The handle serving `task` (its newest publication, the candidate left out while a record names it) and the
    resolved rollout."""

    def newest(names: set[str]) -> TaskHandle:
        return sets[max(names, key=lambda n: sets[n].precedence)].handles[task]

    if record is None:
        return newest(definers), None
    others = definers - {record.candidate}
    if record.candidate not in definers:
        why = "is not loaded" if record.candidate not in sets else f"does not define task {task!r}"
        return newest(definers), ActiveRollout(record, None, f"candidate {record.candidate!r} {why}")
    if not others:
        return newest(definers), ActiveRollout(record, None, "no other prompt set defines the task: the candidate "
                                                             "serves it alone")
    live = newest(others)
    if record.mode == "aborted":
        return live, ActiveRollout(record, None, f"aborted: {record.reason}")
    return live, ActiveRollout(record, sets[record.candidate].handles[task])


class Records:
    """The rollout records of a prompt directory in effect: re-read when a file changes; a record that cannot be used
    changes nothing (the task's previous record, if any, stays in effect) and is reported."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.effective: dict[str, Rollout] = {}
        self.errors: dict[str, tuple[float, str]] = {}  # task -> (when, why its record file is refused)
        self._signature: tuple | None = None

    def refresh(self) -> set[str]:
        """Read what changed; the tasks whose record in effect changed."""
        signature = rollouts.signature(self.directory)
        if signature == self._signature:
            return set()
        self._signature = signature
        records, errors = rollouts.read_all(self.directory)
        refused: dict[str, tuple[float, str]] = {}
        for task, why in errors.items():
            if task in self.effective:
                records[task] = self.effective[task]
            known = self.errors.get(task)
            if known is not None and known[1] == why:
                refused[task] = known
                continue
            refused[task] = (time.time(), why)
            log.error("rollout record refused (%s): %s", "the previous one stays in effect"
                      if task in self.effective else "the task has no rollout", why)
        self.errors = refused
        changed = {t for t in records.keys() | self.effective.keys() if records.get(t) != self.effective.get(t)}
        self.effective = records
        return changed

    def override(self, record: Rollout) -> None:
        """In effect here although the directory could not be written (an automatic abort on a read-only mount)."""
        self.effective[record.task] = record


def chosen(task: str, share: float, key: str | None) -> bool:
    """Whether a request falls in the candidate's `share` % (stable for a key: the same key, the same answer)."""
    if share >= 100:
        return True
    if key is None:
        return random.random() * 100 < share
    digest = hashlib.blake2b(f"{task}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") * 100 < share * 2**64


@dataclass
class _Counts:
    requests: int = 0
    score_sum: float = 0.0

    def add(self, score: float) -> None:
        self.requests += 1
        self.score_sum += score

    def mean(self) -> float | None:
        return self.score_sum / self.requests if self.requests else None


@dataclass
class _Shadow:
    compared: int = 0
    agreed: int = 0
    live: _Counts = field(default_factory=_Counts)
    candidate: _Counts = field(default_factory=_Counts)


class Evidence:
    """Per task and version: the requests answered and their mean top-1 score; per shadowed candidate: the requests
    compared, top-1 agreement and each side's mean top-1 score. Counted on the engine's loop; read anywhere."""

    def __init__(self, metrics: Metrics):
        self.answered: dict[tuple[str, str, str], _Counts] = {}  # (task, version, prompt set) -> counts
        self.shadows: dict[tuple[str, str], _Shadow] = {}  # (task, candidate version) -> comparison
        self.records: dict[str, Rollout] = {}  # task -> the rollout its figures are of
        self._series: dict[tuple[str, str, str], tuple] = {}  # (task, version, role) -> its two Prometheus series
        r = metrics.registry
        self._requests = Counter("mmap_rollout_requests", "requests of tasks with a rollout, by version and role "
                                 "(live, canary: answered; shadow: scored beside the live answer)",
                                 ["task", "version", "role"], registry=r)
        self._scores = Counter("mmap_rollout_top1_score", "sum of top-1 scores (divide by mmap_rollout_requests)",
                               ["task", "version", "role"], registry=r)
        self._agreed = Counter("mmap_rollout_agreements", "shadow requests whose top-1 label equals the live answer's",
                               ["task", "version"], registry=r)

    def begin(self, task: str, record: Rollout) -> None:
        """The task's figures are of this rollout: a new record (another candidate, mode or share) starts afresh."""
        seen = self.records.get(task)
        if seen is not record and seen != record:
            self.forget({t for t in self.records if t != task})
            self.records[task] = record

    def _counted(self, task: str, version: str, role: str, score: float) -> None:
        """Prometheus: one request and its top-1 score (the labelled series kept: a lookup costs more than the add)."""
        series = self._series.get((task, version, role))
        if series is None:
            series = self._series[(task, version, role)] = (self._requests.labels(task, version, role),
                                                            self._scores.labels(task, version, role))
        series[0].inc()
        series[1].inc(score)

    def answer(self, handle: TaskHandle, role: str, score: float) -> None:
        self.answered.setdefault((handle.task, handle.version, handle.prompt_set), _Counts()).add(score)
        self._counted(handle.task, handle.version, role, score)

    def compare(self, candidate: TaskHandle, live: tuple[str, float], top1: tuple[str, float]) -> None:
        shadow = self.shadows.setdefault((candidate.task, candidate.version), _Shadow())
        shadow.compared += 1
        shadow.agreed += live[0] == top1[0]
        shadow.live.add(live[1])
        shadow.candidate.add(top1[1])
        self._counted(candidate.task, candidate.version, "shadow", top1[1])
        if live[0] == top1[0]:
            self._agreed.labels(candidate.task, candidate.version).inc()

    def agreement(self, task: str, version: str) -> tuple[int, float | None]:
        s = self.shadows.get((task, version))
        return (0, None) if s is None or not s.compared else (s.compared, s.agreed / s.compared)

    def status(self, task: str, live: TaskHandle | None, active: ActiveRollout | None, record: Rollout | None,
               error: str | None) -> RolloutStatus:
        """What the admin listing and /tasks show of a task's rollout."""
        record = active.record if active is not None else record
        candidate = active.candidate if active is not None else None
        answered = [VersionFigures(version, prompt_set, "live" if live and version == live.version else "candidate",
                                   c.requests, c.mean())
                    for (t, version, prompt_set), c in sorted(list(self.answered.items())) if t == task]
        shadow = None
        if record is not None and record.mode != "canary" and candidate is not None:
            s = self.shadows.get((task, candidate.version), _Shadow())
            shadow = ShadowFigures(candidate.version, s.compared, s.agreed / s.compared if s.compared else None,
                                   s.live.mean(), s.candidate.mean())
        return RolloutStatus(
            task, record.candidate if record else None, record.mode if record else None,
            record.share if record else None, active.state if active else "inactive" if record else "none",
            active.note if active else None, live.version if live else None, live.prompt_set if live else None,
            candidate.version if candidate else None, answered, shadow, record.abort_below if record else None,
            record.min_requests if record else None, record.reason if record else None,
            record.updated if record else None, error)

    def forget(self, keep: set[str]) -> None:
        """Drop the figures of tasks that no longer have a rollout (their Prometheus series stay until a restart)."""
        for key in [k for k in list(self.answered) if k[0] not in keep]:
            del self.answered[key]
        for key in [k for k in list(self.shadows) if k[0] not in keep]:
            del self.shadows[key]
        for task in [t for t in list(self.records) if t not in keep]:
            del self.records[task]
        for key in [k for k in list(self._series) if k[0] not in keep]:
            del self._series[key]


class VersionNotServed(Exception):
    """A request pinned to a version the task does not serve (409, with the versions it does)."""


@dataclass(frozen=True)
class Route:
    """Who answers a request: `handle`; `role` "live" or "canary" for a task with a rollout (its evidence is
    counted), None otherwise; `pair` when the candidate also scores it in the shadow."""

    handle: TaskHandle
    role: str | None = None
    pair: ShadowPair | None = None


class Router:
    """The rollout side of admitting a request (pinning, the canary's choice, the shadow's) and the shadow queue."""

    def __init__(self, evidence: Evidence, max_batch_size: int):
        self.evidence = evidence
        self.max_batch_size = max_batch_size
        self.shadows: list[Pending] = []  # candidate rows waiting for their forward
        self.oldest = 0.0  # time.monotonic() of shadows[0]

    def route(self, live: TaskHandle, active: ActiveRollout | None, version: str | None, key: str | None,
              scored: bool) -> Route:
        """Who answers a request for `live`'s task (VersionNotServed for a `version` it does not serve). `scored`:
        it is scored over the task's classes (only those can be shadowed: the comparison is of top-1 labels).
        Evidence is counted while a candidate gets traffic."""
        candidate = active.candidate if active is not None else None
        role = None if candidate is None else "live"
        if candidate is not None:
            self.evidence.begin(live.task, active.record)
        if version is not None:
            if version == live.version:
                return Route(live, role)
            if candidate is not None and version == candidate.version:
                return Route(candidate, "canary")
            served = [live.version, *([candidate.version] if candidate is not None else [])]
            raise VersionNotServed(version_not_served_detail(live.task, served, version))
        if candidate is None or not chosen(live.task, active.record.share, key):
            return Route(live, role)
        if active.record.mode == "canary":
            return Route(candidate, "canary")
        return Route(live, role, ShadowPair(candidate) if scored else None)

    def shadow(self, item: Pending) -> None:
        """Queue the candidate's scoring of live `item`, which has a `pair` (its pixels are copied now: a worker's
        slot is reused once the live answer is sent; decoded or encoded images are the request's own)."""
        c = item.pair.candidate
        pixels = item.pixels.copy() if isinstance(item.pixels, np.ndarray) else item.pixels
        if not self.shadows:
            self.oldest = item.arrived
        self.shadows.append(Pending(-1, pixels, c, c.slot, 1, c.classnames, c.text_features, item.arrived,
                                    serial=item.serial, role="shadow", pair=item.pair))

    def wait_s(self, now: float) -> float:
        """Seconds until a shadow forward is due (0: now; inf: nothing waits): once a full batch of rows waits (a
        forward's fixed cost is then spread the most), or the oldest has waited SHADOW_MAX_AGE_S."""
        if not self.shadows:
            return float("inf")
        if len(self.shadows) >= self.max_batch_size:
            return 0.0
        return max(0.0, self.oldest + SHADOW_MAX_AGE_S - now)

    def take(self) -> list[Pending]:
        batch, self.shadows = self.shadows[:self.max_batch_size], self.shadows[self.max_batch_size:]
        if self.shadows:
            self.oldest = self.shadows[0].arrived
        return batch
