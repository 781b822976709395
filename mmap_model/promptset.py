"""The prompt-set format: `promptset.json` + `prompts.safetensors` in a directory (no pickle).

`promptset.json` holds the format version, name, version (a digest of everything that affects
scores: `content_version`), the backbone it was trained on
(model, pretrained, fingerprint, widths), the method's hyper-parameters, groups, tasks (class
names, template, group; optionally `temperature`, the divisor of the task's logits that calibrates
its scores, and `min_score`, its default abstention threshold), the sha256 of the weights file,
provenance and evaluation results.
`prompts.safetensors` holds only the trainable tensors (`group.<g>.…`, `task.<t>.…`).

Loading checks the schema, the sha256, tensor names and shapes, finiteness and (given a
backbone) its fingerprint, and raises `PromptSetError` naming the cause. Unknown keys are kept
with a warning; a newer major format version is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .backbone import Backbone, Widths
from .calibration import check_min_score, check_temperature
from .prompts import MultiTaskPrompts, PromptConfig, check_name

log = logging.getLogger(__name__)

FORMAT_VERSION = "1.0"
CONFIG_FILE = "promptset.json"
WEIGHTS_FILE = "prompts.safetensors"
MAX_CONFIG_BYTES = 4 << 20
MAX_WEIGHTS_BYTES = 256 << 20  # read whole into memory; real prompt sets are KB to a few MB
_KNOWN_KEYS = {"format_version", "name", "version", "backbone", "method", "task_modules", "groups", "tasks",
               "weights_sha256", "provenance", "evaluation"}


class PromptSetError(ValueError):
    """A prompt set that cannot be used; the message says which check failed and why."""


@dataclass(frozen=True)
class TaskSpec:
    """A task of a set: its classes, template and group, and how its scores are read: calibrated probabilities
    are softmax(logits / `temperature`) (`mmap_model.calibration`), and `min_score` is the default threshold
    below which an answer is withheld (None: always answer)."""

    classnames: list[str]
    template: str = "a photo of a {}."
    group: str | None = None
    temperature: float = 1.0
    min_score: float | None = None

    def __post_init__(self) -> None:
        try:
            check_temperature(self.temperature)
            check_min_score(self.min_score)
        except ValueError as e:
            raise PromptSetError(str(e)) from None

    def to_json(self) -> dict[str, Any]:
        """The task's entry in promptset.json. `temperature` and `min_score` are written only when they differ
        from their defaults, so a set without them keeps its content version."""
        entry: dict[str, Any] = {"classnames": self.classnames, "template": self.template, "group": self.group}
        if self.temperature != 1.0:
            entry["temperature"] = self.temperature
        if self.min_score is not None:
            entry["min_score"] = self.min_score
        return entry

    @classmethod
    def from_json(cls, task: str, entry: dict[str, Any]) -> TaskSpec:
        """A task's entry of promptset.json, checked (PromptSetError names the task and the field)."""
        try:
            temperature = check_temperature(entry.get("temperature", 1.0))
            min_score = check_min_score(entry.get("min_score"))
        except ValueError as e:
            raise PromptSetError(f"task {task!r}: {e}") from None
        return cls(list(entry["classnames"]), str(entry["template"]), entry.get("group"), temperature, min_score)


