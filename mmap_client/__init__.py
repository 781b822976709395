"""A small Python client of the mmap-serve HTTP API (httpx only; no torch, no service code).

    from mmap_client import Client
    with Client("http://127.0.0.1:8000") as mmap:
        top = mmap.classify("clipart", "cat.jpg").label   # a path, bytes, a binary file object or a PIL image
        own = mmap.classify("clipart", "cat.jpg", labels=["cat", "lynx"])
        many = mmap.classify_batch("clipart", ["a.jpg", "b.png"])   # Classification or MmapError, in order
        vector = mmap.embed("cat.jpg", task="clipart").vector       # L2-normalised floats
        tasks, served = mmap.tasks(), mmap.version()

`AsyncClient` has the same methods, to be awaited. A refusal raises `MmapError` with the service's
`status`, `error` code, `detail` and `retry_after` (seconds, when the service says).
"""

from __future__ import annotations

import io
import json
import os
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

import httpx

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["AsyncClient", "Classification", "Client", "Embedding", "Image", "MmapError", "Prediction"]

# What an image argument may be (a runtime alias); PIL stays a name only: the client never imports it.
Image = Union[str, os.PathLike, bytes, bytearray, memoryview, IO[bytes], "PIL.Image.Image"]  # noqa: UP007
_ACCEPTED = "a path (str or os.PathLike), bytes, a binary file object or a PIL.Image.Image"


