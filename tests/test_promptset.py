"""The prompt-set format: exact round trip, and every corruption refused with its cause named."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mmap_model import PromptConfig, PromptSet, PromptSetError, TaskSpec, load_backbone, promptset
from mmap_model.promptset import CONFIG_FILE, WEIGHTS_FILE

TASKS = {"sketch": TaskSpec(["dog", "traffic light"], "a sketch of a {}.", "line"),
         "quickdraw": TaskSpec(["dog", "cat", "pen"], "a doodle of a {}.", "line"),
         "photo": TaskSpec(["dog", "cat"])}


@pytest.fixture
def saved(tiny, tmp_path) -> Path:
    torch.manual_seed(3)
    ps = PromptSet.create("demo", tiny, PromptConfig(), TASKS)
    ps.provenance = {"command": "test"}
    return ps.save(tmp_path / "demo")


def test_round_trip_is_exact(saved, tiny):
    loaded = PromptSet.load(saved, tiny)
    original = load_file(saved / WEIGHTS_FILE)
    assert loaded.tasks == TASKS and loaded.provenance == {"command": "test"}
    assert loaded.prompts.groups == {"line": ["sketch", "quickdraw"]}
    for k, v in loaded.prompts.state_dict().items():
        assert torch.equal(v, original[k])
    assert set(original) == {k for k in original if k.startswith(("group.line.", "task."))}
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert meta["version"] == loaded.version and len(loaded.version) == 12


@pytest.mark.parametrize("change, scored", [
    (lambda m: m["tasks"]["sketch"]["classnames"].reverse(), True),  # same weights, other class order
    (lambda m: m["tasks"]["sketch"].update(template="a drawing of a {}."), True),
    (lambda m: m["backbone"].update(fingerprint="f" * 64), True),
    (lambda m: m["tasks"]["sketch"].update(temperature=1.5), True),  # calibration changes the scores users see
    (lambda m: m["tasks"]["sketch"].update(min_score=0.5), True),
    (lambda m: m.update(provenance={"command": "other"}, evaluation={"x": 1}), False),
])
def test_the_version_changes_with_anything_that_affects_scores(saved, change, scored):
    """A set republished with new class names or a template but the same weights gets a new version."""
    before = PromptSet.load(saved).version
    _edit_config(saved, change)
    after = PromptSet.load(saved).version
    assert (after != before) == scored


def _edit_config(directory: Path, change) -> None:
    meta = json.loads((directory / CONFIG_FILE).read_text())
    change(meta)
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def _resign(directory: Path) -> None:
    """Make the config's sha256 match the weights file, so only a later check can catch a change."""
    sha = hashlib.sha256((directory / WEIGHTS_FILE).read_bytes()).hexdigest()
    _edit_config(directory, lambda m: m.update(weights_sha256=sha))


def _rewrite_weights(directory: Path, change) -> None:
    tensors = load_file(directory / WEIGHTS_FILE)
    change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)
    _resign(directory)


def _truncate(d: Path) -> None:
    (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:40])
    _resign(d)


