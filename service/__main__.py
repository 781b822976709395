"""`python -m service [--host H] [--port P] [--workers N] [--prompts DIR] [--model NAME] ...`: run the service.

Every flag is a field of `Settings` and overrides its `MMAP_<FIELD>` environment variable. The
admin token is read from `MMAP_ADMIN_TOKEN` only: a command line is visible to every local user.
The launcher (launcher.py) starts the engine process and the HTTP worker processes.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from .launcher import main as launch
from .settings import Settings

SECRET_FIELDS = {"admin_token"}


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve MmAP-prompted CLIP over HTTP.")
    for name, field in Settings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        default = field.default_factory() if field.default_factory else field.default
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, metavar=name.upper(),
                            help=f"{field.description} (env MMAP_{name.upper()}, default {default})")
    overrides = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> None:
    launch(parse_args(argv))


if __name__ == "__main__":
    main()
