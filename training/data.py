"""Tasks from an ImageFolder-per-domain root: discovery, splits, k-shot sampling, cached tensors.

Layout (Office-Home / DomainNet): `ROOT/<domain>/<class_folder>/<image>`. Every domain is a task;
its classes are its class folders (tasks may have different class lists). Class names are the
folder names with underscores turned into spaces, or come from a JSON file `{folder: name}`.

Splits, per task:
- DomainNet-style split files `ROOT/<domain>_train.txt` / `ROOT/<domain>_test.txt` (lines
  `<domain>/<class_folder>/<file> <label>`; the class is read from the path, the label ignored)
  are used when both exist;
- otherwise a stratified split: per class, the sorted files are permuted by
  (`split_seed`, task, class) and the first `test_fraction` go to test.
Validation is carved the same way from the training pool (`val_fraction`, at least one image
per class when the class has three or more). `--shots K` then keeps K images per class of what
is left (permuted by the training seed, so seeds differ in their shots as in CoOp's protocol),
or `--fraction F` keeps that share. The test split depends only on `split_seed`, never on the
training seed, so every method and seed is scored on the same images.

Templates (the hand-written zero-shot prompt, also the text that trained prompts are prepended
to): `--templates FILE` (JSON `{task: "a sketch of a {}."}`), else `ROOT/templates.json`, else
"a photo of a {}." for every task.

Images are decoded once through the backbone's own eval transform up to (not including)
`ToTensor`, and kept as uint8 [N, 3, H, W] in memory when they fit `cache_bytes` (the synthetic
sets take a few MB); `to_input` then does ToTensor + Normalize on the batch, which is bit-exact
with `backbone.preprocess` (tested). Larger sets are decoded on demand by the same code.

Training augmentation (light, documented, on the batch tensor): a horizontal flip with p = 0.5
and, with `crop_scale` < 1 (`--crop-scale`), a random square crop covering crop_scale..100% of
the side at a random position, resampled to the input size (bilinear); both as one batched
affine warp whose parameters come from an explicit generator, so a (seed, step, task) always
sees the same pixels on every rank. The default is flip only: on the synthetic benchmark (48 px
inputs, objects already vary in position and scale) crops at 0.7 and 0.9 cost about 2 points of
validation and test accuracy (docs/benchmarks.md); real photos at 224 px may well want them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from .configs import HelpFormatter
from .errors import DataError, MissingData, UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm"}
DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATES_FILE = "templates.json"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True, kw_only=True)  # built by keyword only: a reordered field cannot shift values
class SplitConfig:
    """How a task's images are divided; stored in prompt-set provenance so evaluation can redo it."""

    # Each field is a command-line flag (training/cli.py); "exclusive" ones are one mutually exclusive choice.
    test_fraction: float = field(default=0.3, metadata={"help": "stratified split without split files"})
    val_fraction: float = field(default=0.1, metadata={"help": "validation share, carved from the training pool"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/val/test split (not of the shots)"})
    shots: int | None = field(default=None, metadata={"type": int, "exclusive": True,
                                                      "help": "training images per class and task (k-shot)"})
    fraction: float | None = field(default=None, metadata={"type": float, "exclusive": True,
                                                           "help": "or this fraction of each class's training pool"})

    def __post_init__(self) -> None:
        if (not 0 < self.test_fraction < 1 or not 0 <= self.val_fraction < 1
                or self.test_fraction + self.val_fraction >= 1):
            raise DataError("need 0 < test_fraction < 1, 0 <= val_fraction < 1 and their sum < 1")
        if self.shots is not None and self.fraction is not None:
            raise DataError("give --shots or --fraction, not both")
        if self.shots is not None and self.shots < 1:
            raise DataError("shots must be >= 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise DataError("fraction must be in (0, 1]")


@dataclass
class Task:
    """One domain: its classes and its train / val / test files with labels."""

    name: str
    folder: str
    classnames: list[str]
    template: str
    files: dict[str, list[Path]] = field(default_factory=dict)  # split -> files
    labels: dict[str, list[int]] = field(default_factory=dict)  # split -> class indices
    split_source: str = "stratified"

    def summary(self) -> dict:
        return {"classes": len(self.classnames), "template": self.template, "split_source": self.split_source,
                **{s: len(self.files.get(s, [])) for s in SPLITS}, "test_digest": self.digest("test")}

    def digest(self, split: str) -> str:
        """sha256 prefix of a split's images as (class folder/file name, label, size) lines: which images they were."""
        lines = sorted(f"{f.parent.name}/{f.name}\t{label}\t{f.stat().st_size}"
                       for f, label in zip(self.files.get(split, []), self.labels.get(split, []), strict=True))
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def task_name(folder: str) -> str:
    """A task name safe for prompt sets (letters, digits, '_', '-') from a domain folder name."""
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in folder)[:64]
    if not name or not name[0].isalnum():
        name = f"t{name}"[:64]
    return name


def _class_folders(domain_dir: Path) -> list[str]:
    return sorted(p.name for p in domain_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def list_domains(root: Path) -> list[str]:
    """Domain folders of a root (folders that hold class folders), sorted."""
    if not root.is_dir():
        raise MissingData(f"data root {root} is not a directory")
    domains = [p.name for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")
               and any(c.is_dir() for c in p.iterdir())]
    if not domains:
        raise DataError(f"{root} holds no <domain>/<class>/ folders")
    return domains


def load_templates(root: Path, templates_file: Path | None) -> dict[str, str]:
    path = templates_file or root / TEMPLATES_FILE
    if not path.is_file():
        if templates_file is not None:
            raise MissingData(f"templates file {templates_file} does not exist")
        return {}
    templates = json.loads(path.read_text())
    bad = {k: v for k, v in templates.items() if not isinstance(v, str) or "{}" not in v}
    if bad:
        raise DataError(f"{path}: every template needs a '{{}}' for the class name: {bad}")
    return templates


def _permutation(n: int, *key: int | str) -> np.ndarray:
    """A permutation of range(n) determined by the key alone (stable across runs and machines)."""
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    return np.random.default_rng(np.random.SeedSequence(words)).permutation(n)


def _test_count(n: int, cfg: SplitConfig) -> int:
    """Test images of a class of n: the fraction, but at least one and never all."""
    return min(max(1, round(cfg.test_fraction * n)), n - 1) if n >= 2 else 0


def _val_count(pool: int, total: int, cfg: SplitConfig) -> int:
    """Validation images taken from a class's training pool (a fraction of the class total)."""
    if cfg.val_fraction == 0 or pool < 2:
        return 0
    return min(max(1, round(cfg.val_fraction * total)), pool - 1)


def _read_split_file(root: Path, path: Path, folders: list[str]) -> list[tuple[Path, int]]:
    index = {f: i for i, f in enumerate(folders)}
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rel = Path(line.split()[0])
        if rel.parent.name not in index:
            raise DataError(f"{path}: {rel} is not in a known class folder")
        items.append((root / rel, index[rel.parent.name]))
    missing = [str(f) for f, _ in items if not f.is_file()]
    if missing:
        raise MissingData(f"{path}: {len(missing)} listed image(s) are not on disk, e.g. {', '.join(missing[:3])}")
    return items


def _keep_shots(by_class: list[list[Path]], cfg: SplitConfig, seed: int, task: str,
                classnames: Sequence[str]) -> list[list[Path]]:
    if cfg.shots is None and cfg.fraction is None:
        return by_class
    kept, short = [], []
    for c, files in enumerate(by_class):
        k = cfg.shots if cfg.shots is not None else max(1, round(cfg.fraction * len(files)))
        if k > len(files):
            short.append(f"{classnames[c]} ({len(files)})")
        kept.append([files[i] for i in sorted(_permutation(len(files), seed, task, c, "shots")[:k])])
    if short:  # one line per task, not one per class
        log.warning("task %s: %d of %d classes have fewer than %d training images: %s", task, len(short), len(by_class),
                    k, ", ".join(short[:10]) + (", ..." if len(short) > 10 else ""))
    return kept


def _flatten(by_class: list[list[Path]]) -> tuple[list[Path], list[int]]:
    files = [f for fs in by_class for f in fs]
    labels = [c for c, fs in enumerate(by_class) for _ in fs]
    return files, labels


def discover_tasks(root: str | Path, tasks: Sequence[str] | None = None, split: SplitConfig | None = None,
                   seed: int = 0, classnames_file: Path | None = None,
                   templates_file: Path | None = None) -> list[Task]:
    """Tasks of an ImageFolder-per-domain root with their splits (see the module docstring)."""
    root = Path(root)
    split = split or SplitConfig()
    folders = list_domains(root)
    by_name: dict[str, str] = {}
    for f in folders:
        name = task_name(f)
        if name in by_name:
            raise DataError(f"domain folders {by_name[name]!r} and {f!r} in {root} both map to task {name!r}; "
                            "rename one")
        by_name[name] = f
    chosen = list(by_name) if not tasks else list(tasks)
    if len(set(chosen)) < len(chosen):
        raise DataError(f"tasks listed more than once: {sorted({t for t in chosen if chosen.count(t) > 1})}")
    unknown = [t for t in chosen if t not in by_name]
    if unknown:
        raise DataError(f"unknown task(s) {unknown}; {root} has {sorted(by_name)}")
    names = json.loads(Path(classnames_file).read_text()) if classnames_file else {}
    templates = load_templates(root, templates_file)
    out = []
    for name in chosen:
        domain_dir = root / by_name[name]
        class_folders = _class_folders(domain_dir)
        task = Task(name, by_name[name], [names.get(f, f.replace("_", " ")) for f in class_folders],
                    templates.get(name, templates.get(by_name[name], DEFAULT_TEMPLATE)))
        train_file, test_file = root / f"{by_name[name]}_train.txt", root / f"{by_name[name]}_test.txt"
        pool: list[list[Path]] = [[] for _ in class_folders]
        test: list[list[Path]] = [[] for _ in class_folders]
        if train_file.is_file() and test_file.is_file():
            task.split_source = "files"
            for path, c in _read_split_file(root, train_file, class_folders):
                pool[c].append(path)
            for path, c in _read_split_file(root, test_file, class_folders):
                test[c].append(path)
        else:
            for c, folder in enumerate(class_folders):
                files = _images_in(domain_dir / folder)
                perm = _permutation(len(files), split.split_seed, name, c, "test")
                n_test = _test_count(len(files), split)
                test[c] = sorted(files[i] for i in perm[:n_test])
                pool[c] = sorted(files[i] for i in perm[n_test:])
        empty = [task.classnames[c] for c in range(len(class_folders)) if not pool[c] and not test[c]]
        if empty:
            log.warning("task %s: %d class(es) have no images and can never be predicted right: %s", name, len(empty),
                        ", ".join(empty[:10]))
        val: list[list[Path]] = []
        train: list[list[Path]] = []
        for c, files in enumerate(pool):
            perm = _permutation(len(files), split.split_seed, name, c, "val")
            n_val = _val_count(len(files), len(files) + len(test[c]), split)
            val.append(sorted(files[i] for i in perm[:n_val]))
            train.append(sorted(files[i] for i in perm[n_val:]))
        train = _keep_shots(train, split, seed, name, task.classnames)
        for s, by_class in zip(SPLITS, (train, val, test), strict=True):
            task.files[s], task.labels[s] = _flatten(by_class)
        if not task.files["train"] or not task.files["test"]:
            raise DataError(f"task {name}: empty train or test split ({task.summary()})")
        out.append(task)
    return out


def data_summary(root: Path, tasks: list[Task], split: SplitConfig, seed: int,
                 classnames_file: Path | None = None) -> dict:
    """What provenance records about the data (enough to rebuild the same splits and class names)."""
    return {"root": str(root), "split": {**split.__dict__}, "seed": seed,
            "classnames_file": None if classnames_file is None else str(Path(classnames_file).resolve()),
            "tasks": {t.name: t.summary() for t in tasks}}


# ---------------------------------------------------------------------------------------------
# Pixels
# ---------------------------------------------------------------------------------------------


class ImageReadError(UserError, ValueError):
    """An image of the data root that cannot be decoded (named in the message)."""


class Pixels:
    """Turns files into model input using exactly the backbone's eval preprocessing.

    The backbone transform is split at `ToTensor`: everything before it (resize, crop, RGB)
    runs once per file and yields uint8; ToTensor + Normalize run on batches (`to_input`).
    """

    def __init__(self, preprocess: Callable):
        steps = list(getattr(preprocess, "transforms", []))
        cut = next((i for i, s in enumerate(steps) if "ToTensor" in type(s).__name__), None)
        norm = steps[-1] if steps else None
        if cut is None or not isinstance(norm, T.Normalize) or cut != len(steps) - 2:
            raise ValueError(f"unsupported preprocess (expected ... ToTensor, Normalize): {preprocess}")
        self.pil_steps = T.Compose(steps[:cut])
        self.mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, 3, 1, 1)

    def load(self, path: Path) -> Tensor:
        """uint8 [3, H, W] of one file after the PIL part of the transform."""
        try:
            with Image.open(path) as im:
                arr = np.asarray(self.pil_steps(im), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
            raise ImageReadError(f"cannot read image {path}: {e}; remove it or list it out of the split") from e
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    def to_input(self, images: Tensor) -> Tensor:
        """uint8 [B, 3, H, W] -> normalised float [B, 3, H, W] (== ToTensor + Normalize)."""
        return images.float().div(255).sub(self.mean).div(self.std)


class ImageSet:
    """The images of one split of one task, cached as uint8 when they fit the budget."""

    def __init__(self, files: list[Path], labels: list[int], pixels: Pixels, cache: bool = True, workers: int = 4):
        self.files, self.pixels = files, pixels
        self.labels = torch.tensor(labels, dtype=torch.long)
        self._cache: Tensor | None = None
        self.workers = workers
        if cache and files:
            self._cache = self._decode(range(len(files)))

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, indices: Sequence[int]) -> Tensor:
        if self.workers > 1 and len(indices) > 16:
            # PIL releases the GIL while decoding and resizing.
            with ThreadPoolExecutor(self.workers) as pool:
                return torch.stack(list(pool.map(lambda i: self.pixels.load(self.files[i]), indices)))
        return torch.stack([self.pixels.load(self.files[i]) for i in indices])

    def uint8(self, indices: Tensor | Sequence[int]) -> Tensor:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self._cache[idx] if self._cache is not None else self._decode(idx.tolist())

    def batch(self, indices: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        """(normalised float images, labels) for the given positions."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.pixels.to_input(self.uint8(idx)), self.labels[idx]


def load_splits(tasks: list[Task], preprocess: Callable, splits: Sequence[str] = SPLITS,
                cache_bytes: int = 4 << 30) -> dict[str, dict[str, ImageSet]]:
    """{split: {task: ImageSet}}; cached in memory while the estimated total fits `cache_bytes`."""
    pixels = Pixels(preprocess)
    first = next(f for t in tasks for f in t.files["train"])
    per_image = pixels.load(first).numel()
    total = sum(len(t.files[s]) for t in tasks for s in splits) * per_image
    cache = total <= cache_bytes
    if not cache:
        log.info("images need %.1f GB > cache budget; decoding on demand", total / 1e9)
    return {s: {t.name: ImageSet(t.files[s], t.labels[s], pixels, cache) for t in tasks} for s in splits}


# ---------------------------------------------------------------------------------------------
# Sampling and augmentation
# ---------------------------------------------------------------------------------------------


class TaskSampler:
    """An endless stream of shuffled indices for one task: epoch permutations back to back.

    Draw number `k` of the stream depends only on (seed, task, k), so a run resumed at step s
    continues with exactly the batches the uninterrupted run would have drawn.
    """

    def __init__(self, size: int, seed: int, task: str):
        self.size, self.seed, self.task = size, seed, task

    def _cycle(self, c: int) -> Tensor:
        return torch.from_numpy(_permutation(self.size, self.seed, self.task, c, "order"))

    def take(self, start: int, count: int) -> Tensor:
        """Draws start .. start+count-1 of the stream."""
        first, last = start // self.size, (start + count - 1) // self.size
        stream = torch.cat([self._cycle(c) for c in range(first, last + 1)])
        offset = start - first * self.size
        return stream[offset:offset + count]


def augment_params(batch: int, generator: torch.Generator, crop_scale: float) -> Tensor:
    """Affine warps [B, 2, 3]: a random crop (crop_scale..1 of the side, anywhere inside the
    image) and a horizontal flip with p = 0.5. The crop never leaves the image (no padding)."""
    scale = crop_scale + (1 - crop_scale) * torch.rand(batch, generator=generator)
    shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - scale).unsqueeze(1)
    flip = torch.where(torch.rand(batch, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = shift
    return theta


def warp(images: Tensor, theta: Tensor) -> Tensor:
    """Apply per-image affine warps (bilinear) and resample to the same size."""
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def generator_for(*key: int | str) -> torch.Generator:
    words = [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in key]
    seed = int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] & ((1 << 63) - 1))
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# The synthetic stand-in as a root
# ---------------------------------------------------------------------------------------------


def prepare_synthetic(out: str | Path, per_class: int, size: int = 64, seed: int = 0,
                      domains: Sequence[str] | None = None) -> Path:
    """Write the procedural dataset as an ImageFolder root plus its `templates.json` (idempotent).

    The templates are the synthetic module's hand-written zero-shot prompts ("a sketch of a {}."),
    so zero-shot and the prompt methods use the same text on synthetic and real roots alike.
    """
    from training import synthetic  # imported here: real roots never need the generator

    out = Path(out)
    domains = list(domains or synthetic.DOMAINS)
    stamp = out / "synthetic.json"
    wanted = {"per_class": per_class, "size": size, "seed": seed, "domains": domains}
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == wanted:
        return out
    summary = synthetic.write_tree(out, per_class, size, domains, seed)
    (out / TEMPLATES_FILE).write_text(json.dumps({d: synthetic.prompt_text("{}", d) for d in domains}, indent=2))
    stamp.write_text(json.dumps({"settings": wanted, "summary": summary}, indent=2))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.data",
                                     description="Write the synthetic stand-in root (tree + templates.json), "
                                                 "or summarise the tasks of a root.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="root to summarise, or to write with --synthetic")
    parser.add_argument("--synthetic", type=int, metavar="PER_CLASS",
                        help="write the synthetic set, PER_CLASS images per class")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.synthetic:
        prepare_synthetic(args.data, args.synthetic, args.size, args.seed)
    tasks = discover_tasks(args.data)
    print(json.dumps({t.name: t.summary() for t in tasks}, indent=2))


if __name__ == "__main__":
    main()
