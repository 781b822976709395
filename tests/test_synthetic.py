"""Tests for the procedural multi-domain dataset (training/synthetic.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import synthetic as S

REPO = Path(__file__).resolve().parents[1]
N_CLASSES = len(S.CLASSES)


# --- determinism -------------------------------------------------------------------------------------------------


def test_same_seed_same_pixels_different_seed_different() -> None:
    for domain in S.DOMAINS:
        a = S.image(3, domain, 7, seed=11)
        np.testing.assert_array_equal(a, S.image(3, domain, 7, seed=11))
        assert not np.array_equal(a, S.image(3, domain, 7, seed=12)), domain
        assert not np.array_equal(a, S.image(3, domain, 8, seed=11)), domain


def test_image_independent_of_batch_composition_and_order() -> None:
    cls, idx = [0, 5, 9, 5], [4, 1, 2, 3]
    for domain in ("sketch", "infograph", "photo"):
        forward = S.batch(domain, cls, idx, seed=3, size=32)
        backward = S.batch(domain, cls[::-1], idx[::-1], seed=3, size=32)
        np.testing.assert_array_equal(forward, backward[::-1])
        for k, (c, i) in enumerate(zip(cls, idx, strict=True)):
            np.testing.assert_array_equal(forward[k], S.image(c, domain, i, seed=3, size=32))


def test_render_uses_only_the_given_rng() -> None:
    a = S.render(2, "painting", np.random.default_rng(5))
    np.testing.assert_array_equal(a, S.render(2, "painting", np.random.default_rng(5)))


# --- coverage ----------------------------------------------------------------------------------------------------


def test_classes_and_domains_metadata() -> None:
    assert N_CLASSES >= 30
    assert len(set(S.CLASSES)) == N_CLASSES
    assert any(" " in c for c in S.CLASSES)
    assert all("_" not in c for c in S.CLASSES)
    assert len(S.DOMAINS) >= 6
    assert sorted(d for ds in S.FAMILIES.values() for d in ds) == sorted(S.DOMAINS)
    for domain, family in S.DOMAINS.items():
        assert domain in S.FAMILIES[family]
    assert all(len(ds) >= 2 for ds in S.FAMILIES.values())


def test_class_folder_round_trip() -> None:
    assert S.class_folder("traffic light") == "traffic_light"
    for name in S.CLASSES:
        assert S.class_name_from_folder(S.class_folder(name)) == name


def test_every_class_in_every_domain_renders() -> None:
    for domain in S.DOMAINS:
        imgs = S.batch(domain, list(range(N_CLASSES)), [0] * N_CLASSES, size=32)
        assert imgs.shape == (N_CLASSES, 32, 32, 3) and imgs.dtype == np.uint8
        assert (imgs.reshape(N_CLASSES, -1).std(axis=1) > 5).all(), domain
    assert S.image(0, "photo", 0).shape == (64, 64, 3)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="valid"):
        S.image(0, "watercolour", 0)
    with pytest.raises(ValueError):
        S.image(N_CLASSES, "photo", 0)
    with pytest.raises(ValueError):
        S.batch("photo", [0, 1], [0])
    assert S.batch("photo", [], [], size=16).shape == (0, 16, 16, 3)


# --- planted family structure ------------------------------------------------------------------------------------


def _style_features(imgs: np.ndarray) -> np.ndarray:
    """Per-image style statistics: brightness, saturation, edge-strength histogram, near-white share."""
    x = imgs.astype(np.float32) / 255.0
    gray, hi, lo = x.mean(-1), x.max(-1), x.min(-1)
    sat = (hi - lo) / np.maximum(hi, 1e-3)
    g = np.abs(np.diff(gray, axis=2))[:, :-1] + np.abs(np.diff(gray, axis=1))[:, :, :-1]
    return np.stack(
        [
            gray.mean((1, 2)),
            sat.mean((1, 2)),
            (g < 2 / 255).mean((1, 2)),  # flat regions
            ((g >= 2 / 255) & (g < 0.1)).mean((1, 2)),  # soft gradients / texture
            (g > 0.25).mean((1, 2)),  # hard edges
            (lo > 0.92).mean((1, 2)),  # near-white background
        ],
        axis=1,
    )


def _family_ok(z: np.ndarray, domains: list[str]) -> list[bool]:
    """For each domain: is its farthest same-family domain nearer than its nearest other-family domain?"""
    dist = np.linalg.norm(z[:, None] - z[None], axis=-1)
    ok = []
    for i, d in enumerate(domains):
        same = [dist[i, j] for j, e in enumerate(domains) if e != d and S.DOMAINS[e] == S.DOMAINS[d]]
        other = [dist[i, j] for j, e in enumerate(domains) if S.DOMAINS[e] != S.DOMAINS[d]]
        ok.append(max(same) < min(other))
    return ok


def test_planted_family_structure() -> None:
    domains = list(S.DOMAINS)
    k = 2
    cls = [c for c in range(N_CLASSES) for _ in range(k)]
    idx = [i for _ in range(N_CLASSES) for i in range(k)]
    # feats[d, c] = mean style features of class c in domain d
    feats = np.stack(
        [_style_features(S.batch(d, cls, idx, seed=1, size=32)).reshape(N_CLASSES, k, -1).mean(1) for d in domains]
    )
    flat = feats.reshape(-1, feats.shape[-1])
    z = (feats - flat.mean(0)) / flat.std(0)

    ok = _family_ok(z.mean(1), domains)  # domain means: strict for every domain
    assert all(ok), dict(zip(domains, ok, strict=True))

    per_class = [hit for c in range(N_CLASSES) for hit in _family_ok(z[:, c], domains)]
    assert np.mean(per_class) >= 0.85, np.mean(per_class)


# --- text --------------------------------------------------------------------------------------------------------


def test_captions_name_class_and_vary() -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(S.CLASSES):
        for domain in S.DOMAINS:
            assert name in S.caption(c, domain, rng)
    caps = {S.caption(0, "sketch", rng) for _ in range(400)}
    assert len(caps) >= 30
    # Templates vary in structure, not only in filled-in words.
    assert len({c.replace("apple", "X").split(" ")[0] for c in caps}) >= 5
    assert any("product" in S.caption(1, "product", rng) for _ in range(50))


def test_prompt_text() -> None:
    assert S.prompt_text("apple") == "a photo of a apple."
    assert S.prompt_text("apple", "sketch") == "a sketch of a apple."
    assert S.prompt_text("{}", "photo") == "a photo of a {}."
    assert len({S.prompt_text("x", d) for d in S.DOMAINS}) == len(S.DOMAINS)
    with pytest.raises(ValueError):
        S.prompt_text("apple", "oil")


# --- export ------------------------------------------------------------------------------------------------------


def test_write_tree_layout_and_lossless(tmp_path: Path) -> None:
    domains = ["quickdraw", "product"]
    summary = S.write_tree(tmp_path, per_class=2, size=16, domains=domains, seed=4)
    assert summary["domains"] == {d: 2 * N_CLASSES for d in domains}
    assert (summary["seed"], summary["size"], summary["total"]) == (4, 16, 4 * N_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(domains)
    for d in domains:
        folders = sorted(p.name for p in (tmp_path / d).iterdir())
        assert folders == sorted(S.class_folder(c) for c in S.CLASSES)
        for f in folders:
            assert sorted(p.name for p in (tmp_path / d / f).iterdir()) == ["00000.png", "00001.png"]
    c = S.CLASSES.index("traffic light")
    png = tmp_path / "product" / "traffic_light" / "00001.png"
    np.testing.assert_array_equal(np.asarray(Image.open(png).convert("RGB")), S.image(c, "product", 1, seed=4, size=16))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training.synthetic", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_tree(tmp_path: Path) -> None:
    out = tmp_path / "tree"
    res = _cli("--out", str(out), "--per-class", "1", "--domains", "sketch,photo", "--size", "16")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["domains"] == {"sketch": N_CLASSES, "photo": N_CLASSES}
    assert len(list(out.glob("*/*/00000.png"))) == 2 * N_CLASSES
    assert sorted(p.name for p in out.iterdir()) == ["photo", "sketch"]


def test_cli_rejects_unknown_domain(tmp_path: Path) -> None:
    res = _cli("--out", str(tmp_path), "--per-class", "1", "--domains", "sketch,watercolour")
    assert res.returncode == 2
    assert "watercolour" in res.stderr and "quickdraw" in res.stderr
    assert not any(tmp_path.iterdir())
