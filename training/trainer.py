"""The multi-task training loop, shared by every method that trains by gradient steps.

Per optimiser step, `accum` micro-steps; per micro-step, a mini-batch of `batch_size` images
from EVERY task (each task cycles its own shuffled stream, so small tasks repeat sooner) and the
loss of `MultiTaskObjective` (sum over tasks of each task's cross-entropy). Only parameters with
`requires_grad` train: the prompt modules for prompt methods, the image tower for full
fine-tuning. An epoch is `ceil(largest task / (batch_size * accum))` optimiser steps.

- Optimiser: AdamW (default) or SGD with momentum; linear warm-up then cosine decay to
  `min_lr_ratio` · lr, stepped per optimiser step. Factors that scale prompts (MmAP's Kronecker
  factors) are never weight-decayed and train at `factor_lr_scale` · lr (default: the same lr).
- Mixed precision on GPU: autocast bf16 (default where supported) or fp16 with a grad scaler;
  parameters stay fp32.
- Data parallel: under `torchrun` the objective is wrapped in DistributedDataParallel
  (gloo on CPU, nccl on GPU). `batch_size` is GLOBAL: every rank draws the same global batch
  of a task (same indices, same augmentation) and keeps its contiguous 1/world share, and DDP
  averages the gradients — so N processes follow the single-process run up to float reduction
  order (`tests/test_training_ddp.py` states the tolerance).
- Determinism: batch order and augmentation are functions of (seed, task, micro-step), not of
  a global RNG, which is also what makes `--resume` exact.
- Every epoch: validation accuracy per task, a checkpoint (see `training.checkpoint`) and a
  metrics row; `metrics.jsonl` in the run directory gets a row every `log_every` steps too.
- Modules stay in eval mode: the backbone is frozen (or, for full fine-tuning, has no dropout
  or batch norm), so there is no train-mode behaviour to switch on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from mmap_model.prompts import PromptModule

from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from .classifiers import MultiTaskObjective, accuracy
from .data import ImageSet, TaskSampler, augment_params, generator_for, warp
from .dist import DistInfo, all_reduce_sum, barrier

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)  # built by keyword only: a reordered field cannot shift values
class TrainConfig:
    """Hyper-parameters of a training run (all of it goes into checkpoints and provenance)."""

    # Each field is a command-line flag (training/cli.py: `--<field-name>` unless `flag` says otherwise).
    epochs: int = field(default=10, metadata={"help": "passes over the training images"})
    steps: int | None = field(default=None, metadata={"help": "total optimiser steps (overrides --epochs)",
                                                       "type": int})
    batch_size: int = field(default=32, metadata={"help": "images per task per micro-step (global over ranks)"})
    accum: int = field(default=1, metadata={"help": "gradient accumulation: micro-steps per optimiser step"})
    optimizer: str = field(default="adamw", metadata={"choices": ["adamw", "sgd"],
                                                      "help": "AdamW, or SGD with --momentum"})
    # AdamW's rate; the benchmark's validation sweep (docs/benchmarks.md) picked it for prompts
    lr: float = field(default=1e-2, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW/SGD weight decay (never on MmAP's K factors)"})
    factor_lr_scale: float = field(default=1.0, metadata={"help": "learning rate of the prompt-scaling factors "
                                                                  "(MmAP's K factors) as a multiple of --lr"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    warmup_fraction: float = field(default=0.1, metadata={"flag": "--warmup",
                                                          "help": "linear warm-up as a fraction of the steps"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "cosine floor as a fraction of --lr"})
    grad_clip: float | None = field(default=None, metadata={"help": "clip the gradient norm to this", "type": float})
    amp: str = field(default="auto", metadata={"choices": ["auto", "bf16", "fp16", "off"],
                                               "help": "mixed precision (auto: bf16 on GPU when supported)"})
    augment: bool = field(default=True, metadata={"flag": "--no-augment", "help": "no augmentation at all"})
    # 1 = flip only; random crops cost ~2 points on the synthetic 48 px benchmark
    crop_scale: float = field(default=1.0, metadata={"help": "random crops down to this share of the side "
                                                             "(1 = flip only)"})
    seed: int = field(default=0, metadata={"help": "seed of the prompts' initialisation, shots and batches"})
    eval_batch_size: int = field(default=256, metadata={"help": "images per forward when scoring"})
    log_every: int = field(default=10, metadata={"help": "optimiser steps between metrics.jsonl lines"})
    keep_checkpoints: int = field(default=2, metadata={"help": "epoch checkpoints kept in the run directory"})

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.batch_size < 1 or self.accum < 1 or self.epochs < 1 or (self.steps is not None and self.steps < 1):
            raise ValueError("batch_size, accum, epochs and steps must be >= 1")
        if not 0 <= self.warmup_fraction < 1 or not 0 < self.crop_scale <= 1:
            raise ValueError("need 0 <= warmup_fraction < 1 and 0 < crop_scale <= 1")
        if not self.factor_lr_scale > 0:
            raise ValueError("factor_lr_scale must be > 0")


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    epochs: int
    train_seconds: float  # time in optimiser steps (no validation, no checkpoints)
    images_per_second: float  # training images per second over all ranks
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a setting on a device (None = full fp32)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast_factory(amp: str, device: torch.device) -> Callable:
    dtype = amp_dtype(amp, device)
    return partial(torch.autocast, device.type, dtype=dtype) if dtype is not None else nullcontext


def lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class PhaseProgress:
    """Progress lines of a phase that has no epoch bar (`grouping: affinity (cosine): step 3/10 (1.2 s)`): the last
    step always, the others at most one per `every` seconds, so a slow phase is never silent and a fast one is not
    noisy. Nothing when not `enabled` (--quiet, or a rank other than 0)."""

    def __init__(self, label: str, total: int, enabled: bool = True, every: float = 3.0, unit: str = "step"):
        self.label, self.total, self.enabled, self.every, self.unit = label, total, enabled, every, unit
        self.start = self.last = time.perf_counter()

    def note(self, text: str) -> None:
        """One line about the phase (what it is about to do, or what it found)."""
        if self.enabled:
            tqdm.write(f"{self.label}: {text}")

    def step(self, done: int) -> None:
        """`done` of the `total` steps are finished."""
        now = time.perf_counter()
        if self.enabled and (done == self.total or now - self.last >= self.every):
            self.last = now
            tqdm.write(f"{self.label}: {self.unit} {done}/{self.total} ({now - self.start:.1f} s)")


class Trainer:
    """Trains the trainable parameters of a `MultiTaskObjective` on per-task image sets."""

    def __init__(self, objective: MultiTaskObjective, train_sets: Mapping[str, ImageSet], cfg: TrainConfig,
                 val_sets: Mapping[str, ImageSet] | None = None, run_dir: Path | None = None,
                 dist: DistInfo | None = None, progress: bool = True, label: str = ""):
        """`label` names the phase in the progress output (`grouping: epoch 1/2`), for commands that train
        more than once."""
        self.cfg, self.dist = cfg, dist or DistInfo()
        self.label = f"{label}: " if label else ""
        if cfg.batch_size % self.dist.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the world size {self.dist.world}")
        self.objective = objective.to(self.dist.device)
        self.model: torch.nn.Module = objective
        if self.dist.active:
            self.model = DistributedDataParallel(
                objective, device_ids=[self.dist.device.index] if self.dist.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.train_sets = dict(train_sets)
        self.val_sets = {t: s for t, s in (val_sets or {}).items() if len(s)}  # --val-fraction 0: no val metrics
        self.run_dir, self.progress = run_dir, progress and self.dist.main
        self.params = {n: p for n, p in objective.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the objective has no trainable parameters")
        self.samplers = {t: TaskSampler(len(s), cfg.seed, t) for t, s in self.train_sets.items()}
        largest = max(len(s) for s in self.train_sets.values())
        self.steps_per_epoch = max(1, math.ceil(largest / (cfg.batch_size * cfg.accum)))
        self.total_steps = cfg.steps or cfg.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.optimizer = self._make_optimizer()
        warmup = round(cfg.warmup_fraction * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, partial(lr_lambda, total=self.total_steps, warmup=warmup, min_ratio=cfg.min_lr_ratio))
        self.autocast = autocast_factory(cfg.amp, self.dist.device)
        self.scaler = torch.amp.GradScaler(self.dist.device.type,
                                           enabled=amp_dtype(cfg.amp, self.dist.device) == torch.float16)
        self.step = 0

    def _make_optimizer(self) -> torch.optim.Optimizer:
        params: list[Any] = list(self.params.values())
        if self.cfg.weight_decay or self.cfg.factor_lr_scale != 1.0:
            # Factors that scale prompts (mmap's Kronecker factors) are never decayed, and take their own lr.
            factors = {f"{name}.{tensor}" for name, module in self.objective.named_modules()
                       if isinstance(module, PromptModule) for tensor in module.no_weight_decay}
            params = [{"params": [p for n, p in self.params.items() if n not in factors]},
                      {"params": [p for n, p in self.params.items() if n in factors], "weight_decay": 0.0,
                       "lr": self.cfg.lr * self.cfg.factor_lr_scale}]
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                   weight_decay=self.cfg.weight_decay)
        return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    # -- data ---------------------------------------------------------------------------------

    def batch(self, task: str, micro: int) -> tuple[Tensor, Tensor]:
        """This rank's share of micro-step `micro`'s global batch of a task."""
        b, world, rank = self.cfg.batch_size, self.dist.world, self.dist.rank
        indices = self.samplers[task].take(micro * b, b)
        local = slice(rank * b // world, (rank + 1) * b // world)
        images, labels = self.train_sets[task].batch(indices[local])
        if self.cfg.augment:
            # Parameters drawn for the whole global batch, then sliced: identical on every rank.
            theta = augment_params(b, generator_for(self.cfg.seed, task, micro, "augment"), self.cfg.crop_scale)
            images = warp(images, theta[local])
        return images.to(self.dist.device, non_blocking=True), labels.to(self.dist.device, non_blocking=True)

    # -- checkpoints --------------------------------------------------------------------------

    @cached_property
    def _data_digest(self) -> str:
        """sha256 of the training images (domain/class/file names and labels, per task): a resume must
        see the same data, wherever the root is mounted."""
        digest = hashlib.sha256()
        for task, images in sorted(self.train_sets.items()):
            digest.update(json.dumps([task, ["/".join(f.parts[-3:]) for f in images.files],
                                      images.labels.tolist()]).encode())
        return digest.hexdigest()

    def _meta(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "total_steps": self.total_steps,
                "params": {n: list(p.shape) for n, p in self.params.items()}, "train_data": self._data_digest}

    def save(self, epoch: int) -> Path | None:
        if self.run_dir is None or not self.dist.main:
            return None
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer)
        tensors = {**{f"param.{n}": p for n, p in self.params.items()}, **opt_tensors, **rng_tensors()}
        meta = {**self._meta(), "epoch": epoch, "optimizer": opt_meta,
                "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"},
                "scaler": self.scaler.state_dict()}
        return save_checkpoint(self.run_dir, self.step, tensors, meta, self.cfg.keep_checkpoints)

    def resume(self, path: Path | str = "latest") -> int:
        """Restore parameters, optimiser, schedule, scaler and RNG; returns the step resumed at."""
        if path == "latest":
            found = latest_checkpoint(self.run_dir) if self.run_dir else None
            if found is None:
                raise CheckpointError(f"--resume: no checkpoint in {self.run_dir}")
            path = found
        tensors, meta = load_checkpoint(Path(path))
        mine = self._meta()
        for key in ("config", "total_steps", "params", "train_data"):
            if meta.get(key) != mine[key]:
                diff = {k: (meta[key].get(k), v) for k, v in mine[key].items() if meta[key].get(k) != v} \
                    if isinstance(mine[key], dict) and isinstance(meta.get(key), dict) else (meta.get(key), mine[key])
                raise CheckpointError(f"{path}: checkpoint is from a different run ({key} differs: {diff})")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(tensors[f"param.{n}"])
        optimizer_from_flat(self.optimizer, tensors, meta["optimizer"])
        # The schedule is a plain function (not saved); LambdaLR wants one slot per group.
        self.scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        restore_rng(tensors)
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return self.step

    # -- the loop -----------------------------------------------------------------------------

    def _log(self, row: dict[str, Any]) -> None:
        if self.run_dir is not None and self.dist.main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def _trim_log(self) -> None:
        """After a resume, drop rows the interrupted run wrote past the checkpoint."""
        path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if path is None or not path.is_file() or not self.dist.main:
            return
        rows = [r for r in path.read_text().splitlines() if r.strip() and json.loads(r)["step"] <= self.step]
        path.write_text("".join(r + "\n" for r in rows))

    def apply_gradients(self) -> None:
        """Clip (optional), optimiser step, schedule step: the half of a step after backward."""
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1

    def train_step(self) -> tuple[Tensor, Tensor]:
        """One optimiser step; returns (per-task loss [T], per-task correct [T]) summed over ranks."""
        tasks = list(self.train_sets)
        self.optimizer.zero_grad(set_to_none=True)
        losses = torch.zeros(len(tasks))
        correct = torch.zeros(len(tasks))
        for a in range(self.cfg.accum):
            micro = self.step * self.cfg.accum + a
            batch = {t: self.batch(t, micro) for t in tasks}
            sync = nullcontext() if a == self.cfg.accum - 1 or not self.dist.active else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, task_losses, task_correct = self.model(batch)
                self.scaler.scale(loss / self.cfg.accum).backward()
            losses += task_losses.float().cpu() / self.cfg.accum
            correct += task_correct.float().cpu()
        self.apply_gradients()
        stats = all_reduce_sum(torch.stack([losses, correct]), self.dist)
        return stats[0] / self.dist.world, stats[1]

    def fit(self, resume: Path | str | None = None, until: int | None = None) -> TrainResult:
        """Train to `total_steps`, or to step `until` (from a checkpoint when `resume` is given)."""
        if resume is not None:
            self.resume(resume)
            self._trim_log()
        tasks = list(self.train_sets)
        seen_per_step = self.cfg.batch_size * self.cfg.accum * len(tasks)
        history: list[dict[str, Any]] = []
        train_seconds, steps_done = 0.0, 0
        for epoch in range(self.step // self.steps_per_epoch, self.epochs):
            end = min((epoch + 1) * self.steps_per_epoch, until or self.total_steps)
            if self.step >= end:
                break
            name = f"{self.label}epoch {epoch + 1}/{self.epochs}"
            bar = tqdm(total=end - self.step, desc=name, disable=not self.progress, leave=False, dynamic_ncols=True)
            sums = torch.zeros(2, len(tasks))
            n_steps = 0
            while self.step < end:
                start = time.perf_counter()
                losses, correct = self.train_step()
                train_seconds += time.perf_counter() - start
                sums[0] += losses
                sums[1] += correct
                n_steps += 1
                steps_done += 1
                acc = float(correct.sum()) / (self.cfg.batch_size * self.cfg.accum * len(tasks))
                bar.set_postfix(loss=f"{float(losses.sum()):.3f}", acc=f"{acc:.3f}")
                bar.update()
                if self.step % self.cfg.log_every == 0:
                    self._log({"kind": "step", "step": self.step, "epoch": epoch + 1,
                               "lr": self.scheduler.get_last_lr()[0], "loss": float(losses.sum()), "train_acc": acc})
            bar.close()
            row: dict[str, Any] = {"kind": "epoch", "step": self.step, "epoch": epoch + 1,
                                   "lr": self.scheduler.get_last_lr()[0]}
            if n_steps:
                row["loss"] = {t: float(v) / n_steps for t, v in zip(tasks, sums[0], strict=True)}
                row["train_acc"] = {t: float(v) / (n_steps * self.cfg.batch_size * self.cfg.accum)
                                    for t, v in zip(tasks, sums[1], strict=True)}
            if self.val_sets:
                row["val_acc"] = accuracy(self.objective.classifier, self.val_sets, self.cfg.eval_batch_size,
                                          self.dist, self.autocast)
            history.append(row)
            self._log(row)
            if self.progress:
                val = row.get("val_acc", {})
                mean_val = f" val {sum(val.values()) / len(val):.3f}" if val else ""
                tqdm.write(f"{name}: loss {sum(row.get('loss', {}).values()):.3f}{mean_val}")
            self.save(epoch + 1)
            barrier(self.dist)
        rate = steps_done * seen_per_step / train_seconds if train_seconds else 0.0
        return TrainResult(self.step, self.epochs, train_seconds, rate, history)