class MmapError(Exception):
    """The service refused a request (or one image of a batch)."""

    def __init__(self, status: int, error: str, detail: str, retry_after: int | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.retry_after = status, error, detail, retry_after


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    task: str
    version: str  # of the prompt set that scored it
    prompt_set: str
    method: str
    predictions: list[Prediction]
    abstained: bool = False  # the best score is below the request's min_score (or the task's default)

    @property
    def label(self) -> str:
        """The top prediction."""
        return self.predictions[0].label


@dataclass(frozen=True)
class Embedding:
    """The same for the binary and the JSON answer."""

    task: str | None  # None: the unprompted backbone
    version: str | None  # of the task's prompt set; None for the backbone
    prompt_set: str | None  # the set serving the task; None for the backbone
    vector: Sequence[float]  # L2-normalised float32 (an array("f"))


@dataclass(frozen=True)
class _Call:
    """One request and how to read its answer: what the sync and the async client share."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict[str, Any] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None
    data: dict[str, str] | None = None
    headers: dict[str, str] | None = None


def _pil_image(value: object) -> bool:
    # A PIL image exists only once PIL.Image is imported, so looking it up imports nothing.
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(value, pil.Image)


def _read(image: Image, name: str = "image") -> bytes:
    """The bytes to upload; `name` says which argument in an error."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    if _pil_image(image):
        return _png(image)
    read = getattr(image, "read", None)
    if not callable(read):
        raise TypeError(f"{name}: expected {_ACCEPTED}, got {type(image).__name__}")
    data = read()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: the file object read {type(data).__name__}, not bytes (open it in binary mode, 'rb')")
    return bytes(data)


def _png(image: PIL.Image.Image) -> bytes:
    """The image losslessly as PNG; modes PNG cannot hold (CMYK, YCbCr, F, ...) go to RGB(A) first."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, "PNG")
    except (OSError, KeyError):
        buffer = io.BytesIO()
        image.convert("RGBA" if image.mode.endswith("A") else "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _files(images: Sequence[Image], names: Sequence[str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart `file` parts; `names`: the arguments, for errors (default images[0], images[1], ...)."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(images, "read") \
            or _pil_image(images):
        raise TypeError(f"images: expected a sequence of images, got one image ({type(images).__name__})")
    return [("file", (f"image{i}", _read(image, names[i] if names else f"images[{i}]"), "application/octet-stream"))
            for i, image in enumerate(images)]


def _error(response: httpx.Response) -> MmapError:
    try:
        body = response.json()
        error, detail = body["error"], body["detail"]
    except (ValueError, KeyError, TypeError):
        error, detail = "http_error", response.text[:500]
    retry = response.headers.get("retry-after")
    return MmapError(response.status_code, error, detail, int(retry) if retry and retry.isdigit() else None)


def _json(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise _error(response)
    return response.json()


def _classification(body: dict[str, Any]) -> Classification:
    return Classification(body["task"], body["version"], body["prompt_set"], body["method"],
                          [Prediction(p["label"], p["score"]) for p in body["predictions"]],
                          bool(body.get("abstained")))


def _params(task: str, top_k: int, min_score: float | None, version: str | None) -> dict[str, Any]:
    return {"task": task, "top_k": top_k, **({"min_score": min_score} if min_score is not None else {}),
            **({"version": version} if version is not None else {})}


def _batch(response: httpx.Response) -> list[Classification | MmapError]:
    return [_classification(r) if r["status"] == 200 else MmapError(r["status"], r["error"], r["detail"])
            for r in _json(response)["results"]]


def _embedding(response: httpx.Response) -> Embedding:
    if response.status_code >= 400:
        raise _error(response)
    if response.headers.get("content-type") == "application/octet-stream":
        vector = array("f", response.content)
        if sys.byteorder == "big":
            vector.byteswap()  # the service sends little-endian float32
        headers = response.headers
        return Embedding(headers.get("x-mmap-task"), headers.get("x-mmap-version"), headers.get("x-mmap-prompt-set"),
                         vector)
    body = response.json()
    # The service's float32 values, exactly (JSON floats round-trip): equal to the binary answer's vector.
    return Embedding(body["task"], body["version"], body["prompt_set"], array("f", body["embedding"]))


class _Api:
    """The API's operations, each one `_Call`; `_call` runs it (sync or async)."""

    def _call(self, call: _Call) -> Any:
        raise NotImplementedError

    def classify(self, task: str, image: Image, *, top_k: int = 5, labels: Sequence[str] | None = None,
                 min_score: float | None = None, version: str | None = None) -> Any:
        """Classification of one image; `labels`: score against these class names instead of the task's;
        `min_score`: abstain below it (default: the task's); `version`: pin the task's version (live or a
        rollout's candidate)."""
        return self._call(_Call("POST", "/classify", lambda r: _classification(_json(r)),
                                _params(task, top_k, min_score, version), _files([image], ["image"]),
                                None if labels is None else {"labels": json.dumps(list(labels))}))

    def classify_batch(self, task: str, images: Sequence[Image], *, top_k: int = 5,
                       labels: Sequence[str] | None = None, min_score: float | None = None,
                       version: str | None = None) -> Any:
        """One Classification, or the MmapError of that image, per image, in order."""
        return self._call(_Call("POST", "/classify/batch", _batch, _params(task, top_k, min_score, version),
                                _files(images),
                                None if labels is None else {"labels": json.dumps(list(labels))}))

    def embed(self, image: Image, *, task: str | None = None, binary: bool = True) -> Any:
        """The L2-normalised image embedding (`task`: its prompted tower; None: the unprompted backbone).
        `binary` fetches raw float32 (compact) instead of JSON floats; both give the same Embedding."""
        headers = {"accept": "application/octet-stream"} if binary else None
        return self._call(_Call("POST", "/embed", _embedding,
                                {"task": task} if task else {}, _files([image], ["image"]), headers=headers))

    def tasks(self, *, prefix: str = "", after: str = "", limit: int = 10_000) -> Any:
        """Served tasks in name order (classes, prompt set, version, method, model card): those whose names start
        with `prefix`, after the task `after`, at most `limit` (the service answers at most 10,000 at a time: for
        more, ask again with `after` set to the last name)."""
        return self._call(_Call("GET", "/tasks", lambda r: _json(r)["tasks"],
                                {"limit": limit, **({"prefix": prefix} if prefix else {}),
                                 **({"after": after} if after else {})}))

    def task(self, task: str) -> Any:
        return self._call(_Call("GET", f"/tasks/{task}", _json))

    def rollout(self, task: str) -> Any:
        """The task's rollout (candidate, mode, share, state) and the service's evidence: requests and mean top-1
        score per version, shadow agreement (MmapError 404 `no_rollout` without one)."""
        return self._call(_Call("GET", f"/tasks/{task}/rollout", _json))

    def version(self) -> Any:
        """The package version, backbone, fingerprint, device, precision and backend."""
        return self._call(_Call("GET", "/version", _json))

    def ready(self) -> Any:
        """True once the service serves (GET /readyz is 200)."""
        return self._call(_Call("GET", "/readyz", lambda r: r.status_code == 200))


def _request(http: httpx.Client | httpx.AsyncClient, call: _Call) -> httpx.Request:
    return http.build_request(call.method, call.path, params=call.params, files=call.files, data=call.data,
                              headers=call.headers)


class Client(_Api):
    """The API over a blocking httpx.Client (`timeout` seconds per request)."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, **httpx_options: Any):
        self.http = httpx.Client(base_url=base_url, timeout=timeout, **httpx_options)

    def _call(self, call: _Call) -> Any:
        return call.parse(self.http.send(_request(self.http, call)))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Api):
    """The API over an httpx.AsyncClient: the same methods, awaited."""

    def __init__(self, base_url: str, *, timeout: float = 60.0, **httpx_options: Any):
        self.http = httpx.AsyncClient(base_url=base_url, timeout=timeout, **httpx_options)

    async def _call(self, call: _Call) -> Any:
        return call.parse(await self.http.send(_request(self.http, call)))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
