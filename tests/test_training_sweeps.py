"""`training.frontier` and `training.fewshot` run end to end (sharded and merged) on a tiny random backbone."""

from __future__ import annotations

import json

import pytest

from training import fewshot, frontier, sweep
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = ["--tasks", "sketch,photo", "--pretrained", "none", "--steps", "1", "--batch-size", "8", "--seeds", "0,1",
          "--lr-grid", "0.003,0.03", "--finetune-lr-grid", ""]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), 5, domains=["sketch", "photo"])


def test_pareto_keeps_the_points_nothing_dominates():
    points = [(100, 0.80), (200, 0.85), (150, 0.79), (200, 0.84), (400, 0.85), (50, 0.70)]
    assert frontier.pareto(points) == [True, True, False, False, False, True]


def test_goal_is_the_best_mmap_row_within_a_tenth_of_the_references_parameters():
    def row(method, prompt_method, structure, params, mean, pareto=False):
        return {"method": method, "prompt_method": prompt_method, "structure": structure, "params": params,
                "mean": mean, "pareto": pareto}

    summary = [row(frontier.GOAL_REFERENCE, "maple", "group+task", 1000, 0.91),
               row("a", "mmap", "group+task", 100, 0.89, True), row("b", "mmap", "group+task", 101, 0.95),
               row("c", "mmap", "MT", 50, 0.93), row("d", "mmap", "group+task", 60, 0.88)]
    g = frontier.goal(summary)
    assert (g["mmap"], g["met"], g["on_frontier"]) == ("a", False, True)
    assert abs(g["gap_points"] - 2.0) < 1e-9
    assert frontier.goal(summary[1:]) is None


def test_shards_are_disjoint_keep_groups_together_and_cover_everything():
    items = [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("c", 5), ("c", 6), ("d", 7)]
    parts = [sweep.shard(items, (k, 3), key=lambda x: x[0]) for k in range(3)]
    assert sorted(x for part in parts for x in part) == sorted(items)
    for part in parts:
        assert all(all(y in part for y in items if y[0] == x[0]) for x in part)
    assert sorted(len(p) for p in parts) == [2, 2, 3]


def test_frontier_sharded_and_merged(root, tmp_path):
    out = tmp_path / "frontier"
    argv = ["--data", str(root), *COMMON, "--shots", "1", "--sizes", "2,4", "--ranks", "1,2", "--source-divisors", "1",
            "--prompt-methods", "mmap,coop", "--out", str(out)]
    for k in range(2):
        assert frontier.main([*argv, "--shard", f"{k}/2"]) is None
    summary = frontier.main([*argv, "--report"])
    labels = {s["method"] for s in summary}
    assert labels == {f"{m} {st} n={n}{' r=1' if m == 'MmAP' else ''}" for m in ("MmAP", "CoOp")
                      for st in ("MT", "group+task") for n in (2, 4)} | {"MmAP MT n=2 r=2", "MmAP group+task n=2 r=2"}
    by = {s["method"]: s for s in summary}
    assert all(len(s["seeds"]) == 2 for s in summary)
    # One lr selection per method and structure, shared by its sizes; each rank variant selects its own.
    assert by["CoOp MT n=2"]["lr"] == by["CoOp MT n=4"]["lr"] and by["CoOp MT n=2"]["lr"] in (0.003, 0.03)
    assert by["MmAP group+task n=2 r=2"]["params"] > by["MmAP group+task n=2 r=1"]["params"]
    # The ViT-B/16 column: the paper's 4 tasks in 2 groups, 6 modules of J = 9 layers, each layer
    # n·r·d_s + r·(d_t + d_v)/d_s with d_t = 512, d_v = 768, d_s = gcd = 256.
    assert by["MmAP group+task n=4 r=1"]["paper"]["params"] == 6 * 9 * (4 * 256 + (512 + 768) // 256)
    assert by["MmAP MT n=2 r=2"]["paper"]["params"] == 1 * 9 * (2 * 2 * 256 + 2 * (512 + 768) // 256)
    front = [s for s in summary if s["pareto"]]
    assert front and all(not (o["params"] <= f["params"] and o["mean"] > f["mean"]) for f in front for o in summary)
    assert sum(1 for s in summary if s.get("best_in_budget")) == 2  # one per method, all rows within budget here
    table = (out / "frontier.md").read_text()
    assert "| MmAP MT n=2 r=2 |" in table and "x paper budget" in table
    written = json.loads((out / "frontier.json").read_text())
    assert written["paper_budget"] == frontier.PAPER_BUDGET and written["goal"] is None  # MaPLe was not run
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_frontier_shards_need_a_data_root(tmp_path):
    with pytest.raises(SystemExit):
        frontier.main([*COMMON, "--shard", "0/2", "--out", str(tmp_path)])


@pytest.mark.slow
def test_fewshot_curves_per_shot_count(root, tmp_path):
    out = tmp_path / "fewshot"
    summary = fewshot.main(["--data", str(root), *COMMON, "--seeds", "0", "--shots-list", "1,2", "--warmup-steps", "1",
                            "--probe-steps", "1", "--out", str(out)])
    assert {(s["method"], s["shots"]) for s in summary} == {(m, k) for m in fewshot.CURVE_METHODS for k in (1, 2)}
    results = json.loads((out / "shard-0" / "2" / "results.json").read_text())
    assert {r["method"] for r in results["rows"]} == set(fewshot.CURVE_METHODS)
    assert set(results["settings"]["lr_selection_on_val"]) == {"CoOp-MT", "MaPLe-MT", "MmAP-MT"}  # per shot count
    table = (out / "fewshot.md").read_text()
    assert "| 1 shot | 2 shots |" in table and "| linear probe |" in table
    assert (out / "fewshot.png").read_bytes()[:4] == b"\x89PNG"
