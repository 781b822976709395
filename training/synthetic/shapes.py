"""The object classes: each a few polygons and polylines in unit coordinates, with its colours."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------------------
# Geometry helpers (unit object coordinates: roughly [-1, 1]^2, y points down)
# ---------------------------------------------------------------------------

Part = tuple[str, np.ndarray, float, int]  # (kind "fill"|"line", points (N,2), width, colour role)


def _arc(cx: float, cy: float, r: float, a0: float, a1: float, n: int = 12, ry: float | None = None) -> np.ndarray:
    """Points on an (elliptic) arc from angle a0 to a1 (radians, y down)."""
    t = np.linspace(a0, a1, n)
    return np.stack([cx + r * np.cos(t), cy + (r if ry is None else ry) * np.sin(t)], axis=1)


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 22) -> np.ndarray:
    return _arc(cx, cy, rx, 0.0, 2 * math.pi * (n - 1) / n, n, ry)


def _circle(cx: float, cy: float, r: float, n: int = 22) -> np.ndarray:
    return _ellipse(cx, cy, r, r, n)


def _rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)


def _regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    return _arc(0.0, 0.0, r, phase, phase + 2 * math.pi * (n - 1) / n, n)


def _star(n: int, ro: float, ri: float) -> np.ndarray:
    t = -math.pi / 2 + np.arange(2 * n) * math.pi / n
    r = np.where(np.arange(2 * n) % 2 == 0, ro, ri)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _rotated(pts: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return pts @ rot.T


def _pts(*xy: tuple[float, float]) -> np.ndarray:
    return np.array(xy, dtype=np.float64)


def _fill(pts: np.ndarray, role: int = 1) -> Part:
    """Filled polygon part; role 0 punches a hole (background shows through)."""
    return ("fill", np.asarray(pts, dtype=np.float64), 0.0, role)


def _line(pts: np.ndarray, width: float, role: int = 1) -> Part:
    """Polyline part with a width in unit object coordinates."""
    return ("line", np.asarray(pts, dtype=np.float64), width, role)


def _rotate_parts(parts: list[Part], degrees: float) -> list[Part]:
    return [(k, _rotated(p, degrees), w, r) for k, p, w, r in parts]


@dataclass(frozen=True)
class _ObjectClass:
    """Procedural definition of one object class."""

    name: str
    colour_word: str  # used in captions, describes the canonical main colour
    colours: tuple[tuple[int, int, int], ...]  # role 1, 2, ... colours
    parts: tuple[Part, ...]


def _apple() -> list[Part]:
    t = np.linspace(-math.pi, math.pi, 30, endpoint=False)
    d = np.angle(np.exp(1j * (t + math.pi / 2)))  # angular distance from the top
    r = 0.85 + 0.06 * np.cos(2 * t) - 0.25 * np.exp(-(d**2) / 0.12)
    body = np.stack([r * np.cos(t), 0.12 + r * np.sin(t)], axis=1)
    leaf = _pts((0.08, -0.78), (0.35, -1.0), (0.7, -0.95), (0.4, -0.75))
    return [_fill(body, 1), _line(_pts((0.0, -0.5), (0.08, -1.0)), 0.12, 2), _fill(leaf, 3)]


def _paper_clip() -> list[Part]:
    path = np.vstack(
        [
            _pts((0.22, -0.4), (0.22, 0.55)),
            _arc(0.04, 0.55, 0.18, 0.0, math.pi, 8),
            _pts((-0.14, -0.7)),
            _arc(0.13, -0.7, 0.27, math.pi, 2 * math.pi, 10),
            _pts((0.4, 0.75)),
            _arc(0.05, 0.75, 0.35, 0.0, math.pi, 10),
            _pts((-0.3, -0.45)),
        ]
    )
    return [_line(path * 1.1, 0.11, 1)]


def _crescent() -> list[Part]:
    outer = _arc(0, 0, 1.0, math.pi / 3, 5 * math.pi / 3, 18)
    c = 0.9  # inner circle through the outer arc's end points
    r = math.hypot(0.5 - c, math.sin(math.pi / 3))
    a = math.atan2(math.sin(math.pi / 3), 0.5 - c)
    inner = _arc(c, 0, r, 2 * math.pi - a, a, 14)
    return [_fill(np.vstack([outer, inner]) + _pts((-0.05, 0.0)), 1)]


def _heart() -> list[Part]:
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return [_fill(np.stack([x, y + 2.5], axis=1) / 16.5, 1)]


def _donut() -> list[Part]:
    t = np.linspace(0, 2 * math.pi, 26, endpoint=False)
    r = 0.78 + 0.05 * np.sin(7 * t)  # wavy icing edge
    icing = np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    sprinkles = [
        _line(_rotated(_pts((-0.07, 0), (0.07, 0)), a * 57) + _pts((0.55 * math.cos(a), 0.55 * math.sin(a))), 0.07, 3)
        for a in (0.3, 1.5, 2.6, 3.7, 4.9)
    ]
    return [_fill(_circle(0, 0, 1.0), 1), _fill(icing, 2), *sprinkles, _fill(_circle(0, 0, 0.3), 0)]


def _umbrella() -> list[Part]:
    canopy = np.vstack(
        [
            _arc(0, 0.05, 1.0, math.pi, 2 * math.pi, 16),
            _pts((0.66, -0.05), (0.33, 0.05), (0.0, -0.05), (-0.33, 0.05), (-0.66, -0.05)),
        ]
    )
    handle = np.vstack([_pts((0.0, 0.0)), _arc(-0.15, 0.78, 0.15, 0.0, math.pi, 8)])
    return [_line(handle, 0.09, 2), _fill(canopy, 1)]


def _mushroom() -> list[Part]:
    cap = _arc(0, 0.05, 1.0, math.pi, 2 * math.pi, 16, 0.85)
    return [
        _fill(_pts((-0.28, 0.0), (0.28, 0.0), (0.34, 0.9), (-0.34, 0.9)), 2),
        _fill(cap, 1),
        _fill(_circle(-0.5, -0.3, 0.14, 12), 3),
        _fill(_circle(0.15, -0.55, 0.13, 12), 3),
        _fill(_circle(0.55, -0.22, 0.11, 12), 3),
    ]


def _leaf() -> list[Part]:
    x = np.linspace(-1, 1, 12)
    top = np.stack([x, -0.45 * np.sin(math.pi * (x + 1) / 2)], axis=1)
    bottom = np.stack([x[::-1], 0.45 * np.sin(math.pi * (x[::-1] + 1) / 2)], axis=1)
    parts = [_fill(np.vstack([top, bottom[1:-1]]), 1), _line(_pts((-1.15, 0.0), (0.85, 0.0)), 0.07, 2)]
    parts += [_line(_pts((x0, 0.0), (x0 + 0.25, -0.25 * s)), 0.05, 2) for x0 in (-0.5, 0.0) for s in (1, -1)]
    return _rotate_parts(parts, -30)


def _cloud() -> list[Part]:
    t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
    r = 0.8 + 0.2 * np.abs(np.sin(3 * t))  # six bumps
    return [_fill(np.stack([1.1 * r * np.cos(t), 0.72 * r * np.sin(t)], axis=1), 1)]


def _sun() -> list[Part]:
    rays = [
        _line(_pts((0.62 * math.cos(a), 0.62 * math.sin(a)), (0.98 * math.cos(a), 0.98 * math.sin(a))), 0.11, 1)
        for a in np.arange(8) * math.pi / 4
    ]
    return [_fill(_circle(0, 0, 0.5), 1), *rays]


def _pencil() -> list[Part]:
    parts = [
        _fill(_rect(-0.75, -0.17, 0.55, 0.17), 1),
        _fill(_rect(-1.0, -0.17, -0.75, 0.17), 2),
        _fill(_pts((0.55, -0.17), (1.0, 0.0), (0.55, 0.17)), 3),
        _fill(_pts((0.85, -0.055), (1.0, 0.0), (0.85, 0.055)), 4),
        _line(_pts((-0.75, 0.0), (0.55, 0.0)), 0.04, 4),
    ]
    return _rotate_parts(parts, -40)


def _carrot() -> list[Part]:
    body = np.vstack([_arc(0, -0.45, 0.3, math.pi, 2 * math.pi, 8, 0.12), _pts((0.0, 1.0))])
    leaves = [_line(_pts((0.0, -0.55), (dx, -1.05)), 0.1, 2) for dx in (-0.3, 0.0, 0.3)]
    lines = [_line(_pts((-0.2 + 0.05 * i, -0.1 + 0.3 * i), (0.0, -0.05 + 0.3 * i)), 0.05, 3) for i in range(3)]
    return _rotate_parts([*leaves, _fill(body, 1), *lines], 35)


def _magnet() -> list[Part]:
    u = np.vstack(
        [
            _pts((-0.8, -0.75)),
            _arc(0, 0.1, 0.8, math.pi, 0.0, 14),
            _pts((0.8, -0.75), (0.35, -0.75)),
            _arc(0, 0.1, 0.35, 0.0, math.pi, 10),
            _pts((-0.35, -0.75)),
        ]
    )
    return [
        _fill(u + _pts((0.0, 0.05)), 1),
        _fill(_rect(-0.8, -0.95, -0.35, -0.6), 2),
        _fill(_rect(0.35, -0.95, 0.8, -0.6), 2),
    ]


def _kite() -> list[Part]:
    tail = np.vstack([_pts((0.0, 0.65))] + [_pts((0.18 * (-1) ** i, 0.75 + 0.09 * i)) for i in range(4)])
    return [
        _line(tail, 0.06, 2),
        _fill(_pts((0.0, -1.0), (0.55, -0.3), (0.0, 0.65), (-0.55, -0.3)), 1),
        _line(_pts((0.0, -1.0), (0.0, 0.65)), 0.05, 2),
        _line(_pts((-0.55, -0.3), (0.55, -0.3)), 0.05, 2),
        _fill(_pts((0.18, 0.97), (0.34, 0.9), (0.3, 1.06)), 3),
        _fill(_pts((-0.18, 0.8), (-0.34, 0.74), (-0.3, 0.9)), 3),
    ]


def _eyeglasses() -> list[Part]:
    return [
        _line(np.vstack([_ellipse(-0.48, 0.0, 0.36, 0.28, 18), _pts((-0.12, 0.0))]), 0.1, 1),
        _line(np.vstack([_ellipse(0.48, 0.0, 0.36, 0.28, 18)[::-1], _pts((0.84, 0.0))]), 0.1, 1),
        _line(_arc(0, 0.02, 0.14, math.pi, 2 * math.pi, 6), 0.08, 1),
        _line(_pts((-0.84, -0.05), (-1.0, -0.3)), 0.08, 1),
        _line(_pts((0.84, -0.05), (1.0, -0.3)), 0.08, 1),
        _fill(_ellipse(-0.48, 0.0, 0.3, 0.22, 14), 2),
        _fill(_ellipse(0.48, 0.0, 0.3, 0.22, 14), 2),
    ]
