"""`make run` serves the directory the README's `training.publish` publishes into, seeded with the demo sets."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mmap_model import EMBEDDED_PROMPTS_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_serves_where_the_readme_publishes(tmp_path):
    readme = (REPO / "README.md").read_text()
    published = {Path(m) for m in re.findall(r"python -m training\.publish \S+ --to (\S+)", readme)}
    plan = subprocess.run(["make", "-n", "run"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    served = {Path(m) for m in re.findall(r"-m service --prompts (\S+)", plan)}
    assert published and published == served, (published, served)

    seeded = tmp_path / "prompts"
    subprocess.run(["make", "-s", f"PROMPTS={seeded}", str(seeded)], cwd=REPO, check=True)
    demo = sorted(p.name for p in EMBEDDED_PROMPTS_DIR.iterdir() if (p / "promptset.json").is_file())
    assert demo and sorted(p.name for p in seeded.iterdir() if (p / "promptset.json").is_file()) == demo
    (seeded / demo[0] / "promptset.json").unlink()  # a user's directory, once there, is never seeded again
    subprocess.run(["make", "-s", f"PROMPTS={seeded}", str(seeded)], cwd=REPO, check=True)
    assert not (seeded / demo[0] / "promptset.json").exists()


def test_the_readmes_curl_example_sends_a_shipped_sample_of_the_task_it_names():
    readme = (REPO / "README.md").read_text()
    examples = re.findall(r"curl -F file=@(\S+) \\\s+'http://127\.0\.0\.1:8000/classify\?task=(\w+)", readme)
    assert examples
    for path, task in examples:
        assert (REPO / path).is_file(), path
        assert Path(path).parent.name == task and Path(path).parent.parent.name == "samples", path
