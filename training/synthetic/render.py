"""Drawing a class in a domain's style: label maps at 2x, shading, textures, clutter; deterministic per image."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .classes import _OBJECTS, CLASSES
from .domains import _DOMAIN_INDEX, DOMAINS
from .shapes import Part

# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_OUTLINE = 250  # label of black clipart outlines
_DECOR = 100  # first label of infograph decorations
_CLUTTER = 200  # first label of distractor shapes


@dataclass(frozen=True)
class _Packed:
    """All parts of an object in one point array, so a placement is a single matmul."""

    points: np.ndarray  # (N, 2), unit object coordinates
    spans: tuple[tuple[str, int, int, float, int], ...]  # (kind, start, stop, width, role)


def _pack(parts: Sequence[Part]) -> _Packed:
    spans, start = [], 0
    for kind, pts, w, role in parts:
        spans.append((kind, start, start + len(pts), w, role))
        start += len(pts)
    return _Packed(np.vstack([p for _, p, _, _ in parts]), tuple(spans))


def _densify(pts: np.ndarray, step: float, closed: bool) -> np.ndarray:
    """Resample a polyline so that no segment is longer than ``step`` (room for wobble)."""
    if closed:
        pts = np.vstack([pts, pts[:1]])
    seg = np.diff(pts, axis=0)
    k = np.maximum(1, np.ceil(np.hypot(seg[:, 0], seg[:, 1]) / step)).astype(np.int64)
    idx = np.repeat(np.arange(len(seg)), k)
    t = (np.arange(k.sum()) - np.repeat(np.cumsum(k) - k, k)) / np.repeat(k, k)
    return np.vstack([pts[idx] + seg[idx] * t[:, None], pts[-1:]])


_FILLS: tuple[_Packed, ...] = tuple(_pack(o.parts) for o in _OBJECTS)


@cache
def _strokes(class_index: int, step: float) -> _Packed:
    """Outline / centre-line polylines of a class, densified (line-drawing domains)."""
    return _pack(
        [("line", _densify(p, step, closed=k == "fill"), 0.0, max(r, 1)) for k, p, _, r in _OBJECTS[class_index].parts]
    )


@dataclass(frozen=True)
class _Placement:
    cx: float
    cy: float
    radius: float
    angle: float
    flip: bool

    def apply(self, pts: np.ndarray) -> np.ndarray:
        """Unit object coordinates -> pixel coordinates."""
        c, sn = math.cos(self.angle), math.sin(self.angle)
        fx = -self.radius if self.flip else self.radius
        m = np.array([[c * fx, -sn * self.radius], [sn * fx, c * self.radius]])
        return pts @ m.T + (self.cx, self.cy)


def _place(
    rng: np.random.Generator, s: int, r_lo: float, r_hi: float, jitter: float, centre: tuple[float, float] = (0.5, 0.5)
) -> _Placement:
    """Random position / scale / rotation / mirroring of the object (pixel units)."""
    radius = s * rng.uniform(r_lo, r_hi)
    cx, cy = (np.asarray(centre) + rng.uniform(-jitter, jitter, 2)) * s
    return _Placement(float(cx), float(cy), float(radius), float(rng.uniform(-0.45, 0.45)), bool(rng.random() < 0.5))


def _draw_packed(
    draw: ImageDraw.ImageDraw, packed: _Packed, pts: np.ndarray, radius: float, outline: int = 0, stroke: int = 0
) -> None:
    """Paint part labels (role ids) into a label map.

    ``outline``: black outline width (clipart); ``stroke``: draw every part as a
    polyline of this width instead of filling (line-drawing domains).
    """
    flat = pts.ravel().tolist()
    for kind, a, b, w, role in packed.spans:
        xy = flat[2 * a : 2 * b]
        if stroke:  # densified polylines turn gently: no joint rounding needed (and it is slow)
            draw.line(xy, fill=role, width=stroke)
        elif kind == "fill":
            draw.polygon(xy, fill=role)
            if outline:
                draw.line(xy + xy[:2], fill=_OUTLINE, width=outline, joint="curve")
        else:
            width = max(1, round(w * radius))
            if outline:
                draw.line(xy, fill=_OUTLINE, width=width + 2 * outline, joint="curve")
            draw.line(xy, fill=role, width=width, joint="curve")


def _wobble(rng: np.random.Generator, pts: np.ndarray, sigma: float) -> np.ndarray:
    # Neighbour-smoothed noise reads as a wobbly hand rather than per-vertex speckle.
    noise = rng.normal(0.0, sigma, pts.shape)
    noise[1:-1] = 0.5 * noise[1:-1] + 0.25 * (noise[:-2] + noise[2:])
    return pts + noise


# Closed unit triangle, square and disc as complex points, for distractor shapes.
_CLUTTER_SHAPES = tuple(np.exp(2j * math.pi * np.arange(n + 1) / n) for n in (3, 4, 12))


def _clutter(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    s: int,
    pal: np.ndarray,
    p: float,
    outline: int = 0,
    stroke: int = 0,
) -> None:
    """With probability ``p`` add 1-3 small muted distractor shapes (drawn behind the object)."""
    if rng.random() >= p:
        return
    for i, (kind, r, a, x, y, h, sat, val) in enumerate(rng.random((int(rng.integers(1, 4)), 8))):
        z = (
            _CLUTTER_SHAPES[int(kind * 3)] * (s * (0.04 + 0.04 * r) * np.exp(2j * math.pi * a))
            + s * (0.08 + 0.84 * x)
            + 1j * s * (0.08 + 0.84 * y)
        )
        xy = np.stack([z.real, z.imag], axis=1).ravel().tolist()
        label = _CLUTTER + i
        pal[label] = _hsv(h, 0.15 + 0.35 * sat, 0.4 + 0.45 * val)
        if stroke:
            draw.line(xy, fill=label, width=stroke)
            continue
        draw.polygon(xy, fill=label)
        if outline:
            draw.line(xy, fill=_OUTLINE, width=outline, joint="curve")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255.0


def _rgb(c: np.ndarray) -> tuple[int, int, int]:
    r, g, b = np.clip(np.rint(c), 0, 255).astype(int).tolist()
    return r, g, b


def _new_canvas(s: int) -> tuple[Image.Image, ImageDraw.ImageDraw, np.ndarray]:
    """Empty label map (0 = background) at internal size, its drawer and a palette."""
    im = Image.new("L", (s, s), 0)
    pal = np.zeros((256, 3), dtype=np.float32)
    pal[_OUTLINE] = (15.0, 15.0, 18.0)
    return im, ImageDraw.Draw(im), pal


def _palette_bytes(pal: np.ndarray) -> bytes:
    return np.clip(np.rint(pal), 0, 255).astype(np.uint8).tobytes()


def _colourise(lab: Image.Image, pal: np.ndarray) -> Image.Image:
    """Label map -> RGB through the palette, then 2x box downsample (anti-aliasing)."""
    lab.putpalette(_palette_bytes(pal), "RGB")
    return lab.convert("RGB").reduce(2)


# Per-pixel work (noise, shading, blur, compositing) runs in Pillow at the output
# size, and smooth fields (shading, lighting, grain) come from cached banks that are
# cropped per image: numpy broadcasting over H x W x 3 was ~5x slower.

_N_LIGHTS = 8  # quantised light directions


def _to_l(a: np.ndarray) -> Image.Image:
    """Array of factors in [0, 1] -> L image (255 = 1.0) for ImageChops.multiply."""
    return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))


@lru_cache(maxsize=16)
def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    return x, y


@lru_cache(maxsize=16)
def _unit_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates in [-0.5, 0.5] on an n x n grid."""
    u = np.linspace(-0.5, 0.5, n)
    return np.broadcast_to(u[None, :], (n, n)), np.broadcast_to(u[:, None], (n, n))


