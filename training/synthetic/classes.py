"""The class table: each class's name, colour word, colours and parts (shapes.py draws them)."""

from __future__ import annotations

import math

import numpy as np

from .shapes import (
    _apple,
    _arc,
    _carrot,
    _circle,
    _cloud,
    _crescent,
    _donut,
    _ellipse,
    _eyeglasses,
    _fill,
    _heart,
    _kite,
    _leaf,
    _line,
    _magnet,
    _mushroom,
    _ObjectClass,
    _paper_clip,
    _pencil,
    _pts,
    _rect,
    _regular,
    _star,
    _sun,
    _umbrella,
)

# Shape + colour scheme per class.  Colours were picked so that classes sharing a
# hue differ strongly in silhouette (apple / stop sign / magnet / mushroom) and
# similar silhouettes differ in hue or attachments.
_OBJECTS: tuple[_ObjectClass, ...] = (
    _ObjectClass("apple", "red", ((205, 30, 40), (110, 70, 30), (60, 165, 60)), tuple(_apple())),
    _ObjectClass(
        "traffic light",
        "black",
        ((50, 50, 55), (235, 35, 30), (250, 205, 20), (40, 195, 70)),
        (
            _fill(_rect(-0.42, -1, 0.42, 1), 1),
            _fill(_circle(0, -0.6, 0.26), 2),
            _fill(_circle(0, 0, 0.26), 3),
            _fill(_circle(0, 0.6, 0.26), 4),
        ),
    ),
    _ObjectClass("paper clip", "silver", ((110, 125, 165),), tuple(_paper_clip())),
    _ObjectClass("star", "gold", ((245, 190, 20),), (_fill(_star(5, 1.0, 0.42) + _pts((0.0, 0.1)), 1),)),
    _ObjectClass("moon", "pale blue", ((165, 185, 235),), tuple(_crescent())),
    _ObjectClass("heart", "pink", ((235, 70, 140),), tuple(_heart())),
    _ObjectClass(
        "stop sign",
        "red",
        ((210, 25, 35), (250, 250, 250)),
        (_fill(_regular(8, 1.0, math.pi / 8), 1), _fill(_rect(-0.62, -0.16, 0.62, 0.16), 2)),
    ),
    _ObjectClass("donut", "brown", ((205, 145, 80), (240, 120, 175), (90, 200, 235)), tuple(_donut())),
    _ObjectClass(
        "pizza slice",
        "yellow",
        ((245, 195, 70), (165, 95, 40), (195, 40, 30)),
        (
            _fill(_pts((-0.85, -0.75), (0.85, -0.75), (0.0, 1.0)), 1),
            _fill(_pts((-0.92, -0.98), (0.92, -0.98), (0.87, -0.68), (-0.87, -0.68)), 2),
            _fill(_circle(-0.32, -0.38, 0.15, 12), 3),
            _fill(_circle(0.28, -0.35, 0.15, 12), 3),
            _fill(_circle(0.0, 0.2, 0.13, 12), 3),
        ),
    ),
    _ObjectClass(
        "lightning bolt",
        "yellow",
        ((250, 225, 30),),
        (
            _fill(
                _pts((0.1, -1.0), (0.6, -1.0), (0.15, -0.15), (0.5, -0.15), (-0.35, 1.0), (-0.05, 0.1), (-0.45, 0.1)), 1
            ),
        ),
    ),
    _ObjectClass(
        "arrow",
        "blue",
        ((40, 90, 220),),
        (_fill(_pts((-1, -0.22), (0.2, -0.22), (0.2, -0.6), (1, 0), (0.2, 0.6), (0.2, 0.22), (-1, 0.22)), 1),),
    ),
    _ObjectClass(
        "pencil", "yellow", ((245, 200, 40), (240, 140, 160), (230, 190, 140), (50, 50, 50)), tuple(_pencil())
    ),
    _ObjectClass("umbrella", "purple", ((140, 60, 185), (40, 40, 40)), tuple(_umbrella())),
    _ObjectClass("mushroom", "red", ((190, 45, 35), (240, 228, 205), (250, 250, 250)), tuple(_mushroom())),
    _ObjectClass(
        "tree",
        "green",
        ((40, 140, 60), (110, 70, 35)),
        (
            _fill(_rect(-0.15, 0.6, 0.15, 1.0), 2),
            _fill(_pts((0.0, -0.2), (0.9, 0.65), (-0.9, 0.65)), 1),
            _fill(_pts((0.0, -0.6), (0.72, 0.15), (-0.72, 0.15)), 1),
            _fill(_pts((0.0, -1.0), (0.55, -0.3), (-0.55, -0.3)), 1),
        ),
    ),
    _ObjectClass(
        "house",
        "beige",
        ((225, 190, 130), (190, 50, 40), (90, 60, 40)),
        (
            _fill(_rect(-0.7, -0.1, 0.7, 0.95), 1),
            _fill(_pts((-0.95, -0.05), (0.0, -0.95), (0.95, -0.05)), 2),
            _fill(_rect(-0.18, 0.4, 0.18, 0.95), 3),
            _fill(_rect(0.32, 0.1, 0.56, 0.34), 3),
        ),
    ),
    _ObjectClass(
        "fish",
        "teal",
        ((30, 165, 195), (20, 95, 125), (20, 20, 20)),
        (
            _fill(_pts((0.5, 0.0), (1.0, -0.5), (1.0, 0.5)), 2),
            _fill(_ellipse(-0.15, 0.0, 0.75, 0.45), 1),
            _fill(_circle(-0.52, -0.1, 0.08, 8), 3),
        ),
    ),
    _ObjectClass(
        "key",
        "gold",
        ((200, 160, 50),),
        (
            _fill(_rect(-0.3, -0.08, 1.0, 0.08), 1),
            _fill(_circle(-0.6, 0.0, 0.4), 1),
            _fill(_rect(0.6, 0.0, 0.72, 0.38), 1),
            _fill(_rect(0.84, 0.0, 0.96, 0.28), 1),
            _fill(_circle(-0.6, 0.0, 0.18, 12), 0),
        ),
    ),
    _ObjectClass(
        "hammer",
        "brown",
        ((150, 95, 50), (135, 135, 150)),
        (
            _fill(_rect(-0.12, -0.55, 0.12, 1.0), 1),
            _fill(_pts((-0.95, -0.7), (-0.55, -0.95), (0.75, -0.95), (0.75, -0.5), (-0.55, -0.5)), 2),
        ),
    ),
    _ObjectClass(
        "coffee mug",
        "navy",
        ((40, 60, 145), (150, 150, 150)),
        (
            _fill(_ellipse(0.55, 0.15, 0.4, 0.32), 1),
            _fill(_ellipse(0.55, 0.15, 0.2, 0.15, 14), 0),
            _fill(_rect(-0.7, -0.5, 0.45, 0.9), 1),
            _line(_pts((-0.35, -0.62), (-0.22, -0.8), (-0.35, -1.0)), 0.07, 2),
            _line(_pts((0.05, -0.62), (0.18, -0.8), (0.05, -1.0)), 0.07, 2),
        ),
    ),
    _ObjectClass(
        "light bulb",
        "yellow",
        ((250, 232, 110), (130, 130, 140), (60, 60, 60)),
        (
            _fill(_pts((-0.35, 0.1), (0.35, 0.1), (0.27, 0.5), (-0.27, 0.5)), 1),
            _fill(_circle(0, -0.3, 0.65), 1),
            _fill(_rect(-0.27, 0.45, 0.27, 0.95), 2),
            _line(_pts((-0.27, 0.62), (0.27, 0.62)), 0.06, 3),
            _line(_pts((-0.27, 0.79), (0.27, 0.79)), 0.06, 3),
        ),
    ),
    _ObjectClass("sun", "orange", ((250, 140, 20),), tuple(_sun())),
    _ObjectClass("cloud", "light blue", ((140, 190, 240),), tuple(_cloud())),
    _ObjectClass("leaf", "green", ((70, 170, 50), (30, 100, 30)), tuple(_leaf())),
    _ObjectClass(
        "bell",
        "gold",
        ((225, 175, 40), (120, 80, 20)),
        (
            _line(_arc(0, -0.85, 0.13, math.pi, 2 * math.pi, 6), 0.07, 2),
            _fill(
                np.vstack(
                    [
                        _arc(0, -0.45, 0.45, math.pi, 2 * math.pi, 10, 0.4),
                        _pts((0.5, 0.15), (0.88, 0.6), (-0.88, 0.6), (-0.5, 0.15)),
                    ]
                ),
                1,
            ),
            _fill(_circle(0, 0.72, 0.18, 12), 2),
        ),
    ),
    _ObjectClass(
        "gem",
        "cyan",
        ((60, 200, 230), (170, 235, 250), (25, 120, 155)),
        (
            _fill(_pts((-1.0, -0.3), (-0.55, -0.8), (0.55, -0.8), (1.0, -0.3), (0.0, 1.0)), 1),
            _fill(_pts((-1.0, -0.3), (-0.55, -0.8), (0.55, -0.8), (1.0, -0.3)), 2),
            _line(_pts((-0.4, -0.3), (0.0, 1.0), (0.4, -0.3)), 0.05, 3),
        ),
    ),
    _ObjectClass(
        "bow tie",
        "magenta",
        ((200, 40, 160), (140, 20, 105)),
        (
            _fill(_pts((-1.0, -0.65), (0.0, 0.0), (-1.0, 0.65)), 1),
            _fill(_pts((1.0, -0.65), (0.0, 0.0), (1.0, 0.65)), 1),
            _fill(_rect(-0.2, -0.25, 0.2, 0.25), 2),
        ),
    ),
    _ObjectClass(
        "envelope",
        "tan",
        ((225, 200, 150), (140, 100, 55)),
        (
            _fill(_rect(-1.0, -0.62, 1.0, 0.62), 1),
            _line(_pts((-1.0, -0.62), (0.0, 0.15), (1.0, -0.62)), 0.07, 2),
            _line(_pts((-1.0, 0.62), (-0.3, 0.0)), 0.05, 2),
            _line(_pts((1.0, 0.62), (0.3, 0.0)), 0.05, 2),
        ),
    ),
    _ObjectClass(
        "first aid kit",
        "green",
        ((35, 150, 80), (250, 250, 250), (60, 60, 60)),
        (
            _line(_pts((-0.35, -0.6), (-0.35, -0.9), (0.35, -0.9), (0.35, -0.6)), 0.1, 3),
            _fill(_rect(-0.95, -0.6, 0.95, 0.85), 1),
            _fill(
                _pts(
                    (-0.15, -0.35),
                    (0.15, -0.35),
                    (0.15, -0.03),
                    (0.47, -0.03),
                    (0.47, 0.27),
                    (0.15, 0.27),
                    (0.15, 0.6),
                    (-0.15, 0.6),
                    (-0.15, 0.27),
                    (-0.47, 0.27),
                    (-0.47, -0.03),
                    (-0.15, -0.03),
                ),
                2,
            ),
        ),
    ),
    _ObjectClass(
        "balloon",
        "violet",
        ((95, 80, 230), (60, 60, 60)),
        (
            _line(_pts((0.0, 0.4), (0.12, 0.6), (-0.08, 0.8), (0.05, 1.0)), 0.05, 2),
            _fill(_pts((0.0, 0.33), (0.1, 0.45), (-0.1, 0.45)), 1),
            _fill(_ellipse(0, -0.32, 0.55, 0.68), 1),
        ),
    ),
    _ObjectClass(
        "ice cream",
        "pink",
        ((215, 165, 95), (245, 150, 190), (180, 30, 50)),
        (
            _fill(_pts((-0.48, -0.15), (0.48, -0.15), (0.0, 1.0)), 1),
            _line(_pts((-0.3, 0.0), (0.15, 0.55)), 0.04, 1),
            _fill(_circle(0, -0.45, 0.52), 2),
            _fill(_circle(0.12, -0.97, 0.13, 10), 3),
        ),
    ),
    _ObjectClass(
        "flag",
        "blue",
        ((110, 110, 115), (30, 70, 190), (250, 250, 250)),
        (
            _line(_pts((-0.75, -1.0), (-0.75, 1.0)), 0.1, 1),
            _fill(_rect(-0.75, -0.95, 0.9, -0.05), 2),
            _fill(_rect(-0.75, -0.62, 0.9, -0.38), 3),
        ),
    ),
    _ObjectClass(
        "ladder",
        "brown",
        ((165, 110, 55),),
        (
            _line(_pts((-0.42, -1.0), (-0.42, 1.0)), 0.11, 1),
            _line(_pts((0.42, -1.0), (0.42, 1.0)), 0.11, 1),
            *(_line(_pts((-0.42, y), (0.42, y)), 0.08, 1) for y in (-0.7, -0.25, 0.2, 0.65)),
        ),
    ),
    _ObjectClass(
        "candle",
        "lavender",
        ((195, 165, 230), (250, 145, 25), (60, 60, 60)),
        (
            _fill(_rect(-0.3, -0.3, 0.3, 1.0), 1),
            _line(_pts((0.0, -0.3), (0.0, -0.45)), 0.05, 3),
            _fill(np.vstack([_arc(0, -0.6, 0.18, -0.2, math.pi + 0.2, 8), _pts((0.0, -1.05))]), 2),
        ),
    ),
    _ObjectClass("kite", "orange", ((245, 110, 40), (45, 45, 45), (230, 40, 90)), tuple(_kite())),
    _ObjectClass(
        "sailboat",
        "navy",
        ((35, 45, 100), (245, 205, 60)),
        (
            _line(_pts((0.0, -1.0), (0.0, 0.5)), 0.06, 1),
            _fill(_pts((-0.08, -0.95), (-0.08, 0.35), (-0.75, 0.35)), 2),
            _fill(_pts((0.08, -0.75), (0.08, 0.35), (0.65, 0.35)), 2),
            _fill(_pts((-1.0, 0.45), (1.0, 0.45), (0.7, 0.85), (-0.7, 0.85)), 1),
        ),
    ),
    _ObjectClass("carrot", "orange", ((240, 120, 25), (60, 160, 50), (180, 80, 15)), tuple(_carrot())),
    _ObjectClass("magnet", "red", ((210, 35, 45), (165, 165, 175)), tuple(_magnet())),
    _ObjectClass(
        "dumbbell",
        "grey",
        ((70, 70, 80), (160, 160, 170)),
        (
            _fill(_rect(-0.8, -0.08, 0.8, 0.08), 2),
            _fill(_rect(-0.72, -0.55, -0.45, 0.55), 1),
            _fill(_rect(0.45, -0.55, 0.72, 0.55), 1),
            _fill(_rect(-0.95, -0.35, -0.72, 0.35), 1),
            _fill(_rect(0.72, -0.35, 0.95, 0.35), 1),
        ),
    ),
    _ObjectClass("eyeglasses", "black", ((30, 30, 30), (190, 220, 235)), tuple(_eyeglasses())),
)

CLASSES: list[str] = [o.name for o in _OBJECTS]


def class_folder(name: str) -> str:
    """Folder name for a class (spaces -> underscores, ImageFolder-friendly)."""
    return name.replace(" ", "_")


def class_name_from_folder(folder: str) -> str:
    """Inverse of :func:`class_folder`."""
    return folder.replace("_", " ")
