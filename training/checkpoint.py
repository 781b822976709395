"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is `checkpoint-<step>.safetensors` + `checkpoint-<step>.json`, written atomically
(temporary file, then rename; the JSON last, and it records the sha256 of the tensor file), so a
process killed mid-write leaves the previous checkpoint as the latest complete one.

Tensor names: `param.<name>` (trainable parameters), `optim.<index>.<key>` (per-parameter
optimiser state, e.g. AdamW's `exp_avg`, `exp_avg_sq`, `step`), `rng.torch` and `rng.cuda.<i>`
(generator states). Non-tensor optimiser state, parameter groups, scheduler and grad-scaler
state are plain numbers and go to the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from .errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be resumed from (missing, corrupt, or from a different run)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split `optimizer.state_dict()` into tensors and JSON-able metadata."""
    state = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{key}"] = value.detach().to("cpu", copy=True)  # a snapshot, not a view
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{**g, **({"betas": tuple(g["betas"])} if "betas" in g else {})} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return out


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint atomically and prune all but the `keep` newest. Returns the JSON path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    stem = f"checkpoint-{step:08d}"
    _atomic_write(run_dir / f"{stem}.safetensors", blob)
    meta = {**meta, "step": step, "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    _atomic_write(run_dir / f"{stem}.json", json.dumps(meta, indent=1).encode())
    for old in sorted(run_dir.glob("checkpoint-*.json"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return run_dir / f"{stem}.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted(run_dir.glob("checkpoint-*.json")) if run_dir.is_dir() else []
    return found[-1] if found else None


def load_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, meta) of a checkpoint JSON path; verifies the tensor file's sha256."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    meta = json.loads(path.read_text())
    blob = path.with_suffix(".safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise CheckpointError(f"{path}: tensor file does not match its sha256 (truncated or replaced)")
    return load_safetensors(blob), meta
