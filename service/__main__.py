"""`python -m service [--host H] [--port P] [--prompts DIR] [--model NAME] ...`: run the service.

Every flag is a field of `Settings` and overrides its `MMAP_<FIELD>` environment variable. The
admin token is read from `MMAP_ADMIN_TOKEN` only: a command line is visible to every local user.
One uvicorn worker: the process owns the model; scale out with replicas, not workers.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import uvicorn
from pydantic import ValidationError

from .app import create_app
from .settings import Settings

SECRET_FIELDS = {"admin_token"}


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve MmAP-prompted CLIP over HTTP.")
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(),
                            help=f"{field.description} (env MMAP_{name.upper()}, default {field.default})")
    overrides = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        parser.error(str(e))


def _exit_after_drain(signum: int, frame: object) -> None:
    # Runs when uvicorn re-raises SIGTERM after its drain and the app's shutdown: all that is left is interpreter
    # finalisation, which garbage-collects the model's objects one by one (4 s here for the tiny model; longer
    # under load), time that counts against an orchestrator's grace period. Nothing is left to clean up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (at most drain_timeout_s), shuts the app
    # down, then re-raises the signal under the handler it found. With the default one, a clean drain would
    # still end as "killed by SIGTERM" (status 143), which orchestrators log as a crash; this one exits 0 at once.
    signal.signal(signal.SIGTERM, _exit_after_drain)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.drain_timeout_s)


if __name__ == "__main__":
    main()
