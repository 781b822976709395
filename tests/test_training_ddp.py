"""Data parallel: `torchrun --nproc_per_node 2` (gloo, CPU) follows the one-process run at the same
global batch.

Every rank draws the same global batch (indices and augmentation) and keeps half of it; DDP
averages the gradients, which equals the one-process gradient up to float summation order. The
stated tolerance: after 6 AdamW steps every prompt tensor agrees to 1e-5 absolute (measured
differences are ~1e-7; AdamW normalises updates, so differences grow roughly linearly in steps,
not exponentially). A wrong sharding or a missing gradient average breaks this by orders of
magnitude (checked below against a run with half the global batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmap_model.promptset import WEIGHTS_FILE
from training import fit
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores

REPO = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5


def _args(root: Path, out: Path, batch: int) -> list[str]:
    return ["--data", str(root), "--pretrained", "none", "--threads", "1", "--groups", "one", "--shots", "2",
            "--batch-size", str(batch), "--steps", "6", "--lr", "0.01", "--quiet", "--out", str(out)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")
def test_two_processes_match_one_at_the_same_global_batch(tmp_path):
    root = prepare_synthetic(tmp_path / "syn", 4, domains=["sketch", "photo"])
    fit.main(_args(root, tmp_path / "one", 8))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "training.fit",
                           *_args(root, tmp_path / "two", 8)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = load_file(tmp_path / "one" / "all" / WEIGHTS_FILE)
    two = load_file(tmp_path / "two" / "all" / WEIGHTS_FILE)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"DDP vs one process: max |Δ| = {worst:.2e}")
    assert worst <= TOLERANCE, f"max |Δ| = {worst:.2e}"
    # The check has teeth: the one-process run with half the global batch is far off.
    fit.main(_args(root, tmp_path / "half", 4))
    half = load_file(tmp_path / "half" / "all" / WEIGHTS_FILE)
    assert max((one[k] - half[k]).abs().max().item() for k in one) > 100 * TOLERANCE
    prov = json.loads((tmp_path / "two" / "all" / "promptset.json").read_text())["provenance"]
    assert prov["world_size"] == 2 and prov["command"].startswith("torchrun --nproc_per_node=2 -m training.fit")
