"""An HTTP worker process: uvicorn serving the app (app.py) on the socket the launcher bound.

Started by the launcher, never by hand: the settings, the engine's address and input format, the
worker's index and the inherited listening socket come in the environment. It imports no model
(no torch): FastAPI, Pillow, numpy and ZeroMQ. SIGTERM is uvicorn's: stop accepting, let in-flight
requests finish for at most `drain_timeout_s` (what is still running then gets 503), then exit 0.
Connections are bounded per worker (http_edge.py).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import uvicorn

from .app import create_app
from .engine_client import EngineClient
from .http_edge import RequestEdge, bounded_protocol
from .logs import configure_logging
from .settings import settings_from_env
from .transport import ENGINE_INFO_ENV, LAUNCHER_PID_ENV, LISTEN_FD_ENV, WORKER_INDEX_ENV, engine_info_from_json

CONNECT_TIMEOUT_S = 60.0


def main() -> None:
    settings = settings_from_env()
    index = int(os.environ[WORKER_INDEX_ENV])
    configure_logging(settings.log_level, settings.log_format, f"worker {index}")
    info = engine_info_from_json(os.environ[ENGINE_INFO_ENV])
    listener = socket.socket(fileno=int(os.environ[LISTEN_FD_ENV]))

    async def connect() -> EngineClient:
        client = EngineClient(info, index, settings.worker_slots, int(os.environ[LAUNCHER_PID_ENV]))
        await client.start(CONNECT_TIMEOUT_S)
        return client

    config = uvicorn.Config(RequestEdge(create_app(settings, connect)), http=bounded_protocol(settings.max_connections),
                            log_config=None, log_level=settings.log_level, access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.drain_timeout_s, lifespan="on")
    server = uvicorn.Server(config)
    server.run(sockets=[listener])
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if server.started else 3)  # skip interpreter finalisation: nothing is left to clean up


if __name__ == "__main__":
    main()
