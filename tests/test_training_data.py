"""Tasks from an ImageFolder root: splits, shots, split files, class names, exact preprocessing, sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from training import synthetic
from training.data import (
    DEFAULT_TEMPLATE,
    ImageReadError,
    Pixels,
    SplitConfig,
    TaskSampler,
    augment_params,
    discover_tasks,
    generator_for,
    load_splits,
    prepare_synthetic,
    warp,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is 3-7x faster on 2 shared cores

DOMAINS = ["sketch", "photo"]
PER_CLASS = 10


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return prepare_synthetic(tmp_path_factory.mktemp("syn"), PER_CLASS, domains=DOMAINS)


def test_synthetic_root_has_tasks_classes_and_templates(root):
    tasks = discover_tasks(root)
    assert [t.name for t in tasks] == sorted(DOMAINS)
    for t in tasks:
        assert sorted(t.classnames) == sorted(synthetic.CLASSES)  # folder underscores -> spaces
        assert t.template == synthetic.prompt_text("{}", t.name)
    assert prepare_synthetic(root, PER_CLASS, domains=DOMAINS) == root  # idempotent


def test_stratified_split_is_disjoint_deterministic_and_independent_of_seed(root):
    split = SplitConfig(test_fraction=0.3, val_fraction=0.1)
    a = discover_tasks(root, ["sketch"], split, seed=0)[0]
    b = discover_tasks(root, ["sketch"], split, seed=5)[0]
    files = {s: set(a.files[s]) for s in ("train", "val", "test")}
    assert (not (files["train"] & files["test"]) and not (files["train"] & files["val"])
            and not (files["val"] & files["test"]))
    assert len(files["train"] | files["val"] | files["test"]) == PER_CLASS * len(synthetic.CLASSES)
    assert a.files == b.files  # no shots: the seed does not touch the split
    for c in range(len(a.classnames)):  # stratified: every class in every split, 3 / 1 / 6 of 10
        assert [a.labels[s].count(c) for s in ("test", "val", "train")] == [3, 1, 6]
    for path, label in zip(a.files["test"], a.labels["test"], strict=True):
        assert a.classnames[label] == synthetic.class_name_from_folder(path.parent.name)
    other = discover_tasks(root, ["sketch"], SplitConfig(split_seed=1))[0]
    assert other.files["test"] != a.files["test"]


def test_shots_vary_with_seed_but_never_touch_test(root):
    full = discover_tasks(root, ["photo"], SplitConfig())[0]
    two = discover_tasks(root, ["photo"], SplitConfig(shots=2), seed=0)[0]
    two_again = discover_tasks(root, ["photo"], SplitConfig(shots=2), seed=0)[0]
    two_other = discover_tasks(root, ["photo"], SplitConfig(shots=2), seed=1)[0]
    assert all(two.labels["train"].count(c) == 2 for c in range(len(two.classnames)))
    assert set(two.files["train"]) <= set(full.files["train"])
    assert two.files == two_again.files and two.files["train"] != two_other.files["train"]
    assert two.files["test"] == two_other.files["test"] == full.files["test"]
    half = discover_tasks(root, ["photo"], SplitConfig(fraction=0.5))[0]
    assert len(half.files["train"]) == len(full.files["train"]) // 2


def test_split_files_class_names_and_templates_files(tmp_path):
    root = tmp_path / "dn"
    for cls in ("aircraft_carrier", "dog"):
        for i in range(4):
            (root / "clipart" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / "clipart" / cls / f"{i}.png")
    (root / "clipart_train.txt").write_text("clipart/aircraft_carrier/0.png 0\nclipart/aircraft_carrier/1.png 0\n"
                                            "clipart/dog/0.png 1\nclipart/dog/1.png 1\nclipart/dog/2.png 1\n")
    (root / "clipart_test.txt").write_text("clipart/aircraft_carrier/3.png 0\nclipart/dog/3.png 1\n")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"dog": "puppy"}))
    task = discover_tasks(root, split=SplitConfig(val_fraction=0.0), classnames_file=names)[0]
    assert task.split_source == "files" and task.template == DEFAULT_TEMPLATE
    assert task.classnames == ["aircraft carrier", "puppy"]
    assert [p.name for p in task.files["test"]] == ["3.png", "3.png"] and task.labels["test"] == [0, 1]
    assert len(task.files["train"]) == 5 and not task.files["val"]
    templates = tmp_path / "t.json"
    templates.write_text(json.dumps({"clipart": "a clip art of a {}."}))
    assert discover_tasks(root, templates_file=templates)[0].template == "a clip art of a {}."
    with pytest.raises(ValueError, match="unknown task"):
        discover_tasks(root, ["painting"])


def test_cached_pixels_equal_open_clip_preprocess(root, tiny):
    task = discover_tasks(root, ["photo"])[0]
    images = load_splits([task], tiny.preprocess, ("test",))["test"]["photo"]
    x, y = images.batch(range(5))
    with Image.open(task.files["test"][3]) as im:
        reference = tiny.preprocess(im)
    assert torch.equal(x[3], reference)  # bit-exact, not just close
    assert torch.equal(y, torch.tensor(task.labels["test"][:5]))
    lazy = Pixels(tiny.preprocess)
    assert torch.equal(lazy.to_input(lazy.load(task.files["test"][3])[None])[0], reference)


def test_sampler_is_an_endless_sequence_of_permutations():
    s = TaskSampler(7, seed=3, task="sketch")
    stream = s.take(0, 21)
    for c in range(3):
        assert sorted(stream[7 * c:7 * c + 7].tolist()) == list(range(7))
    assert torch.equal(s.take(5, 9), stream[5:14])  # any window equals the stream: resumable
    assert not torch.equal(TaskSampler(7, 4, "sketch").take(0, 7), stream[:7])


def test_augmentation_is_seeded_and_identity_warp_is_exact():
    images = torch.randn(4, 3, 32, 32)
    t1 = augment_params(4, generator_for(0, "sketch", 7, "augment"), 0.7)
    t2 = augment_params(4, generator_for(0, "sketch", 7, "augment"), 0.7)
    assert torch.equal(t1, t2) and not torch.equal(t1, augment_params(4, generator_for(0, "sketch", 8, "augment"), 0.7))
    assert ((t1[:, 0, 0].abs() >= 0.7) & (t1[:, 0, 0].abs() <= 1)).all()
    assert torch.allclose(warp(images[:2], t1[:2]), warp(images, t1)[:2], atol=1e-6)  # per image: slices agree
    identity = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3)
    assert torch.allclose(warp(images, identity), images, atol=1e-5)
    mirror = torch.tensor([[-1.0, 0, 0], [0, 1, 0]]).expand(4, 2, 3)
    assert torch.allclose(warp(images, mirror), images.flip(-1), atol=1e-5)


def test_data_mistakes_are_named_before_training(tmp_path, tiny):
    root = tmp_path / "dn"
    for domain in ("a b", "a_b"):
        (root / domain / "dog").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / domain / "dog" / "0.png")
    with pytest.raises(ValueError, match="both map to task 'a_b'"):  # one would silently hide the other
        discover_tasks(root)
    (root / "a b" / "dog" / "0.png").rename(root / "a_b" / "dog" / "1.png")
    (root / "a b" / "dog").rmdir()
    (root / "a b").rmdir()
    (root / "a_b_train.txt").write_text("a_b/dog/0.png 0\na_b/dog/gone.png 0\n")
    (root / "a_b_test.txt").write_text("a_b/dog/1.png 0\n")
    with pytest.raises(FileNotFoundError, match="gone.png"):  # listed in a split file, missing on disk
        discover_tasks(root)
    (root / "a_b" / "dog" / "gone.png").write_bytes(b"not an image")
    task = discover_tasks(root, split=SplitConfig(val_fraction=0.0))[0]
    with pytest.raises(ImageReadError, match="gone.png"):  # a corrupt file names itself, with what to do
        load_splits([task], tiny.preprocess, ("train",))
