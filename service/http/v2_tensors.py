"""The tensors of an Open Inference Protocol infer request and of its answer (v2.py's routes): in JSON, or with the
binary tensor extension (header `Inference-Header-Content-Length`: the JSON's length; each binary tensor's bytes
follow it in order, their lengths in its `binary_data_size` parameter), which tritonclient uses by default.

A model (a task) takes ONE input: `image`, BYTES [N] (or [N, 1]), one encoded image file an element (base64 strings in
JSON; in binary, each element's little-endian uint32 length, then its bytes), or `pixels`, UINT8 [N, H, W, 3] at the
model's input size, already preprocessed (scored as they are). It answers `labels` (BYTES) and `scores` (FP32),
both [N, k]: the top `top_k` classes of each image, best first (all classes without `top_k`); and where a threshold
applies (the `min_score` parameter, else the task's default without `labels`), or when asked for, `abstained`
(BOOL [N]): the image's best score is below it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from service.errors import ServiceError
from service.schema import V2InferRequest, V2InferResponse, V2OutputTensor, encode

from .bodies import decode_base64
from .images import ImageRejected

IMAGE_INPUT, PIXELS_INPUT = "image", "pixels"
LABELS_OUTPUT, SCORES_OUTPUT, ABSTAINED_OUTPUT = "labels", "scores", "abstained"
OUTPUTS = (LABELS_OUTPUT, SCORES_OUTPUT, ABSTAINED_OUTPUT)
PARAMETERS = frozenset({"top_k", "labels", "version", "min_score"})
# Triton's own request parameters: read (binary_data_output) or without effect here, so a Triton client's call works
TRITON_PARAMETERS = frozenset({"binary_data_output", "timeout", "priority", "sequence_id", "sequence_start",
                               "sequence_end"})
_decode_request = msgspec.json.Decoder(V2InferRequest).decode


def invalid(detail: str) -> ServiceError:
    return ServiceError(400, "invalid_input", detail)


@dataclass
class InferCall:
    """An infer request, checked: its images (encoded files) or pixels [N, H, W, 3], and its parameters."""

    images: list[bytes] | None
    pixels: np.ndarray | None
    top_k: int | None
    labels: str | list[str] | None
    version: str | None
    min_score: float | None
    id: str | None
    outputs: list[tuple[str, bool]] | None  # (name, as binary data) in the order asked; None: the default ones
    binary: bool = False  # the default outputs as binary data (binary_data_output)


def parse_request(body: bytearray, header_length: str | None, image_size: tuple[int, int], max_bytes: int,
                  max_images: int) -> InferCall:
    """The checked call of an infer request's body (400 `invalid_input` says what is wrong; 413 over a limit)."""
    binary = memoryview(b"")
    if header_length is not None:
        if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
            raise invalid(f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the body "
                          f"({len(body)} bytes)")
        binary = memoryview(body)[int(header_length):]
        body = body[:int(header_length)]
    try:
        request = _decode_request(body)
    except msgspec.DecodeError as e:
        raise invalid(f"the inference request is not valid: {e}") from None
    if len(request.inputs) != 1:
        raise invalid(f"a model takes one input, {IMAGE_INPUT!r} (BYTES [N]) or {PIXELS_INPUT!r} (UINT8 [N, "
                      f"{image_size[0]}, {image_size[1]}, 3]); the request has {len(request.inputs)}")
    tensor = request.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
            raise invalid(f"input {tensor.name!r}: binary_data_size {size!r}, but {len(binary)} bytes follow the JSON")
    elif len(binary):
        raise invalid(f"{len(binary)} bytes follow the JSON, and no input has binary_data_size")
    elif tensor.data is None:
        raise invalid(f"input {tensor.name!r} has no data")
    count = tensor.shape[0] if tensor.shape and all(isinstance(d, int) and d >= 0 for d in tensor.shape) else -1
    if count > max_images:
        raise ImageRejected(413, "too_many_images", f"at most {max_images} images a request, not {count}")
    images, pixels = None, None
    if tensor.name == IMAGE_INPUT:
        if tensor.datatype != "BYTES" or tensor.shape not in ([count], [count, 1]) or count < 1:
            raise invalid(f"input {IMAGE_INPUT!r} is BYTES [N] (or [N, 1]), N >= 1: one encoded image an element; "
                          f"not {tensor.datatype} {tensor.shape}")
        images = split_bytes(binary, max_bytes) if size is not None else [
            decode_base64(text, max_bytes, f"input 'image' element {i}") for i, text in enumerate(strings(tensor.data))]
        if len(images) != count:
            raise invalid(f"input {IMAGE_INPUT!r} has shape {tensor.shape} and {len(images)} elements")
    elif tensor.name == PIXELS_INPUT:
        shape = [count, *image_size, 3]
        if tensor.datatype != "UINT8" or tensor.shape != shape or count < 1:
            raise invalid(f"input {PIXELS_INPUT!r} is UINT8 [N, {image_size[0]}, {image_size[1]}, 3] (the model's "
                          f"input size), N >= 1; not {tensor.datatype} {tensor.shape}")
        pixels = (np.frombuffer(binary, np.uint8) if size is not None else uint8(tensor.data))
        if pixels.size != np.prod(shape):
            raise invalid(f"input {PIXELS_INPUT!r} has shape {shape} and {pixels.size} elements")
        pixels = pixels.reshape(shape)
    else:
        raise invalid(f"unknown input {tensor.name!r}: a model takes {IMAGE_INPUT!r} or {PIXELS_INPUT!r}")
    return InferCall(images, pixels, *parameters(request.parameters), request.id, outputs(request),
                     request.parameters.get("binary_data_output") is True)


