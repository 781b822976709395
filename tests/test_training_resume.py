"""Checkpoints: optimiser state survives the trip through safetensors, and a run killed mid-way
and resumed with `--resume` ends with exactly the prompts of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmap_model.promptset import WEIGHTS_FILE
from training import fit
from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
)
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01),
                                  lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)])
def test_optimizer_state_round_trip(make):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = make(params)
    for _ in range(3):
        opt.zero_grad()
        sum((p ** 2).sum() for p in params).backward()
        opt.step()
    tensors, meta = optimizer_to_flat(opt)
    json.dumps(meta)  # everything that is not a tensor is plain JSON
    copy = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = make(copy)
    optimizer_from_flat(restored, tensors, json.loads(json.dumps(meta)))
    for o in (opt, restored):  # one more identical step on both
        o.zero_grad()
        sum((p ** 2).sum() for p in o.param_groups[0]["params"]).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, copy, strict=True))


def _args(root: Path, out: Path) -> list[str]:
    return ["--data", str(root), "--tasks", "sketch,photo", "--pretrained", "none", "--threads", "1", "--groups", "one",
            "--shots", "2", "--batch-size", "8", "--epochs", "4", "--lr", "0.01", "--quiet", "--out", str(out)]


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    root = prepare_synthetic(tmp_path / "syn", 4, domains=["sketch", "photo"])
    fit.main(_args(root, tmp_path / "straight"))

    interrupted = tmp_path / "interrupted"
    run_dir = tmp_path / "interrupted.run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "training.fit", *_args(root, interrupted)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run_dir) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # no clean-up, as in a preempted job
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    _, meta = load_checkpoint(latest_checkpoint(run_dir))
    assert meta["step"] < meta["total_steps"] and not interrupted.exists()  # really cut short

    fit.main([*_args(root, interrupted), "--resume"])
    a = load_file(tmp_path / "straight" / "all" / WEIGHTS_FILE)
    b = load_file(interrupted / "all" / WEIGHTS_FILE)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical, not merely close
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # rows written after the checkpoint by the killed run were dropped


def test_resume_refuses_a_different_run(tmp_path):
    root = prepare_synthetic(tmp_path / "syn", 3, domains=["sketch"])
    base = ["--data", str(root), "--pretrained", "none", "--threads", "1", "--groups", "one", "--shots", "1",
            "--batch-size", "8",
            "--steps", "1", "--quiet", "--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "r")]
    fit.main(base)
    with pytest.raises(SystemExit, match="batch_size"):  # a one-line error, not a traceback
        fit.main([*base, "--batch-size", "4", "--resume", "--overwrite"])
    with pytest.raises(SystemExit, match="train_data differs"):  # same settings, other training images
        fit.main([*base, "--split-seed", "5", "--resume", "--overwrite"])
