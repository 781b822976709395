"""`training.fit --name` and `python -m training.publish`: a candidate is compared with the live set of each of its
tasks on the same test images, refused when worse by more than the tolerance (unless --force), and published
atomically, samples included, without touching any other set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmap_model import PromptSet
from mmap_model.promptset import serving
from training import fit
from training import publish as publish_cli
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOMAINS = ["sketch", "quickdraw"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), 4, domains=DOMAINS)


@pytest.fixture(scope="module")
def candidate(root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("candidates")
    (written,) = _fit(root, out, "--groups", "one", "--name", "doodles", "--samples", "2")
    return written


def _fit(root: Path, out: Path, *extra: str) -> list[Path]:
    return fit.main(["--data", str(root), "--pretrained", "none", "--threads", "1", "--shots", "1", "--batch-size", "8",
                     "--epochs", "1", "--quiet", "--out", str(out), *extra])


def _publish(*args: str | Path) -> dict:
    return publish_cli.main([str(a) for a in args] + ["--threads", "1"])


def test_fit_names_the_set_it_writes(candidate, root, tmp_path):
    assert candidate.name == "doodles" and PromptSet.load(candidate).name == "doodles"  # not "all"
    groups_file = tmp_path / "groups.json"
    groups_file.write_text(json.dumps({"groups": [["sketch"], ["quickdraw"]]}))
    written = _fit(root, tmp_path / "sets", "--groups", str(groups_file), "--name", "v2")
    assert sorted(p.name for p in written) == ["v2-quickdraw", "v2-sketch"]


def test_publish_into_an_empty_directory_then_refuse_a_worse_candidate(candidate, root, tmp_path, capsys):
    live = tmp_path / "live"
    first = _publish(candidate, "--to", live, "--data", root)
    assert first["published"] and first["replaces"] == [] and (live / "doodles" / "samples" / "sketch").is_dir()
    assert PromptSet.load(live / "doodles").version == PromptSet.load(candidate).version
    assert serving(live) == {"sketch": live / "doodles", "quickdraw": live / "doodles"}
    stamp = (live / "doodles" / "promptset.json").stat().st_mtime_ns

    # The same set again, demanding an improvement of 1 point (a negative tolerance): it is not better, so refused.
    with pytest.raises(SystemExit) as refused:
        _publish(candidate, "--to", live, "--data", root, "--tolerance", "-0.01")
    assert refused.value.code == 1
    decision = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert decision["published"] is False and len(decision["worse"]) == 2
    assert (live / "doodles" / "promptset.json").stat().st_mtime_ns == stamp  # nothing was written

    forced = _publish(candidate, "--to", live, "--data", root, "--tolerance", "-0.01", "--force")
    assert forced["published"] and forced["forced"] and forced["replaces"] == ["doodles"]


def test_publish_under_another_name_takes_over_the_tasks(candidate, root, tmp_path):
    live = tmp_path / "live"
    _publish(candidate, "--to", live, "--data", root)
    (live / "unrelated").mkdir()
    (live / "unrelated" / "notes.txt").write_text("not a prompt set: left alone")
    moved = _publish(candidate, "--to", live, "--data", root, "--name", "doodles-v2")
    assert moved["published"] and moved["replaces"] == ["doodles"]
    assert serving(live) == {"sketch": live / "doodles-v2", "quickdraw": live / "doodles-v2"}  # the newest publication
    assert (live / "doodles").is_dir() and (live / "unrelated" / "notes.txt").is_file()  # nothing else touched


def test_publish_refuses_what_is_not_a_prompt_set(root, tmp_path):
    with pytest.raises(SystemExit, match="is not a prompt set"):
        _publish(tmp_path, "--to", tmp_path / "live", "--data", root)


def _row(task: str, candidate: float, live: float | None) -> dict:
    """A row of publish.compare's table."""
    return {"task": task, "candidate": candidate, "test_images": 40, "live_set": None if live is None else "doodles",
            "live": live, "rows": [{"zero_shot": 0.5}]}


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_table_averages_each_side_on_its_own():
    """The candidate's mean and the live set's, side by side: never one mean of the two pooled (88.8 here)."""
    lines = publish_cli.markdown_table([_row("sketch", 0.804, 0.946), _row("quickdraw", 0.900, 0.900)]).splitlines()
    assert _cells(lines[0])[3:5] == ["candidate", "live"]
    (mean,) = [_cells(line) for line in lines if line.startswith("| **mean")]
    assert mean[3:5] == ["85.2", "92.3"] and mean[6] == "-7.1"