def parameters(given: dict[str, Any]) -> tuple[int | None, str | list[str] | None, str | None, float | None]:
    """(top_k, labels, version, min_score) of the request's parameters."""
    unknown = sorted(set(given) - PARAMETERS - TRITON_PARAMETERS)
    if unknown:
        raise invalid(f"unknown parameter {', '.join(map(repr, unknown))}; a model takes "
                      f"{', '.join(sorted(PARAMETERS))}")
    top_k, labels, version = given.get("top_k"), given.get("labels"), given.get("version")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise invalid(f"parameter top_k must be an integer of at least 1, not {top_k!r}")
    if labels is not None and not isinstance(labels, str) and not (
            isinstance(labels, list) and all(isinstance(label, str) for label in labels)):
        raise invalid("parameter labels is an array of class names, or one string of them comma-separated")
    if version is not None and not isinstance(version, str):
        raise invalid(f"parameter version must be a string, not {version!r}")
    min_score = given.get("min_score")
    if min_score is not None and (isinstance(min_score, bool) or not isinstance(min_score, int | float)
                                  or not 0 <= min_score <= 1):
        raise invalid(f"parameter min_score must be a number from 0 to 1, not {min_score!r}")
    return top_k, labels, version, None if min_score is None else float(min_score)


def outputs(request: V2InferRequest) -> list[tuple[str, bool]] | None:
    """The outputs asked for (None: the default ones, `answer` says which)."""
    binary = request.parameters.get("binary_data_output") is True
    if request.outputs is None:
        return None
    names = [output.name for output in request.outputs]
    if not names or set(names) - set(OUTPUTS) or len(set(names)) != len(names):
        raise invalid(f"outputs are {', '.join(map(repr, OUTPUTS))}, each at most once; not {names}")
    return [(output.name, output.parameters.get("binary_data", binary) is True) for output in request.outputs]


def strings(data: Any) -> list[str]:
    """A BYTES tensor's JSON data, flat or nested, as its strings in row-major order."""
    flat = flatten(data)
    if not all(isinstance(item, str) for item in flat):
        raise invalid("input 'image' holds base64 strings in JSON, one encoded image file each")
    return flat


def flatten(data: Any) -> list[Any]:
    """Nested lists' items in order (without recursion: any depth a JSON body brings)."""
    items: list[Any] = []
    stack = [iter([data])]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            items.append(item)
        else:
            stack.pop()
    return items


def uint8(data: Any) -> np.ndarray:
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):  # ragged nesting
        values = np.asarray([], dtype=np.float64)
    if values.dtype.kind not in "iu" or values.size == 0 or values.min() < 0 or values.max() > 255:
        raise invalid(f"input {PIXELS_INPUT!r} holds integers from 0 to 255")
    return values.astype(np.uint8).reshape(-1)


def split_bytes(raw: memoryview, max_bytes: int) -> list[bytes]:
    """The elements of a BYTES tensor's binary data: each a little-endian uint32 length, then that many bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise invalid("input 'image': its binary data ends inside an element's length")
        (length,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + length > len(raw):
            raise invalid(f"input 'image' element {len(elements)} runs past the end of the binary data")
        if length > max_bytes:
            raise ImageRejected(413, "upload_too_large", f"input 'image' element {len(elements)} is larger than "
                                                         f"the limit of {max_bytes} bytes")
        elements.append(bytes(raw[at:at + length]))
        at += length
    return elements


def answer(task: str, version: str, call: InferCall, labels: list[list[str]],
           scores: list[list[float]], min_score: float | None = None) -> tuple[bytes, int | None]:
    """The infer answer's body and, where outputs go as binary data, the length of its JSON part. `min_score`: the
    threshold that applies (`abstained` is among the default outputs only with one)."""
    shape = [len(labels), len(labels[0])]
    tensors, blobs = [], []
    default = [LABELS_OUTPUT, SCORES_OUTPUT, *([ABSTAINED_OUTPUT] if min_score is not None else [])]
    for name, binary in call.outputs or [(name, call.binary) for name in default]:
        data: list[Any]
        if name == ABSTAINED_OUTPUT:
            data = [min_score is not None and row[0] < min_score for row in scores]
            datatype, dims = "BOOL", shape[:1]
        else:
            data = [x for row in (labels if name == LABELS_OUTPUT else scores) for x in row]
            datatype, dims = ("BYTES" if name == LABELS_OUTPUT else "FP32"), shape
        if not binary:
            tensors.append(V2OutputTensor(name, datatype, dims, data=data))
            continue
        blob = (b"".join(struct.pack("<I", len(e)) + e for e in (label.encode() for label in data))
                if name == LABELS_OUTPUT else np.asarray(data, dtype="?" if datatype == "BOOL" else "<f4").tobytes())
        tensors.append(V2OutputTensor(name, datatype, dims, {"binary_data_size": len(blob)}))
        blobs.append(blob)
    header = encode(V2InferResponse(task, version, tensors, call.id))
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)
