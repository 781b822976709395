"""`python -m training.fit` end to end on a small synthetic root (random-weight backbone: fast).

What the service and users rely on: one prompt set per group in --out that loads with
`PromptSet.load`, carries its tasks' test accuracy and provenance, and `training.evaluate`
reproduces the recorded accuracy from the files alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmap_model import PromptSet
from mmap_model.promptset import WEIGHTS_FILE
from training import evaluate, fit
from training.data import prepare_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores

DOMAINS = ["sketch", "quickdraw", "photo"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), 4, domains=DOMAINS)


def _fit(root: Path, out: Path, *extra: str) -> list[Path]:
    return fit.main(["--data", str(root), "--pretrained", "none", "--threads", "1", "--shots", "1", "--batch-size", "8",
                     "--epochs", "1", "--quiet", "--out", str(out), *extra])


def test_one_prompt_set_per_group_loads_and_reproduces(root, tmp_path, tiny):
    groups_file = tmp_path / "groups.json"
    groups_file.write_text(json.dumps({"groups": [["sketch", "quickdraw"], ["photo"]]}))
    out = tmp_path / "sets"
    written = _fit(root, out, "--groups", str(groups_file), "--samples", "3")
    assert sorted(p.name for p in written) == ["photo", "sketch-quickdraw"]
    assert sorted(p.name for p in out.iterdir()) == ["photo", "sketch-quickdraw"]  # nothing else for the service
    pair = PromptSet.load(out / "sketch-quickdraw", tiny)
    single = PromptSet.load(out / "photo", tiny)
    assert pair.prompts.groups == {"sketch-quickdraw": ["sketch", "quickdraw"]}
    assert set(pair.tasks) == {"sketch", "quickdraw"} and set(single.tasks) == {"photo"}
    assert single.tasks["photo"].group is None and not single.prompts.group
    assert pair.tasks["sketch"].template == "a sketch of a {}."
    tensors = load_file(out / "sketch-quickdraw" / WEIGHTS_FILE)
    assert ({k.split(".")[0] + "." + k.split(".")[1] for k in tensors}
            == {"group.sketch-quickdraw", "task.sketch", "task.quickdraw"})
    prov = pair.provenance
    assert prov["command"].startswith("python -m training.fit --data") and prov["seed"] == 0
    assert (prov["code_version"] and prov["data"]["tasks"]["sketch"]["train"] == 40
            and prov["data"]["split"]["shots"] == 1)
    assert (set(pair.evaluation["accuracy"]) == {"sketch", "quickdraw"}
            and set(pair.evaluation["zero_shot"]) == {"sketch", "quickdraw"})
    samples = sorted((out / "photo" / "samples" / "photo").iterdir())
    assert len(samples) == 3 and all(p.suffix == ".png" for p in samples)
    # The recorded accuracy is reproducible from the directory alone.
    rows = evaluate.main(["--data", str(root), "--promptsets", str(out), "--threads", "1"])
    for r in rows:
        recorded = PromptSet.load(out / r["promptset"]).evaluation
        assert r["accuracy"] == pytest.approx(recorded["accuracy"][r["task"]], abs=1e-9)
        assert r["zero_shot"] == pytest.approx(recorded["zero_shot"][r["task"]], abs=1e-9)
        # ... and so is its calibration, with the temperature the set carries
        calibration = recorded["calibration"][r["task"]]
        assert r["temperature"] == calibration["temperature"] == PromptSet.load(out / r["promptset"]).tasks[
            r["task"]].temperature
        for key in ("nll", "nll_calibrated", "ece", "ece_calibrated"):
            assert r[key] == pytest.approx(calibration[key], abs=1e-6)
    run_dir = out.with_name("sets.run")
    assert (run_dir / "metrics.jsonl").is_file() and list(run_dir.glob("checkpoint-*.json"))
    assert (run_dir / "reliability.png").stat().st_size > 0


def test_fit_calibrates_every_task_on_validation(root, tmp_path, tiny):
    """Each task gets a temperature fitted on its validation split: the NLL on validation can only fall, the test
    accuracy is the uncalibrated one, and the model card reports before and after."""
    out = tmp_path / "sets"
    _fit(root, out, "--groups", "one", "--steps", "2", "--target-precision", "0.5")
    ps = PromptSet.load(out / "all", tiny)
    for task, spec in ps.tasks.items():
        card = ps.card(task)["evaluation"]["calibration"]
        assert spec.temperature == card["temperature"] > 0 and card["val_images"] > 0
        assert card["accuracy_calibrated"] == card["accuracy"] == ps.evaluation["accuracy"][task]
        assert {"nll", "nll_calibrated", "ece", "ece_calibrated"} <= set(card)
        assert spec.min_score == card["min_score"] and (spec.min_score is None or 0 <= spec.min_score <= 1)
    meta = json.loads((out / "all" / "promptset.json").read_text())
    assert all("temperature" in t for t in meta["tasks"].values())
    plain = _fit(root, tmp_path / "plain", "--groups", "one", "--steps", "2", "--no-calibrate")[0]
    uncalibrated = PromptSet.load(plain, tiny)
    assert all(s.temperature == 1.0 and s.min_score is None for s in uncalibrated.tasks.values())
    assert "calibration" not in uncalibrated.evaluation
    assert uncalibrated.prompts.state_dict().keys() == ps.prompts.state_dict().keys()
    with pytest.raises(SystemExit):
        _fit(root, tmp_path / "bad", "--groups", "one", "--steps", "1", "--target-precision", "1.5")


def test_groups_none_gives_a_set_per_task_and_out_is_not_clobbered(root, tmp_path, tiny):
    out = tmp_path / "sets"
    _fit(root, out, "--groups", "none", "--tasks", "sketch,photo", "--steps", "1")
    assert sorted(p.name for p in out.iterdir()) == ["photo", "sketch"]
    sketch = PromptSet.load(out / "sketch", tiny)
    assert not sketch.prompts.group and list(sketch.prompts.task) == ["sketch"]
    with pytest.raises(SystemExit):
        _fit(root, out, "--groups", "one", "--steps", "1")  # would write next to sets it does not know


def test_overwrite_replaces_only_the_sets_the_run_writes(root, tmp_path, tiny):
    """Training into the directory a service watches: --overwrite never removes another set (regression: it
    deleted every set but the new ones)."""
    out = tmp_path / "sets"
    _fit(root, out, "--groups", "none", "--tasks", "sketch,photo", "--steps", "1")
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    _fit(root, out, "--groups", "one", "--tasks", "sketch,photo", "--steps", "1", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["all", "photo", "sketch"]
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "all"} == before  # byte for byte
    first = (out / "all" / WEIGHTS_FILE).read_bytes()
    _fit(root, out, "--groups", "one", "--tasks", "sketch,photo", "--steps", "2", "--overwrite", "--seed", "3")
    assert (out / "all" / WEIGHTS_FILE).read_bytes() != first  # the set of the same name is replaced
    assert PromptSet.load(out / "all", tiny).prompts.groups == {"all": ["sketch", "photo"]}
    assert sorted(p.name for p in out.iterdir()) == ["all", "photo", "sketch"]


def test_trained_prompts_differ_from_initialisation(root, tmp_path):
    out = tmp_path / "sets"
    _fit(root, out, "--groups", "one", "--tasks", "sketch", "--steps", "2", "--lr", "0.01")
    trained = load_file(out / "all" / WEIGHTS_FILE)
    torch.manual_seed(0)
    from mmap_model import MultiTaskPrompts, PromptConfig, load_backbone

    widths = load_backbone("mmap-tiny", None).widths
    torch.manual_seed(0)
    initial = MultiTaskPrompts(PromptConfig(), widths, ["sketch"], {"all": ["sketch"]}).state_dict()
    assert set(trained) == set(initial)
    assert all(not torch.equal(trained[k], initial[k]) for k in trained)  # every tensor received updates


def test_a_fresh_run_never_mixes_with_an_earlier_run_directory(root, tmp_path):
    run_dir = tmp_path / "run"
    _fit(root, tmp_path / "a", "--groups", "one", "--tasks", "sketch", "--steps", "3", "--run-dir", str(run_dir))
    with pytest.raises(SystemExit):  # would resume or prune the other run's checkpoints
        _fit(root, tmp_path / "b", "--groups", "one", "--tasks", "sketch", "--steps", "1", "--run-dir", str(run_dir))
    _fit(root, tmp_path / "b", "--groups", "one", "--tasks", "sketch", "--steps", "1", "--run-dir", str(run_dir),
         "--overwrite")
    assert [p.name for p in run_dir.glob("checkpoint-*.json")] == ["checkpoint-00000001.json"]
    steps = {json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert steps == {1}


def test_no_validation_split_records_no_validation_accuracy(root, tmp_path):
    sets = _fit(root, tmp_path / "o", "--groups", "one", "--tasks", "sketch", "--steps", "1", "--val-fraction", "0")
    result = PromptSet.load(sets[0]).provenance["result"]
    assert result["val_accuracy"] is None  # not 0.0: there were no validation images


def test_user_mistakes_end_in_one_line_errors(root, tmp_path, capsys):
    groups = tmp_path / "groups.json"
    groups.write_text(json.dumps({"groups": [["sketch", "photo"], ["photo"]]}))
    (tmp_path / "file").write_text("x")
    for extra in (["--tasks", "nope"], ["--tasks", "sketch,sketch"], ["--shots", "0"], ["--groups", str(groups)],
                  ["--data", str(tmp_path / "missing")], ["--out", str(tmp_path / "file")]):
        with pytest.raises(SystemExit) as caught:
            _fit(root, tmp_path / "o", *extra)
        message = str(caught.value.code) + capsys.readouterr().err
        assert "error" in message and "Traceback" not in message, (extra, message)


def test_evaluate_uses_the_class_names_the_set_was_trained_with(root, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"apple": "red apple"}))
    out = tmp_path / "sets"
    _fit(root, out, "--groups", "one", "--tasks", "sketch", "--steps", "1", "--classnames", str(names))
    assert "red apple" in PromptSet.load(out / "all").tasks["sketch"].classnames
    rows = evaluate.main(["--data", str(root), "--promptsets", str(out), "--threads", "1"])  # the recorded file
    assert rows[0]["accuracy"] == pytest.approx(PromptSet.load(out / "all").evaluation["accuracy"]["sketch"], abs=1e-9)
    names.unlink()
    with pytest.raises(SystemExit, match="--classnames"):  # the recorded file is gone: say how to give it
        evaluate.main(["--data", str(root), "--promptsets", str(out), "--threads", "1"])


def test_only_user_errors_become_one_line_exits():
    """A mistake the user can fix ends in one `error:` line; an internal ValueError keeps its traceback."""
    from training.cli import user_errors
    from training.errors import DataError

    with pytest.raises(SystemExit, match="^error: bad root$"), user_errors():
        raise DataError("bad root")
    with pytest.raises(ValueError, match="a bug"), user_errors():
        raise ValueError("a bug")
    with pytest.raises(SystemExit, match="^error: .*missing.json"), user_errors(OSError):
        Path("missing.json").read_text()  # a file the user named: the kinds a call site adds


def test_grouping_and_training_progress_are_labelled(root, tmp_path, capsys):
    """With --groups auto two phases train in turn: their epoch lines say which one is running, grouping first."""
    fit.main(["--data", str(root), "--pretrained", "none", "--threads", "1", "--shots", "1", "--batch-size", "8",
              "--epochs", "1", "--warmup-steps", "2", "--probe-steps", "1", "--out", str(tmp_path / "sets")])
    lines = capsys.readouterr().out.splitlines()
    grouping = [i for i, line in enumerate(lines) if line.startswith("grouping: epoch 1/1: loss")]
    training = [i for i, line in enumerate(lines) if line.startswith("fit: epoch 1/1: loss")]
    assert grouping and training and max(grouping) < min(training), lines
    assert not [line for line in lines if line.startswith("epoch")]
