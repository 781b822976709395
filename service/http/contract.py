"""What an HTTP worker's app needs of its engine: one interface, two transports. `EngineClient`
(engine_client.py: shared memory + ZeroMQ to the engine process) and the Ray Serve ingress's client
(deploy/ray/serve_app.py: a DeploymentHandle to engine replicas) both implement it, and
tests/test_engine_contract.py runs the same checks through both."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from service.schema import TaskInfo
from service.transport import Embedded, EngineInfo, Operation, Reply, Scored

from .engine_client import CatalogView


class EngineConnection(Protocol):
    info: EngineInfo
    worker: int | str  # which worker or replica this is (the x-mmap-worker header)
    catalog: CatalogView  # the engine's catalog, kept current
    down: bool  # the engine cannot be reached: requests get 503 engine_unavailable at once

    @property
    def tasks(self) -> dict[str, TaskInfo]: ...

    def incoming(self) -> AbstractContextManager[None]:
        """Around the reading and decoding of an upload: the engine may wait for it to fill a batch."""

    async def infer(self, pixels: np.ndarray | bytes, task: str, top_k: int, timeout_s: float,
                    labels: list[str] | None = None, embed: bool = False, version: str | None = None,
                    key: str | None = None) -> Scored | Embedded:
        """One image scored (or embedded); the engine's refusals raise ServiceError with their status. `version`
        pins the task's version, `key` picks a rollout's (service/engine/rollouts.py)."""

    async def call(self, op: Operation, timeout_s: float = 120.0) -> Reply:
        """An operation off the hot path; refusals raise ServiceError."""

    async def close(self) -> None: ...