@lru_cache(maxsize=16)
def _shading_bank(size: int) -> tuple[tuple[Image.Image, Image.Image], ...]:
    """Per light direction: (shade, highlight) fields on a 2*size canvas around an
    object of canonical radius 0.35*size centred at (size, size)."""
    x, y = _grid(2 * size)
    dx, dy = (x - size) / (0.35 * size), (y - size) / (0.35 * size)
    bank = []
    for a in np.linspace(-0.85 * math.pi, -0.15 * math.pi, _N_LIGHTS):  # light from above
        lx, ly = math.cos(a), math.sin(a)
        shade = np.clip(0.75 + 0.3 * (dx * lx + dy * ly), 0.4, 1.0)
        highlight = 0.6 * np.exp(-((dx - 0.45 * lx) ** 2 + (dy - 0.45 * ly) ** 2) / 0.08)
        bank.append((_to_l(shade).convert("RGB"), _to_l(highlight).convert("RGB")))
    return tuple(bank)


@lru_cache(maxsize=16)
def _grain_tile(std: float, size: int) -> Image.Image:
    """Fixed monochrome grain (centred on 128); images take random crops of it."""
    n = max(256, 2 * size)
    noise = np.random.default_rng(20240229).standard_normal((n, n)) * std + 128.0
    return Image.fromarray(np.clip(np.rint(noise), 0, 255).astype(np.uint8)).convert("RGB")


