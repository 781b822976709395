"""`python -m training.bench` runs every method end to end and writes its table, plot and raw rows."""

from __future__ import annotations

import json

import pytest

from training import bench
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores


@pytest.mark.slow
def test_bench_runs_every_method_with_lr_selection(tmp_path):
    root = prepare_synthetic(tmp_path / "syn", 4, domains=["sketch", "photo"])
    out = tmp_path / "bench"
    summary = bench.main(["--data", str(root), "--pretrained", "none", "--shots", "1", "--steps", "2",
                          "--batch-size", "8", "--seeds", "0,1", "--warmup-steps", "1", "--probe-steps", "1",
                          "--lr-grid", "0.003,0.03", "--finetune-lr-grid", "", "--out", str(out)])
    labels = bench.DEFAULT_METHODS
    assert [s["method"] for s in summary] == labels
    results = json.loads((out / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in results["rows"]] == [(m, s) for s in (0, 1) for m in labels]
    prompt_methods = [m for m in labels if bench.METHOD_SPECS[m].runner == "prompts"]
    assert set(results["settings"]["lr_selection_on_val"]) == set(prompt_methods)  # selected once, on seed 0
    for row in results["rows"]:
        if row["method"] in prompt_methods:
            assert row["lr"] in (0.003, 0.03)
    by_method = {s["method"]: s for s in summary}
    assert by_method["zero-shot"]["params"] == 0 and by_method["zero-shot"]["std"] == 0.0  # same test split every seed
    assert by_method["MmAP one group"]["params"] > by_method["MmAP-ST"]["params"] > 0
    assert by_method["full fine-tuning-MT"]["params_pct"] > 1 > by_method["MmAP-MT"]["params_pct"]
    table = (out / "table.md").read_text()
    assert all(f"| {m} |" in table for m in labels) and "sketch" in table and "± " in table
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_takes_fraction_and_needs_a_validation_split(tmp_path):
    root = prepare_synthetic(tmp_path / "syn", 4, domains=["sketch"])
    common = ["--data", str(root), "--pretrained", "none", "--steps", "1", "--batch-size", "8", "--seeds", "0",
              "--methods", "zero-shot", "--lr-grid", "", "--finetune-lr-grid", "", "--out", str(tmp_path / "b")]
    summary = bench.main([*common, "--fraction", "0.5"])  # used to clash with the benchmark's default --shots
    assert [s["method"] for s in summary] == ["zero-shot"]
    with pytest.raises(SystemExit):
        bench.main([*common, "--val-fraction", "0"])