@dataclass
class PromptSet:
    """A trained multi-task prompt set and its metadata."""

    name: str
    prompts: MultiTaskPrompts
    tasks: dict[str, TaskSpec]
    backbone: dict[str, Any]  # model, pretrained, fingerprint, d_t, d_v, embed_dim
    version: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str, backbone: Backbone, cfg: PromptConfig, tasks: dict[str, TaskSpec],
               task_modules: bool = True) -> PromptSet:
        """A freshly initialised prompt set for `backbone` (what training starts from)."""
        groups: dict[str, list[str]] = {}
        for task, spec in tasks.items():
            if spec.group is not None:
                groups.setdefault(spec.group, []).append(task)
        prompts = MultiTaskPrompts(cfg, backbone.widths, list(tasks), groups, task_modules)
        return cls(check_name(name), prompts, dict(tasks), backbone_info(backbone))

    @property
    def method(self) -> str:
        return self.prompts.cfg.method

    def card(self, task: str) -> dict[str, dict[str, Any]]:
        """One task's model card from what the set recorded: `evaluation` (test accuracy, zero-shot accuracy,
        test images, split: its values for this task) and `trained` (when, by which command and code, with
        which settings, and this task's data: split sizes and the digest of its test images)."""
        evaluation = {k: v[task] if isinstance(v, dict) else v for k, v in self.evaluation.items()
                      if not isinstance(v, dict) or task in v}
        trained = {k: self.provenance[k] for k in ("created", "command", "code_version", "seed", "world_size", "train")
                   if k in self.provenance}
        data = self.provenance.get("data")
        if isinstance(data, dict):
            trained["data"] = {"split": data.get("split"), **data.get("tasks", {}).get(task, {})}
        return {"evaluation": evaluation, "trained": trained}

    def save(self, directory: str | Path) -> Path:
        """Write the two files; `version` becomes the digest of what they hold (see content_version)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.prompts.state_dict().items()}
        blob = save_safetensors(tensors)
        scored = {
            "backbone": self.backbone,
            "method": self.prompts.cfg.to_dict(),
            "task_modules": bool(len(self.prompts.task)),
            "groups": self.prompts.groups,
            "tasks": {t: s.to_json() for t, s in self.tasks.items()},
            "weights_sha256": hashlib.sha256(blob).hexdigest(),
        }
        self.version = content_version(scored)
        meta = {"format_version": FORMAT_VERSION, "name": self.name, "version": self.version, **scored,
                "provenance": self.provenance, "evaluation": self.evaluation}
        # Weights first, config last, each complete before its name appears: a reader that sees a config sees the
        # weights it names (the config carries their sha256, so a stale pair fails validation instead of loading).
        _write_durably(directory / WEIGHTS_FILE, blob)
        _write_durably(directory / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=False).encode())
        return directory

    def publish(self, out: str | Path, name: str | None = None, fill: Callable[[Path], Any] | None = None) -> Path:
        """Save as `<out>/<name>` (default: the set's name) in one rename: written to a hidden sibling first,
        so a watching service sees no set or the whole set, never half of one. A set already there under that
        name is replaced; nothing else in `out` is touched. `fill(directory)` may add files (sample images)
        before the rename."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        final = out / check_name(name or self.name)
        staging = out / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        self.save(staging)
        if fill is not None:
            fill(staging)
        if final.exists():
            old = out / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync_directory(out)
        return final

    @classmethod
    def load(cls, directory: str | Path, backbone: Backbone | None = None, *, within: Path | None = None) -> PromptSet:
        """Read and validate a prompt set; with `backbone`, also check it was trained on it.

        `within` (a resolved directory): refuse a set whose directory or files, symlinks followed, lie
        outside it. Checked on the opened files themselves, so a symlink swapped in after any earlier
        check by path cannot lead the load out.
        """
        directory = Path(directory)
        config, weights = _read_files(directory, within)
        meta = _parse_config(directory, config)
        major = str(meta["format_version"]).split(".")[0]
        if major != FORMAT_VERSION.split(".")[0]:
            raise PromptSetError(f"{directory}: format version {meta['format_version']} is not supported "
                                 f"(this library reads {FORMAT_VERSION.split('.')[0]}.x)")
        unknown = set(meta) - _KNOWN_KEYS
        if unknown:
            log.warning("%s: ignoring unknown keys %s", directory, sorted(unknown))
        bb = meta["backbone"]
        if backbone is not None and bb.get("fingerprint") != backbone.fingerprint:
            raise PromptSetError(f"{directory}: backbone fingerprint mismatch: trained on {bb.get('model')} "
                                 f"({bb.get('pretrained')}) {str(bb.get('fingerprint'))[:12]}, "
                                 f"loaded backbone is {backbone.fingerprint[:12]}")
        try:
            widths = Widths(d_t=int(bb["d_t"]), d_v=int(bb["d_v"]), embed_dim=int(bb["embed_dim"]),
                            layers_t=int(bb["layers_t"]), layers_v=int(bb["layers_v"]))
            cfg = PromptConfig.from_dict(meta["method"])
            tasks = {check_name(t): TaskSpec.from_json(t, s) for t, s in meta["tasks"].items()}
            prompts = MultiTaskPrompts(cfg, widths, list(tasks), meta["groups"], bool(meta["task_modules"]))
        except PromptSetError as e:
            raise PromptSetError(f"{directory}: invalid {CONFIG_FILE}: {e}") from e
        except (KeyError, TypeError, ValueError) as e:
            raise PromptSetError(f"{directory}: invalid {CONFIG_FILE}: {type(e).__name__}: {e}") from e
        if cfg.resolve(widths) != cfg:
            raise PromptSetError(f"{directory}: method settings are not resolved for the backbone widths")
        for t, spec in tasks.items():
            if not spec.classnames or "{}" not in spec.template:
                raise PromptSetError(f"{directory}: task {t!r} needs class names and a template with '{{}}'")
        prompts.load_state_dict(_parse_weights(directory, weights, meta["weights_sha256"], prompts))
        version = content_version(meta)
        if meta["version"] != version:  # edited by hand, or written before versions covered the whole content
            log.info("%s: recorded version %s does not match its content: version %s", directory, meta["version"],
                     version)
        return cls(str(meta["name"]), prompts, tasks, bb, version, meta.get("provenance", {}),
                   meta.get("evaluation", {}))


def publication_key(published_ns: int, name: str) -> tuple[int, str]:
    """The order of publications: a task defined by several sets of a prompt directory is served by the greatest
    (the set whose promptset.json was written last; ties by name). The service and `serving` both use it."""
    return published_ns, name


def serving(directory: str | Path, held_out: dict[str, str] | None = None) -> dict[str, Path]:
    """Which set of a prompt directory serves each task (by `publication_key`), as the service would; sets
    that cannot be read are left out. Hidden ('.', '_') directories are work in progress, not served.
    `held_out` {task: set name}: a rollout's candidate, which serves its task only if no other set defines it
    (mmap_model/rollouts.py)."""
    best: dict[str, tuple[tuple[bool, int, str], Path]] = {}
    held_out = held_out or {}
    for config in sorted(Path(directory).glob(f"*/{CONFIG_FILE}")):
        if config.parent.name.startswith((".", "_")):
            continue
        try:
            key = publication_key(config.stat().st_mtime_ns, config.parent.name)
            tasks = json.loads(config.read_text())["tasks"]
        except (OSError, ValueError, KeyError):
            continue
        for task in tasks:
            ranked = (held_out.get(task) != config.parent.name, *key)
            if task not in best or best[task][0] < ranked:
                best[task] = (ranked, config.parent)
    return {task: path for task, (_, path) in sorted(best.items())}


SCORED_KEYS = ("backbone", "method", "task_modules", "groups", "tasks", "weights_sha256")


def content_version(meta: dict[str, Any]) -> str:
    """A set's version: the sha256 prefix of everything in its files that affects scores (the weights through
    their sha256, the method, groups, class names, templates, temperatures and abstention thresholds where set,
    the backbone), in canonical JSON. Republishing with new class names, a new template or a new temperature
    changes it; a new name, provenance or evaluation does not."""
    scored = {key: meta[key] for key in SCORED_KEYS}
    return hashlib.sha256(json.dumps(scored, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


def _write_durably(path: Path, data: bytes) -> None:
    """Write to a temporary sibling, fsync, rename: `path` is absent, old, or whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened for fsync
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def backbone_info(backbone: Backbone) -> dict[str, Any]:
    w = backbone.widths
    return {"model": backbone.model_name, "pretrained": backbone.pretrained, "fingerprint": backbone.fingerprint,
            "d_t": w.d_t, "d_v": w.d_v, "embed_dim": w.embed_dim, "layers_t": w.layers_t, "layers_v": w.layers_v}


def _read_files(directory: Path, within: Path | None = None) -> tuple[bytes, bytes]:
    """The bytes of promptset.json and prompts.safetensors, both read through one handle on the directory.

    Prompt sets are replaced by renaming directories; a swap in the middle of a load must not pair one
    version's config with the other's weights, so both files are opened relative to the directory as it
    was when the load began.
    """
    with _opened_directory(directory, within, "prompt-set directory") as dir_fd:
        return (_read_regular_file(directory, dir_fd, CONFIG_FILE, MAX_CONFIG_BYTES, within),
                _read_regular_file(directory, dir_fd, WEIGHTS_FILE, MAX_WEIGHTS_BYTES, within))


def read_file_within(path: Path, limit: int, within: Path) -> bytes:
    """The bytes of the regular file `path` (at most `limit`), refused (PromptSetError) unless the opened
    directory and file lie inside `within`: for serving files of an untrusted directory, race-free."""
    with _opened_directory(path.parent, within) as dir_fd:
        return _read_regular_file(path.parent, dir_fd, path.name, limit, within)


@contextmanager
def _opened_directory(directory: Path, within: Path | None, what: str = "directory") -> Iterator[int]:
    """A descriptor of `directory` (checked against `within`), closed afterwards."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        raise PromptSetError(f"{directory}: cannot open the {what}: {e.strerror}") from e
    try:
        _check_within(directory, dir_fd, within)
        yield dir_fd
    finally:
        os.close(dir_fd)


def _check_within(item: Path, fd: int, within: Path | None) -> None:
    """Refuse an opened file or directory that is not inside `within`: judged by where the descriptor
    points (/proc/self/fd on Linux), else by the path, symlinks followed."""
    if within is None:
        return
    link = Path(f"/proc/self/fd/{fd}")
    real = Path(os.readlink(link)) if link.is_symlink() else item.resolve()
    if not real.is_relative_to(within):
        raise PromptSetError(f"{item}: a symlink to {real}, outside the prompt directory {within}")


def _read_regular_file(directory: Path, dir_fd: int, name: str, limit: int, within: Path | None = None) -> bytes:
    try:  # O_NONBLOCK: opening a FIFO planted under this name must not hang the loader
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        raise PromptSetError(f"{directory}: missing {name} (half-written or not a prompt set)") from None
    except OSError as e:
        raise PromptSetError(f"{directory}: cannot open {name}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        _check_within(directory / name, f.fileno(), within)
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PromptSetError(f"{directory}: {name} is not a regular file")
        if st.st_size > limit:
            raise PromptSetError(f"{directory}: {name} is larger than the limit of {limit} bytes")
        return f.read(limit + 1)


def _parse_config(directory: Path, blob: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PromptSetError(f"{directory}: {CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise PromptSetError(f"{directory}: {CONFIG_FILE} must hold a JSON object")
    missing = sorted(k for k in ("format_version", "name", "version", "backbone", "method", "task_modules",
                                 "groups", "tasks", "weights_sha256") if k not in meta)
    if missing:
        raise PromptSetError(f"{directory}: {CONFIG_FILE} lacks required keys {missing}")
    return meta


def _parse_weights(directory: Path, blob: bytes, expected_sha: str,
                   prompts: MultiTaskPrompts) -> dict[str, torch.Tensor]:
    # Hash and parse the same bytes: the file cannot change between the check and the load.
    sha = hashlib.sha256(blob).hexdigest()
    if sha != expected_sha:
        raise PromptSetError(f"{directory}: sha256 mismatch for {WEIGHTS_FILE}: file has {sha[:12]}, "
                             f"{CONFIG_FILE} expects {str(expected_sha)[:12]} (tampered or truncated)")
    try:
        tensors = load_safetensors(blob)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise PromptSetError(f"{directory}: {WEIGHTS_FILE} is truncated or corrupt: {e}") from e
    expected = {k: tuple(v.shape) for k, v in prompts.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if set(got) != set(expected):
        raise PromptSetError(f"{directory}: tensor names differ from the config: missing "
                             f"{sorted(set(expected) - set(got))}, unexpected {sorted(set(got) - set(expected))}")
    wrong = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    if wrong:
        raise PromptSetError(f"{directory}: tensor shapes differ from the config (file, expected): {wrong}")
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        raise PromptSetError(f"{directory}: non-finite values (NaN/Inf) in {bad}")
    return tensors