def test_a_task_without_a_live_set_leaves_the_live_mean_to_the_tasks_that_have_one():
    lines = publish_cli.markdown_table([_row("sketch", 0.80, 0.90), _row("quickdraw", 0.60, None)]).splitlines()
    means = [_cells(line) for line in lines if line.startswith("| **mean")]
    assert [m[3:5] for m in means] == [["70.0", ""], ["80.0", "90.0"]]  # all tasks; the one task with a live set
    assert "1 of 2 tasks" in means[1][0]


def test_the_printed_comparison_has_a_mean_per_side(candidate, root, tmp_path, capsys):
    live = tmp_path / "live"
    _publish(candidate, "--to", live, "--data", root)
    (other,) = _fit(root, tmp_path / "other", "--groups", "one", "--name", "doodles", "--seed", "1", "--steps", "1")
    capsys.readouterr()
    _publish(other, "--to", live, "--data", root, "--force")
    table = [_cells(line) for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    tasks = [row for row in table[1:] if not row[0].startswith("**")]  # after the header
    (mean,) = [row for row in table if row[0] == "**mean**"]
    assert sorted(row[0] for row in tasks) == sorted(DOMAINS)
    for column in (3, 4):  # the candidate's, then the live set's
        assert float(mean[column]) == pytest.approx(sum(float(row[column]) for row in tasks) / len(tasks), abs=0.051)


def test_a_rollout_from_publication_to_promotion(candidate, root, tmp_path, capsys):
    """--canary writes a record per task before the set (which then takes none of them), --status prints the records,
    --abort and --promote end it; a candidate needs a name of its own and a live set to roll out against."""
    live = tmp_path / "live"
    with pytest.raises(SystemExit, match="nothing in .* serves"):
        _publish(candidate, "--to", live, "--data", root, "--canary", "10")
    assert not live.exists() or not any(live.iterdir())
    _publish(candidate, "--to", live, "--data", root)
    with pytest.raises(SystemExit, match="a name of its own"):
        _publish(candidate, "--to", live, "--data", root, "--canary", "10")
    result = _publish(candidate, "--to", live, "--data", root, "--name", "doodles2", "--shadow", "100",
                      "--abort-below", "0.8")
    assert result["rollout"] == {"mode": "shadow", "share": 100.0, "tasks": ["quickdraw", "sketch"]}
    assert result["replaces"] == []
    assert serving(live, publish_cli.held_out(live)) == {"sketch": live / "doodles", "quickdraw": live / "doodles"}
    assert serving(live) == {"sketch": live / "doodles2", "quickdraw": live / "doodles2"}  # (what a record prevents)
    capsys.readouterr()
    rows = _publish("--to", live, "--status")["rollouts"]
    assert [(r["task"], r["record"]["candidate"], r["record"]["mode"]) for r in rows] == [
        ("quickdraw", "doodles2", "shadow"), ("sketch", "doodles2", "shadow")]
    assert "| sketch | doodles2 | shadow | 100 |" in capsys.readouterr().out
    # a broken record: --status says why, and --abort leaves it alone
    record = (live / "_rollouts" / "sketch.json").read_bytes()
    (live / "_rollouts" / "sketch.json").write_text("{")
    assert "not JSON" in _publish("--to", live, "--status")["rollouts"][1]["error"]
    assert _publish(candidate, "--to", live, "--name", "doodles2", "--abort") == {"abort": "doodles2",
                                                                                   "tasks": ["quickdraw"]}
    (live / "_rollouts" / "sketch.json").write_bytes(record)
    assert _publish(candidate, "--to", live, "--name", "doodles2", "--abort")["tasks"] == ["sketch"]
    with pytest.raises(SystemExit, match="no running rollout"):
        _publish(candidate, "--to", live, "--name", "doodles2", "--promote")
    assert serving(live, publish_cli.held_out(live)) == {"sketch": live / "doodles", "quickdraw": live / "doodles"}
    _publish(candidate, "--to", live, "--data", root, "--name", "doodles2", "--canary", "10")
    assert _publish(candidate, "--to", live, "--name", "doodles2", "--promote")["tasks"] == ["quickdraw", "sketch"]
    assert serving(live, publish_cli.held_out(live)) == {"sketch": live / "doodles2", "quickdraw": live / "doodles2"}
    assert not list((live / "_rollouts").iterdir())
