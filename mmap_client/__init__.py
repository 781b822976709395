"""A small Python client of the mmap-serve HTTP API (httpx only; no torch, no service code).

    from mmap_client import Client
    with Client("http://127.0.0.1:8000") as mmap:
        top = mmap.classify("clipart", "cat.jpg").label             # a path, bytes or a binary file object
        own = mmap.classify("clipart", "cat.jpg", labels=["cat", "lynx"])
        many = mmap.classify_batch("clipart", ["a.jpg", "b.png"])   # Classification or MmapError, in order
        vector = mmap.embed("cat.jpg", task="clipart").vector       # L2-normalised floats
        tasks, served = mmap.tasks(), mmap.version()

`AsyncClient` has the same methods, to be awaited. A refusal raises `MmapError` with the service's
`status`, `error` code, `detail` and `retry_after` (seconds, when the service says).
"""

from __future__ import annotations

import json
import sys
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import httpx

Image = Union[bytes, str, Path, IO[bytes]]  # noqa: UP007 (a runtime alias)


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

    @property
    def label(self) -> str:
        """The top prediction."""
        return self.predictions[0].label


@dataclass(frozen=True)
class Embedding:
    task: str | None  # None: the unprompted backbone
    version: str | None
    vector: Sequence[float]  # L2-normalised


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


def _read(image: Image) -> bytes:
    if isinstance(image, bytes):
        return image
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    return image.read()


def _files(images: Sequence[Image]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (f"image{i}", _read(image), "application/octet-stream")) for i, image in enumerate(images)]


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
                          [Prediction(p["label"], p["score"]) for p in body["predictions"]])


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
        return Embedding(None, response.headers.get("x-mmap-version"), vector)
    body = response.json()
    return Embedding(body["task"], body["version"], body["embedding"])


class _Api:
    """The API's operations, each one `_Call`; `_call` runs it (sync or async)."""

    def _call(self, call: _Call) -> Any:
        raise NotImplementedError

    def classify(self, task: str, image: Image, *, top_k: int = 5, labels: Sequence[str] | None = None) -> Any:
        """Classification of one image; `labels`: score against these class names instead of the task's."""
        return self._call(_Call("POST", "/classify", lambda r: _classification(_json(r)),
                                {"task": task, "top_k": top_k}, _files([image]),
                                None if labels is None else {"labels": json.dumps(list(labels))}))

    def classify_batch(self, task: str, images: Sequence[Image], *, top_k: int = 5,
                       labels: Sequence[str] | None = None) -> Any:
        """One Classification, or the MmapError of that image, per image, in order."""
        return self._call(_Call("POST", "/classify/batch", _batch, {"task": task, "top_k": top_k}, _files(images),
                                None if labels is None else {"labels": json.dumps(list(labels))}))

    def embed(self, image: Image, *, task: str | None = None, binary: bool = True) -> Any:
        """The L2-normalised image embedding (`task`: its prompted tower; None: the unprompted backbone).
        `binary` fetches raw float32 (compact); the JSON answer also names the task and version."""
        headers = {"accept": "application/octet-stream"} if binary else None
        return self._call(_Call("POST", "/embed", _embedding, {} if task is None else {"task": task}, _files([image]),
                                headers=headers))

    def tasks(self, *, prefix: str = "", after: str = "", limit: int = 10_000) -> Any:
        """Served tasks in name order (classes, prompt set, version, method, model card): those whose names start
        with `prefix`, after the task `after`, at most `limit` (the service answers at most 10,000 at a time: for
        more, ask again with `after` set to the last name)."""
        return self._call(_Call("GET", "/tasks", lambda r: _json(r)["tasks"],
                                {"limit": limit, **({"prefix": prefix} if prefix else {}),
                                 **({"after": after} if after else {})}))

    def task(self, task: str) -> Any:
        return self._call(_Call("GET", f"/tasks/{task}", _json))

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


__all__ = ["AsyncClient", "Classification", "Client", "Embedding", "MmapError", "Prediction"]