def _tamper(d: Path) -> None:
    blob = bytearray((d / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (d / WEIGHTS_FILE).write_bytes(bytes(blob))


CORRUPTIONS = {
    "sha256 mismatch": _tamper,
    "truncated or corrupt": _truncate,
    "tensor names differ": lambda d: _rewrite_weights(d, lambda t: t.update({"task.extra.source": torch.zeros(1)})),
    "tensor shapes differ": lambda d: _rewrite_weights(
        d, lambda t: t.update({"task.photo.source": torch.zeros(1, 2, 3)})),
    "non-finite": lambda d: _rewrite_weights(d, lambda t: t["task.photo.source"].view(-1).__setitem__(0, float("nan"))),
    "format version 2.0": lambda d: _edit_config(d, lambda m: m.update(format_version="2.0")),
    "missing prompts.safetensors": lambda d: (d / WEIGHTS_FILE).unlink(),
    "missing promptset.json": lambda d: (d / CONFIG_FILE).unlink(),
    "not valid JSON": lambda d: (d / CONFIG_FILE).write_text('{"format_version": "1.0", '),
    "lacks required keys": lambda d: _edit_config(d, lambda m: m.pop("tasks")),
    "invalid name": lambda d: _edit_config(d, lambda m: m["tasks"].update({"../evil": m["tasks"]["photo"]})),
}


@pytest.mark.parametrize("cause", sorted(CORRUPTIONS))
def test_corruption_is_refused_with_its_cause(saved, tiny, tmp_path, cause):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    CORRUPTIONS[cause](broken)
    with pytest.raises(PromptSetError, match=cause.replace("(", r"\(")):
        PromptSet.load(broken, tiny)


def test_wrong_backbone_fingerprint_is_refused(saved):
    other = load_backbone("mmap-tiny", None, seed=99)  # same architecture, other weights
    with pytest.raises(PromptSetError, match="fingerprint mismatch"):
        PromptSet.load(saved, other)


def test_unknown_keys_warn_but_load(saved, tiny, caplog):
    _edit_config(saved, lambda m: m.update(future_feature={"x": 1}))
    with caplog.at_level(logging.WARNING, logger="mmap_model.promptset"):
        assert PromptSet.load(saved, tiny).name == "demo"
    assert "future_feature" in caplog.text


def test_fingerprint_is_stable_across_processes(tiny, tmp_path):
    import subprocess
    import sys

    from safetensors.torch import save_model

    save_model(tiny.model, str(tmp_path / "w.safetensors"))
    code = ("import torch, open_clip, sys; from mmap_model.backbone import fingerprint, EMBEDDED_DIR;"
            "from safetensors.torch import load_model;"
            "m = open_clip.create_model('local-dir:' + str(EMBEDDED_DIR), load_weights=False);"
            f"load_model(m, {str(tmp_path / 'w.safetensors')!r}); print(fingerprint(m))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == tiny.fingerprint


def flip_for_the_open(monkeypatch, opened: str | Path, name: Path, outside: Path) -> None:
    """While `os.open(opened)` runs, `name` is a symlink to `outside`; before and after it is the real thing,
    so any check by path, earlier or later, sees only the real one."""
    real_open, parked = promptset.os.open, name.with_name(name.name + ".parked")

    def open_flipped(path, flags, *args, **kwargs):
        if Path(path) != Path(opened):
            return real_open(path, flags, *args, **kwargs)
        name.rename(parked)
        name.symlink_to(outside)
        try:
            return real_open(path, flags, *args, **kwargs)
        finally:
            name.unlink()
            parked.rename(name)

    monkeypatch.setattr(promptset.os, "open", open_flipped)


def test_within_is_judged_on_the_opened_files_not_their_paths(saved, tiny, tmp_path, monkeypatch):
    """`within` refuses a symlink out of the prompt directory (the set, or one of its files), and judges where
    the opened descriptors point: a name flipped outside only for the moment of the open is caught too."""
    root = tmp_path / "prompts"
    root.mkdir()
    (root / "out").symlink_to(saved, target_is_directory=True)
    files = root / "files"
    files.mkdir()
    (files / CONFIG_FILE).write_bytes((saved / CONFIG_FILE).read_bytes())
    (files / WEIGHTS_FILE).symlink_to(saved / WEIGHTS_FILE)
    for name in ("out", "files"):
        with pytest.raises(PromptSetError, match="outside the prompt directory"):
            PromptSet.load(root / name, tiny, within=root.resolve())
    inner = shutil.copytree(saved, root / ".v1")
    (root / "current").symlink_to(inner, target_is_directory=True)  # stays inside: fine
    assert PromptSet.load(root / "current", tiny, within=root.resolve()).name == "demo"

    target = root / "raced"
    shutil.copytree(saved, target)
    assert target.resolve().is_relative_to(root.resolve())  # what a check by path would have seen
    flip_for_the_open(monkeypatch, target, target, saved)
    with pytest.raises(PromptSetError, match="outside the prompt directory"):
        PromptSet.load(target, tiny, within=root.resolve())


def test_read_file_within_judges_the_opened_file(tmp_path, monkeypatch):
    """What /samples serves: a file flipped to a symlink out only for the moment of its open is refused."""
    root, secret = tmp_path / "prompts", tmp_path / "secret.png"
    (root / "set").mkdir(parents=True)
    sample = root / "set" / "dog.png"
    sample.write_bytes(b"a dog")
    secret.write_bytes(b"TOP SECRET")
    assert promptset.read_file_within(sample, 100, root.resolve()) == b"a dog"
    with pytest.raises(PromptSetError, match="larger than the limit"):
        promptset.read_file_within(sample, 3, root.resolve())
    flip_for_the_open(monkeypatch, "dog.png", sample, secret)
    with pytest.raises(PromptSetError, match="outside the prompt directory"):
        promptset.read_file_within(sample, 100, root.resolve())


def test_a_directory_swapped_mid_load_is_read_from_one_version(saved, tiny, tmp_path, monkeypatch):
    """Replacing a prompt set by renaming directories while it loads must not pair the old config with the
    new weights (which the sha256 check would refuse): both files come from the directory the load opened."""
    torch.manual_seed(4)
    newer = PromptSet.create("demo", tiny, PromptConfig(), TASKS).save(tmp_path / "newer")
    old_version = PromptSet.load(saved, tiny).version
    real_read = promptset._read_regular_file

    def read_then_swap(directory, dir_fd, name, *args):
        blob = real_read(directory, dir_fd, name, *args)
        if name == CONFIG_FILE:  # the window between the two reads: swap the way operators do
            saved.rename(tmp_path / "retired")
            newer.rename(saved)
        return blob

    monkeypatch.setattr(promptset, "_read_regular_file", read_then_swap)
    assert PromptSet.load(saved, tiny).version == old_version
    monkeypatch.undo()
    assert PromptSet.load(saved, tiny).version != old_version  # the swap did happen


def test_publish_replaces_its_own_set_in_one_rename_and_touches_nothing_else(tiny, tmp_path):
    out = tmp_path / "served"
    neighbour = PromptSet.create("other", tiny, PromptConfig(), {"b": TaskSpec(["x", "y"])}).publish(out)
    before = {p.name: p.read_bytes() for p in neighbour.iterdir()}
    torch.manual_seed(1)
    first = PromptSet.create("mine", tiny, PromptConfig(), TASKS).publish(
        out, fill=lambda d: (d / "extra").write_text("x"))
    torch.manual_seed(2)
    second = PromptSet.create("mine", tiny, PromptConfig(), TASKS)
    assert second.publish(out) == first and PromptSet.load(first, tiny).version == second.version
    assert sorted(p.name for p in out.iterdir()) == ["mine", "other"]  # no staging or old copy left
    assert sorted(p.name for p in first.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])  # the old set went whole
    assert {p.name: p.read_bytes() for p in neighbour.iterdir()} == before
    with pytest.raises(ValueError, match="invalid name"):
        second.publish(out, name="../escape")


OLD_SETS = Path(__file__).parent / "data" / "promptsets-2026-11"  # written before temperatures existed


def test_a_set_without_calibration_loads_uncalibrated_and_keeps_its_version(embedded):
    directory = OLD_SETS / "infograph-quickdraw"
    meta = json.loads((directory / CONFIG_FILE).read_text())
    assert not any("temperature" in t or "min_score" in t for t in meta["tasks"].values())
    loaded = PromptSet.load(directory, embedded)
    assert loaded.version == meta["version"]  # the recorded version, byte for byte
    assert all(s.temperature == 1.0 and s.min_score is None for s in loaded.tasks.values())
    assert {t: s.to_json() for t, s in loaded.tasks.items()} == meta["tasks"]  # written back entry for entry


def test_temperature_and_min_score_round_trip_and_are_part_of_the_version(saved, tiny, tmp_path):
    plain = PromptSet.load(saved, tiny)
    calibrated = PromptSet.load(saved, tiny)
    calibrated.tasks["sketch"] = TaskSpec(["dog", "traffic light"], "a sketch of a {}.", "line", 1.7, 0.45)
    calibrated.save(tmp_path / "calibrated")
    meta = json.loads((tmp_path / "calibrated" / CONFIG_FILE).read_text())
    assert meta["tasks"]["sketch"]["temperature"] == 1.7 and meta["tasks"]["sketch"]["min_score"] == 0.45
    assert "temperature" not in meta["tasks"]["photo"] and "min_score" not in meta["tasks"]["photo"]
    loaded = PromptSet.load(tmp_path / "calibrated", tiny)
    assert loaded.tasks == calibrated.tasks and loaded.tasks["sketch"].temperature == 1.7
    assert loaded.tasks["sketch"].min_score == 0.45 and loaded.tasks["photo"] == TASKS["photo"]
    assert loaded.version == meta["version"] != plain.version


@pytest.mark.parametrize("field, value", [
    ("temperature", 0), ("temperature", -1.0), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "2"), ("temperature", True), ("min_score", 1.5), ("min_score", -0.1), ("min_score", "0.5"),
])
def test_invalid_calibration_is_refused_naming_task_and_field(saved, tiny, field, value):
    _edit_config(saved, lambda m: m["tasks"]["sketch"].update({field: value}))
    with pytest.raises(PromptSetError, match=f"invalid promptset.json: task 'sketch': {field} must be"):
        PromptSet.load(saved, tiny)


def test_task_spec_refuses_invalid_calibration():
    with pytest.raises(PromptSetError, match="temperature must be a finite number > 0"):
        TaskSpec(["a", "b"], temperature=0.0)
    with pytest.raises(PromptSetError, match=r"min_score must be null or a number in \[0, 1\]"):
        TaskSpec(["a", "b"], min_score=2)
