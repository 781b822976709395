"""Caller class names (`labels=`), checked in the HTTP worker before anything reaches the engine.

Given as the query parameter `labels` (comma-separated) or as the form field `labels` (a JSON array
of strings, for long lists or names with commas). Each name is stripped; the list must be 1 to
`max_labels` distinct, non-empty, printable names of at most `max_label_chars` characters.
"""

from __future__ import annotations

import json

from service.errors import ServiceError


def invalid(detail: str) -> ServiceError:
    return ServiceError(422, "invalid_labels", detail)


def parse_labels(text: str, max_labels: int, max_chars: int, json_array: bool = False) -> list[str]:
    """The checked class names of a `labels` value (ServiceError 422 `invalid_labels` says what is wrong)."""
    if json_array:
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise invalid(f"the form field 'labels' must be a JSON array of strings: {e}") from None
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise invalid("the form field 'labels' must be a JSON array of strings")
    else:
        raw = text.split(",")
    labels = [label.strip() for label in raw]
    if not labels or len(labels) > max_labels:
        raise invalid(f"give 1 to {max_labels} labels, not {len(labels)}")
    for label in labels:
        if not label:
            raise invalid("a label is empty")
        if len(label) > max_chars:
            raise invalid(f"label {label[:20]!r}... is longer than {max_chars} characters")
        if not label.isprintable():
            raise invalid(f"label {label!r} holds a control character")
    if len(set(labels)) != len(labels):
        raise invalid("labels must be distinct")
    return labels
