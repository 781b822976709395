"""An HTTP worker process: uvicorn serving the app (app.py) on the connections the launcher hands it.

Started by the launcher, never by hand: the settings, the engine's address and input format, the
worker's index, its end of the launcher's connection channel and the counter page come in the
environment (balancer.py). It imports no model
(no torch): FastAPI, Pillow, numpy and ZeroMQ. SIGTERM is uvicorn's: stop accepting, let in-flight
requests finish for at most `drain_timeout_s` (what is still running then gets 503), then exit 0.
Connections are bounded per worker (http_edge.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys

import uvicorn

from service.balancer import CONNECTIONS_FD_ENV, TAKERS_FD_ENV, Takers, receive
from service.logs import configure_logging
from service.settings import settings_from_env
from service.transport import ENGINE_INFO_ENV, LAUNCHER_PID_ENV, WORKER_INDEX_ENV, engine_info_from_json

from .app import create_app
from .edge import RequestEdge, bounded_protocol
from .engine_client import EngineClient

CONNECT_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


class HandedConnections(uvicorn.Server):
    """uvicorn serving the connections the launcher hands over (balancer.py) instead of accepting any itself.

    Each one gets uvicorn's own HTTP protocol, as an accepted connection would; the worker says it takes
    connections once its app has started, and stops taking them when it drains."""

    def __init__(self, config: uvicorn.Config, channel: socket.socket, takers: Takers, index: int):
        super().__init__(config)
        self.channel = channel
        self.takers = takers
        self.index = index

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # the app's lifespan; no listening socket of its own
        if not self.started:
            return
        self.channel.setblocking(False)
        asyncio.get_running_loop().add_reader(self.channel.fileno(), self._take)
        self.takers.set(self.index, os.getpid())

    def _take(self) -> None:
        loop = asyncio.get_running_loop()
        connections = receive(self.channel)
        if connections is None:  # the launcher is gone: stop as on SIGTERM
            loop.remove_reader(self.channel.fileno())
            self.should_exit = True
            return
        for connection in connections:
            loop.create_task(self._open(connection))

    async def _open(self, connection: socket.socket) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(self._protocol, connection)
        except OSError as e:  # gone before it could be served
            log.debug("a connection handed over could not be served: %s", e)
            connection.close()

    def _protocol(self) -> asyncio.Protocol:
        return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                               app_state=self.lifespan.state)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.takers.set(self.index, 0)
        asyncio.get_running_loop().remove_reader(self.channel.fileno())
        await super().shutdown()


def main() -> None:
    settings = settings_from_env()
    index = int(os.environ[WORKER_INDEX_ENV])
    configure_logging(settings.log_level, settings.log_format, f"worker {index}")
    info = engine_info_from_json(os.environ[ENGINE_INFO_ENV])
    channel = socket.socket(fileno=int(os.environ[CONNECTIONS_FD_ENV]))
    takers = Takers(int(os.environ[TAKERS_FD_ENV]), settings.workers)

    async def connect() -> EngineClient:
        client = EngineClient(info, index, settings.worker_slots, int(os.environ[LAUNCHER_PID_ENV]))
        await client.start(CONNECT_TIMEOUT_S)
        return client

    config = uvicorn.Config(RequestEdge(create_app(settings, connect, takers.count)),
                            http=bounded_protocol(settings.max_connections), log_config=None,
                            log_level=settings.log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.drain_timeout_s, lifespan="on")
    server = HandedConnections(config, channel, takers, index)
    server.run()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else 3)  # skip interpreter finalisation: nothing is left to clean up


if __name__ == "__main__":
    main()