@lru_cache(maxsize=16)
def _floor(size: int) -> Image.Image:
    """Studio backdrop (product domain): white sweep with a vignette, greyer at the bottom."""
    x, y = _grid(size)
    r2 = ((x / size - 0.5) ** 2 + (y / size - 0.45) ** 2) * 2.0
    return _to_l(1.0 - 0.35 * r2 - 0.05 * y / size)


def _grain(img: Image.Image, rng: np.random.Generator, std: float) -> Image.Image:
    size = img.size[0]
    tile = _grain_tile(std, size)
    ox, oy = (int(v) for v in rng.integers(0, tile.size[0] - size + 1, 2))
    return ImageChops.add(img, tile.crop((ox, oy, ox + size, oy + size)), 1.0, -128)


def _smooth_noise(rng: np.random.Generator, size: int, grid: tuple[int, int], lo: float, hi: float) -> Image.Image:
    """Monochrome low-frequency noise (RGB) with values in [lo, hi] x 255: a small
    random grid upsampled bicubically."""
    small = rng.integers(round(lo * 255), round(hi * 255) + 1, grid, dtype=np.uint8)
    return Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def _line_domain(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int, quick: bool) -> np.ndarray:
    s = 2 * size
    im, draw, pal = _new_canvas(s)
    # Stroke colour keeps the class hue but is darkened to a fixed luminance cap,
    # so light classes (cloud, candle) stay visible on white.
    lum = colours @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    pal[1 : len(colours) + 1] = colours * np.minimum(1.0, (150.0 if quick else 80.0) / np.maximum(lum, 1.0))[:, None]
    thin = max(1, s // 64)
    _clutter(draw, rng, s, pal, 0.1 if quick else 0.25, stroke=thin)
    pl = _place(rng, s, 0.3, 0.4, 0.08)
    if quick:
        packed = _strokes(cls, 0.16)
        _draw_packed(
            draw, packed, _wobble(rng, pl.apply(packed.points), 0.018 * s), pl.radius, stroke=max(2, round(0.045 * s))
        )
        pal[0] = 255.0
        return np.array(_colourise(im, pal))
    packed = _strokes(cls, 0.22)
    base = pl.apply(packed.points)
    for _ in range(2):  # sketchy double stroke
        _draw_packed(draw, packed, _wobble(rng, base, 0.006 * s), pl.radius, stroke=thin)
    pal[0] = np.array([246.0, 243.0, 234.0]) + rng.uniform(-5, 5)  # paper white
    return np.array(_colourise(im, pal))


def _render_sketch(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return _line_domain(cls, colours, rng, size, quick=False)


def _render_quickdraw(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    return _line_domain(cls, colours, rng, size, quick=True)


def _draw_object(draw: ImageDraw.ImageDraw, cls: int, pl: _Placement, outline: int = 0) -> None:
    _draw_packed(draw, _FILLS[cls], pl.apply(_FILLS[cls].points), pl.radius, outline)


def _render_clipart(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    s = 2 * size
    im, draw, pal = _new_canvas(s)
    # Push colours towards full saturation: flat "vector art" look.
    grey = colours.mean(axis=1, keepdims=True)
    pal[1 : len(colours) + 1] = grey + 1.3 * (colours - grey)
    outline = max(2, round(s * 0.025))
    _clutter(draw, rng, s, pal, 0.3, outline=outline)
    _draw_object(draw, cls, _place(rng, s, 0.3, 0.4, 0.08), outline)
    pal[0] = _hsv(rng.random(), rng.uniform(0.1, 0.25), rng.uniform(0.88, 0.98))
    return np.array(_colourise(im, pal))


def _render_infograph(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    s = 2 * size
    im, draw, pal = _new_canvas(s)
    pal[1 : len(colours) + 1] = colours
    hue = rng.random()
    pal[_DECOR] = _hsv(hue, 0.5, 0.7)  # bars / title accent
    pal[_DECOR + 1] = _hsv(hue, 0.35, 0.85)
    pal[_DECOR + 2] = (120.0, 120.0, 130.0)  # "text" lines
    draw.rectangle((0.06 * s, 0.04 * s, rng.uniform(0.4, 0.7) * s, 0.09 * s), fill=_DECOR)
    if rng.random() < 0.5:  # layout A: bar chart along the bottom, object above
        for i in range(int(rng.integers(3, 6))):
            x0 = (0.08 + 0.11 * i) * s
            draw.rectangle((x0, s * (0.95 - rng.uniform(0.06, 0.22)), x0 + 0.08 * s, 0.95 * s), fill=_DECOR + (i % 2))
        centre = (0.5, 0.45)
    else:  # layout B: text lines + bullets on the right, object on the left
        for i in range(int(rng.integers(3, 6))):
            y = (0.2 + 0.15 * i) * s
            draw.ellipse((0.64 * s, y, 0.68 * s, y + 0.04 * s), fill=_DECOR)
            draw.rectangle((0.71 * s, y + 0.01 * s, rng.uniform(0.8, 0.95) * s, y + 0.03 * s), fill=_DECOR + 2)
        centre = (0.34, 0.52)
    _draw_object(draw, cls, _place(rng, s, 0.22, 0.27, 0.04, centre))
    if rng.random() < 0.5:  # small icon duplicate in a corner
        corner = (0.88, 0.14) if centre[0] < 0.5 else (0.12 + 0.76 * float(rng.random() < 0.5), 0.2)
        _draw_object(draw, cls, _place(rng, s, 0.07, 0.09, 0.0, corner))
    # Pastel background hue kept away from the object's main hue so the flat icon never vanishes.
    main_hue = colorsys.rgb_to_hsv(*(colours[0] / 255.0))[0]
    pal[0] = _hsv((main_hue + rng.uniform(0.25, 0.75)) % 1.0, rng.uniform(0.18, 0.32), rng.uniform(0.88, 0.96))
    return np.array(_colourise(im, pal))


_MASK_PALETTE = bytes(3) + bytes([255]) * 765  # label 0 -> black, any other label -> white


def _object_layer(
    cls: int, colours: np.ndarray, rng: np.random.Generator, size: int, clutter_p: float, supersample: bool = True
) -> tuple[Image.Image, Image.Image]:
    """Shaded object (+ clutter) RGB layer and its coverage mask, at output size.

    ``supersample=False`` draws directly at output size (for domains blurred afterwards).
    """
    k = 2 if supersample else 1
    lab, draw, pal = _new_canvas(k * size)
    pal[1 : len(colours) + 1] = colours
    # Label 0 takes the main colour so that the anti-aliased rim blends towards the
    # object instead of towards black when composited with the mask.
    pal[0] = colours[0]
    _clutter(draw, rng, k * size, pal, clutter_p)
    pl = _place(rng, k * size, 0.3, 0.4, 0.08)
    _draw_object(draw, cls, pl)
    # Two palette passes over the same label map: coverage mask, then colours.
    lab.putpalette(_MASK_PALETTE, "RGB")
    mask = lab.convert("L")
    lab.putpalette(_palette_bytes(pal), "RGB")
    rgb = lab.convert("RGB")
    if supersample:
        mask, rgb = mask.reduce(2), rgb.reduce(2)
    # Directional shading (multiply) + specular highlight (screen), light from above.
    shade, highlight = _shading_bank(size)[int(rng.integers(_N_LIGHTS))]
    box = (size - round(pl.cx / k), size - round(pl.cy / k))
    box += (box[0] + size, box[1] + size)
    return ImageChops.screen(ImageChops.multiply(rgb, shade.crop(box)), highlight.crop(box)), mask


def _field(rgb: np.ndarray, size: int) -> Image.Image:
    """Small (h, w, 3) colour field in 0..255 -> smooth RGB image (bilinear upsampling)."""
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BILINEAR
    )


def _render_photo(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    rgb, mask = _object_layer(cls, colours, rng, size, 0.4)
    # Background, built on a 14x14 grid and upsampled once: two scene colours mixed by
    # low-frequency plane waves (blotches) x per-cell texture x a linear lighting ramp.
    c1, c2 = (_hsv(rng.random(), rng.uniform(0.15, 0.55), rng.uniform(0.5, 0.95)) for _ in range(2))
    u, v = _unit_grid(14)
    fx, fy, phase = rng.uniform(-6.0, 6.0, (3, 2))
    mix = (0.5 + 0.25 * (np.sin(fx[0] * u + fy[0] * v + phase[0]) + np.sin(fx[1] * u + fy[1] * v + phase[1])))[
        ..., None
    ]
    a = rng.uniform(0, 2 * math.pi)
    light = np.minimum(1.0, 0.9 + 0.25 * (u * math.cos(a) + v * math.sin(a)))
    bg = _field((c1 * (1 - mix) + c2 * mix) * (rng.uniform(0.7, 1.0, (14, 14)) * light)[..., None], size)
    bg.paste(rgb, (0, 0), mask)
    return np.array(_grain(bg, rng, 7.0))


def _render_painting(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    warm = np.array([1.08, 1.0, 0.85], dtype=np.float32)  # warm varnish tint
    # Drawn without supersampling: the final blur anti-aliases anyway.
    rgb, mask = _object_layer(cls, np.clip(colours * warm, 0, 255), rng, size, 0.3, supersample=False)
    canvas = _hsv(rng.uniform(0.04, 0.14), rng.uniform(0.2, 0.45), rng.uniform(0.8, 0.97))
    img = _field(canvas * rng.uniform(0.85, 1.0, (3, 3, 1)), size)
    img.paste(rgb, (0, 0), mask)
    # Brush strokes: noise stretched along one axis, modulating object and canvas alike.
    streaks = _smooth_noise(rng, size, (4, 24) if rng.random() < 0.5 else (24, 4), 0.75, 1.0)
    return np.array(ImageChops.multiply(img, streaks).filter(ImageFilter.BoxBlur(size / 80)))


_SHADOW_LUT = [round(255 - 0.35 * v) for v in range(256)]


def _render_product(cls: int, colours: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    rgb, mask = _object_layer(cls, colours, rng, size, 0.0)
    # Soft drop shadow: the silhouette shifted down-right, blurred, darkening the floor.
    shadow = Image.new("L", (size, size), 0)
    shift = max(1, round(0.06 * size))
    shadow.paste(mask, (shift, shift))
    floor = ImageChops.multiply(_floor(size), shadow.filter(ImageFilter.BoxBlur(size / 24)).point(_SHADOW_LUT))
    tint = Image.new("RGB", (size, size), _rgb(_hsv(rng.random(), rng.uniform(0.05, 0.15), 1.0)))  # off-white sweep
    img = ImageChops.multiply(floor.convert("RGB"), tint)
    img.paste(rgb, (0, 0), mask)
    return np.array(_grain(img, rng, 3.0))


_RENDERERS: dict[str, Callable[[int, np.ndarray, np.random.Generator, int], np.ndarray]] = {
    "sketch": _render_sketch,
    "quickdraw": _render_quickdraw,
    "clipart": _render_clipart,
    "infograph": _render_infograph,
    "photo": _render_photo,
    "painting": _render_painting,
    "product": _render_product,
}


def _check(class_index: int, domain: str) -> None:
    if not 0 <= class_index < len(CLASSES):
        raise ValueError(f"class_index {class_index} out of range [0, {len(CLASSES)})")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; valid: {', '.join(DOMAINS)}")


def render(class_index: int, domain: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Draw one image of ``CLASSES[class_index]`` in ``domain`` (H x W x 3 uint8).

    All randomness comes from ``rng``.  Geometry is drawn as a label map at 2x
    ``size`` and box-downsampled (painting draws at 1x and blurs instead).
    """
    _check(class_index, domain)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    obj = _OBJECTS[class_index]
    # Per-image colour jitter: brightness and a small per-channel tint.
    jitter = rng.uniform(0.88, 1.08) * rng.normal(1.0, 0.05, 3)
    colours = np.clip(np.array(obj.colours, dtype=np.float32) * jitter.astype(np.float32), 0, 255)
    return _RENDERERS[domain](class_index, colours, rng, size)


def _image_rng(class_index: int, domain: str, index: int, seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _DOMAIN_INDEX[domain], class_index, index]))


def image(class_index: int, domain: str, index: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """Deterministic image number ``index`` of a class in a domain."""
    _check(class_index, domain)
    return render(class_index, domain, _image_rng(class_index, domain, index, seed), size)


def batch(
    domain: str, class_indices: Sequence[int], indices: Sequence[int], seed: int = 0, size: int = 64
) -> np.ndarray:
    """Stack of ``image(c, domain, i, seed, size)`` for paired classes / indices: [N, H, W, 3] uint8."""
    if len(class_indices) != len(indices):
        raise ValueError(f"class_indices ({len(class_indices)}) and indices ({len(indices)}) differ in length")
    if not len(indices):
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack([image(int(c), domain, int(i), seed, size) for c, i in zip(class_indices, indices, strict=True)])
