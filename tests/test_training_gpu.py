"""Training on CUDA: mixed precision and the nccl process group. `gpu`-marked: skipped without CUDA
(bench/gpu_check.sh runs them on a GPU host).

The runs are those of the unseen-domain test (the embedded backbone, 40 steps on the domains it never
saw), so accuracy means something. Stated tolerances:
- bf16/fp16 autocast must reach the fp32 run's mean test accuracy within 0.10 and beat zero-shot by
  0.05. Not an element-wise bound on the prompts: low-precision matmuls change every gradient slightly
  and AdamW turns sign flips of tiny components into full-size steps, so that would measure AdamW.
- `torchrun --nproc_per_node 1` (nccl) must match the plain one-process CUDA run to 1e-4 absolute:
  same device, same global batch, the all-reduce of one rank is the identity; what remains is CUDA's
  non-deterministic reductions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmap_model import PromptSet
from mmap_model.promptset import WEIGHTS_FILE
from training import fit, synthetic
from training.data import prepare_synthetic
from training.pretrain import SEEN_DOMAINS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parent.parent
UNSEEN = [d for d in synthetic.DOMAINS if d not in SEEN_DOMAINS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), 16, domains=UNSEEN, seed=7)


def _args(root: Path, out: Path, amp: str) -> list[str]:
    return ["--data", str(root), "--groups", "one", "--shots", "8", "--batch-size", "16", "--steps", "40",
            "--device", "cuda", "--amp", amp, "--quiet", "--out", str(out)]


@pytest.fixture(scope="module")
def fp32(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp32") / "sets"
    fit.main(_args(root, out, "off"))
    return out / "all"


def _mean_accuracy(evaluation: dict, key: str = "accuracy") -> float:
    return sum(evaluation[key][t] for t in UNSEEN) / len(UNSEEN)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_training_follows_fp32(root, fp32, tmp_path, amp):
    fit.main(_args(root, tmp_path / "sets", amp))
    reference, mixed = PromptSet.load(fp32), PromptSet.load(tmp_path / "sets" / "all")
    ref_acc, acc = _mean_accuracy(reference.evaluation), _mean_accuracy(mixed.evaluation)
    zero_shot = _mean_accuracy(reference.evaluation, "zero_shot")
    print(f"{amp}: mean test accuracy {acc:.3f} vs fp32 {ref_acc:.3f} (zero-shot {zero_shot:.3f})")
    assert abs(acc - ref_acc) <= 0.10 and acc > zero_shot + 0.05


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_nccl_process_group_matches_the_plain_cuda_run(root, fp32, tmp_path):
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "1", "-m", "training.fit",
                           *_args(root, tmp_path / "nccl", "off")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, ddp = load_file(fp32 / WEIGHTS_FILE), load_file(tmp_path / "nccl" / "all" / WEIGHTS_FILE)
    worst = max((one[k] - ddp[k]).abs().max().item() for k in one)
    print(f"nccl (world size 1) vs plain CUDA run: max |Δ| = {worst:.2e}")
    assert worst <= 1e-4
    provenance = PromptSet.load(tmp_path / "nccl" / "all").provenance
    assert provenance["world_size"] == 1 and provenance["command"].startswith("torchrun")
