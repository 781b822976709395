"""Admin API and prompt sets as an attack surface: the token (constant-time, 401/403, absent when unset), names and
paths (no traversal, no symlink out of the prompt directory, no file served from outside it), and every invalid
prompt set refused with its reason (admin API and directory watcher alike) while the old version keeps serving.

There is no upload endpoint: the admin API only (re)loads or unloads sets that are already in the prompt
directory, by name. What arrives in that directory is untrusted and validated completely before it is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from helpers.reliability import ADMIN, ADMIN_TOKEN, assert_json_error, raw_request
from helpers.service import DOODLES, OFFICE, classify, image_bytes, make_set, metric, publish, run, serve, settings
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from starlette.requests import Request

from mmap_model import TaskSpec
from mmap_model.promptset import CONFIG_FILE, MAX_WEIGHTS_BYTES, WEIGHTS_FILE
from service.errors import ServiceError
from service.http import admin as service_admin
from service.http import app as service_app

STOLEN = {"stolen": TaskSpec(["secret", "plans"], "a photo of {}.")}


async def _eventually(check: Callable, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def _listing(client: httpx.AsyncClient) -> dict[str, dict]:
    response = await client.get("/admin/promptsets", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {s["name"]: s for s in response.json()["prompt_sets"]}


async def _served_tasks(client: httpx.AsyncClient) -> set[str]:
    return {t["task"] for t in (await client.get("/tasks")).json()["tasks"]}


# ---- the token ----

def test_admin_token_is_compared_with_hmac_compare_digest():
    """The code path: the only comparison of the given token with the configured one is hmac.compare_digest."""
    source = inspect.getsource(service_admin._require_admin)
    assert "hmac.compare_digest(" in source
    assert "== token" not in source and "token ==" not in source and "!= token" not in source


def test_admin_token_comparison_runs_compare_digest_at_runtime(tmp_path):
    """Behaviour, with nothing patched: a profiler sees hmac.compare_digest, a C function, called exactly once
    per admin request that carries a token. The app's own admin check runs on real requests (the worker's
    app, built but not started: the check needs only its settings)."""
    calls: list[str] = []
    app = service_app.create_app(settings(tmp_path, admin_token=ADMIN_TOKEN), connect=None)  # type: ignore[arg-type]

    def check(authorization: str | None) -> int:
        headers = [] if authorization is None else [(b"authorization", authorization.encode())]
        try:
            service_admin._require_admin(Request({"type": "http", "app": app, "headers": headers}), None)
        except ServiceError as e:
            return e.status
        return 200

    def profile(frame, event, arg):
        if event == "c_call" and arg is service_admin.hmac.compare_digest:
            calls.append(threading.current_thread().name)

    sys.setprofile(profile)
    try:
        assert check("Bearer " + "x" * len(ADMIN_TOKEN)) == 403
        assert len(calls) == 1, calls
        assert check(f"Bearer {ADMIN_TOKEN}") == 200
        assert len(calls) == 2, calls
        assert check(None) == 401  # no token: nothing to compare
        assert len(calls) == 2, calls
    finally:
        sys.setprofile(None)


def test_admin_token_answers(tmp_path, tiny):
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    attempts = {
        None: 401,
        "": 401,
        "Bearer": 401,
        "Bearer ": 401,
        f"Basic {ADMIN_TOKEN}": 401,
        ADMIN_TOKEN: 401,  # no scheme
        "Bearer wrong": 403,
        f"Bearer {ADMIN_TOKEN[:-1]}": 403,  # a prefix
        f"Bearer {ADMIN_TOKEN}x": 403,  # an extension
        f"Bearer {ADMIN_TOKEN.upper()}": 403,
        "Bearer " + "é" * 8: 403,  # not ASCII: still a clean 403
        "Bearer " + "a" * 10_000: 403,
        f"bearer {ADMIN_TOKEN}": 200,  # the scheme is case-insensitive (RFC 7235)
        f"Bearer  {ADMIN_TOKEN} ": 200,
    }

    async def scenario():
        async with serve(settings(tmp_path, admin_token=ADMIN_TOKEN)) as client:
            base = str(client.base_url).rstrip("/")
            for header, status in attempts.items():
                headers = {} if header is None else {"authorization": header.encode()}  # bytes: non-ASCII too
                for method, path in (("GET", "/admin/promptsets"), ("POST", "/admin/promptsets/office"),
                                     ("DELETE", "/admin/promptsets/nope")):
                    response = await asyncio.to_thread(raw_request, base, method, path, headers)
                    expected = 404 if (status == 200 and method == "DELETE") else status
                    assert response.status_code == expected, (header, method, response.text)
                    if expected != 200:
                        assert set(response.json()) == {"error", "detail"}
                    if status == 401:
                        assert response.headers["www-authenticate"] == "Bearer"
                    assert ADMIN_TOKEN not in response.text  # the secret is never echoed
            assert await _served_tasks(client) == set(OFFICE)  # the refused DELETE/POSTs changed nothing

    run(scenario())


@pytest.mark.parametrize("token", [None, ""], ids=["unset", "empty"])
def test_admin_api_is_absent_or_refuses_all_without_a_usable_token(tmp_path, tiny, token):
    """Unset: the routes do not exist (404, not in the OpenAPI document). Set but empty (an empty env var): no
    header can match it, so everything is refused."""
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)

    async def scenario():
        async with serve(settings(tmp_path, admin_token=token)) as client:
            base = str(client.base_url).rstrip("/")
            for header in ({}, {"authorization": "Bearer "}, {"authorization": "Bearer anything"}, ADMIN):
                for method, path in (("GET", "/admin/promptsets"), ("POST", "/admin/promptsets/office"),
                                     ("DELETE", "/admin/promptsets/office")):
                    raw = {k: v.encode() for k, v in header.items()}
                    response = await asyncio.to_thread(raw_request, base, method, path, raw)
                    assert response.status_code in ((404,) if token is None else (401, 403)), (
                        header, method, response.text)
            paths = (await client.get("/openapi.json")).json()["paths"]
            assert token is not None or not any(p.startswith("/admin") for p in paths)
            assert await _served_tasks(client) == set(OFFICE)

    run(scenario())


# ---- names, paths, symlinks ----

def _outside_set(tiny, root: Path) -> Path:
    """A valid prompt set OUTSIDE the prompt directory, serving the task 'stolen'."""
    return make_set(tiny, "evil", STOLEN, 9).save(root / "outside" / "evil")


TRAVERSALS = ["%2e%2e", "%2e", "..%5cevil", "%2e%2e%5coutside%5cevil", "..%2foutside%2fevil", "%2e%2e%2foutside%2fevil",
              "%2foutside%2fevil", "%252e%252e", "evil%00", "office%0a", "~", "%C0%AE%C0%AE", "%EF%BC%8E%EF%BC%8E",
              "..;evil", "C:%5cevil", "a" * 65, "-evil", ".office"]


def test_traversal_names_are_refused(tmp_path, tiny):
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    _outside_set(tiny, tmp_path)
    (prompts / ".office").mkdir()

    async def scenario():
        async with serve(settings(prompts, admin_token=ADMIN_TOKEN)) as client:
            for name in TRAVERSALS:
                for method in ("POST", "DELETE"):
                    response = await client.request(method, f"/admin/promptsets/{name}", headers=ADMIN)
                    assert response.status_code in (404, 422), (name, method, response.text)
                    assert set(response.json()) == {"error", "detail"}
            assert await _served_tasks(client) == set(OFFICE)
            assert set(await _listing(client)) == {"office"}
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_prompt_set_loads_total", result="success") == 1  # nothing else was read

    run(scenario())


def test_symlinks_out_of_the_prompt_directory_are_refused(tmp_path, tiny):
    """A symlinked set, symlinked files inside a set, and symlinked sample images that lead out of the prompt
    directory are never served (start-up scan, admin load, directory watcher); a symlink that stays inside is fine."""
    prompts = tmp_path / "prompts"
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, prompts)
    outside = _outside_set(tiny, tmp_path)
    (prompts / "evil").symlink_to(outside, target_is_directory=True)  # the whole set
    files = prompts / "files"
    files.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):  # a real directory whose two files point outside
        (files / name).symlink_to(outside / name)
    secret = tmp_path / "outside" / "secret.png"
    secret.write_bytes(b"TOP SECRET " * 10)
    samples = prompts / "office" / "samples" / "clipart"
    samples.mkdir(parents=True)
    (samples / "dog.png").write_bytes(image_bytes(1))
    (samples / "leak.png").symlink_to(secret)
    inside = make_set(tiny, "doodles", DOODLES, 2).save(prompts / ".doodles-v1")
    (prompts / "doodles").symlink_to(inside, target_is_directory=True)  # stays inside: allowed

    async def scenario():
        config = settings(prompts, admin_token=ADMIN_TOKEN, watch_interval_s=0.05, watch_debounce_s=0.1)
        async with serve(config) as client:
            assert await _served_tasks(client) == set(OFFICE) | set(DOODLES)
            listing = await _listing(client)
            for name in ("evil", "files"):
                assert listing[name]["state"] == "failed", listing[name]
                assert "outside the prompt directory" in listing[name]["last_error"], listing[name]
                refused = await client.post(f"/admin/promptsets/{name}", headers=ADMIN)
                assert_json_error(refused, 422, "load_failed")
                assert "outside the prompt directory" in refused.json()["detail"]
            (prompts / "evil2").symlink_to(outside, target_is_directory=True)  # arrives while serving

            async def reported() -> bool:
                return (await _listing(client)).get("evil2", {}).get("state") == "failed"
            await _eventually(reported, "the watcher refusing evil2")
            assert "stolen" not in await _served_tasks(client)
            assert (await classify(client, "stolen", image_bytes(1))).status_code == 404

            clipart = (await client.get("/tasks/clipart")).json()
            assert clipart["samples"] == ["/samples/clipart/dog.png"]
            assert (await client.get("/samples/clipart/dog.png")).status_code == 200
            leak = await client.get("/samples/clipart/leak.png")
            assert leak.status_code == 404 and b"TOP SECRET" not in leak.content
            (samples / "dog.png").unlink()  # after the load: replaced by a symlink out, then removed
            (samples / "dog.png").symlink_to(secret)
            swapped = await client.get("/samples/clipart/dog.png")
            assert swapped.status_code == 404 and b"TOP SECRET" not in swapped.content
            (samples / "dog.png").unlink()
            assert_json_error(await client.get("/samples/clipart/dog.png"), 404, "unknown_sample")

    run(scenario())


# ---- invalid prompt sets: refused with the reason, the old version keeps serving ----

def _rewrite(directory: Path, *, tensors: Callable | None = None, meta: Callable | None = None) -> None:
    """Edit a saved set consistently (the sha256 in promptset.json follows the new weights), so that the ONE
    check under test is the one that fails."""
    config = json.loads((directory / CONFIG_FILE).read_text())
    if tensors is not None:
        blob = save_safetensors(tensors(load_safetensors((directory / WEIGHTS_FILE).read_bytes())))
        (directory / WEIGHTS_FILE).write_bytes(blob)
        config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    if meta is not None:
        meta(config)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def _renamed(t: dict) -> dict:
    first = sorted(t)[0]
    return {("x" + k if k == first else k): v for k, v in t.items()}


def _reshaped(t: dict) -> dict:
    first = sorted(t)[0]
    return {**t, first: t[first].flatten()[:-1].clone()}


def _poisoned(value: float) -> Callable:
    def poison(t: dict) -> dict:
        first = sorted(t)[0]
        tensor = t[first].clone()
        tensor.view(-1)[0] = value
        return {**t, first: tensor}
    return poison


def _set(config: dict, *path_and_value) -> None:
    *path, key, value = path_and_value
    for step in path:
        config = config[step]
    config[key] = value


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "wrong sha256": (lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:-4] + b"\0\0\0\0"),
                     "sha256 mismatch"),
    "wrong tensor names": (lambda d: _rewrite(d, tensors=_renamed), "tensor names differ"),
    "wrong tensor shapes": (lambda d: _rewrite(d, tensors=_reshaped), "tensor shapes differ"),
    "NaN": (lambda d: _rewrite(d, tensors=_poisoned(math.nan)), "non-finite values"),
    "Inf": (lambda d: _rewrite(d, tensors=_poisoned(-math.inf)), "non-finite values"),
    "mismatched fingerprint": (lambda d: _rewrite(d, meta=lambda c: _set(c, "backbone", "fingerprint", "0" * 64)),
                               "fingerprint mismatch"),
    "unknown major version": (lambda d: _rewrite(d, meta=lambda c: _set(c, "format_version", "2.0")),
                              "format version 2.0 is not supported"),
    "half-written: weights missing": (lambda d: (d / WEIGHTS_FILE).unlink(), f"missing {WEIGHTS_FILE}"),
    "half-written: weights truncated": (
        lambda d: (d / WEIGHTS_FILE).write_bytes((d / WEIGHTS_FILE).read_bytes()[:40]), "sha256 mismatch"),
    "half-written: config truncated": (
        lambda d: (d / CONFIG_FILE).write_text((d / CONFIG_FILE).read_text()[:200]), "not valid JSON"),
    "weights over the size limit": (lambda d: os.truncate(d / WEIGHTS_FILE, MAX_WEIGHTS_BYTES + 1),  # sparse
                                    "larger than the limit"),
    "config not an object": (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), "must hold a JSON object"),
    "config lacks keys": (lambda d: _rewrite(d, meta=lambda c: c.pop("tasks")), "lacks required keys"),
}


def test_invalid_prompt_sets_are_refused_and_the_old_version_keeps_serving(tmp_path, tiny):
    """Each corruption arrives twice: published into the directory (watcher) and then reloaded through the admin
    API. Both refuse it with the reason; the old version keeps answering with its own scores throughout."""
    prompts = tmp_path / "prompts"
    v1 = make_set(tiny, "office", OFFICE, 1)
    publish(v1, prompts)
    config = settings(prompts, admin_token=ADMIN_TOKEN, watch_interval_s=0.05, watch_debounce_s=0.1)
    data = image_bytes(3)

    async def scenario():
        async with serve(config) as client:
            baseline = (await classify(client, "clipart", data)).json()
            wrong = []
            for i, (kind, (corrupt, reason)) in enumerate(CORRUPTIONS.items()):
                staging = prompts / f".office.{i}"
                make_set(tiny, "office", OFFICE, 100 + i).save(staging)
                corrupt(staging)
                (prompts / "office").rename(prompts / f".office.old{i}")
                staging.rename(prompts / "office")

                async def failed_again(i=i) -> bool:
                    return metric((await client.get("/metrics")).text, "mmap_prompt_set_loads_total",
                                  result="failure") >= 2 * i + 1
                await _eventually(failed_again, f"the watcher refusing {kind}")
                office = (await _listing(client))["office"]
                via_admin = await client.post("/admin/promptsets/office", headers=ADMIN)
                served = (await classify(client, "clipart", data)).json()
                try:
                    assert office["state"] == "loaded" and office["version"] == v1.version, office
                    assert reason in (office["last_error"] or ""), office["last_error"]
                    assert_json_error(via_admin, 422, "load_failed")
                    assert (reason in via_admin.json()["detail"]
                            and f"{v1.version} keeps serving" in via_admin.json()["detail"])
                    assert served == baseline
                except AssertionError as e:  # collected: one run reports every corruption that slipped through
                    wrong.append(f"{kind}: {e}")
            assert not wrong, "\n".join(wrong)
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_prompt_set_loads_total", result="failure") == 2 * len(CORRUPTIONS)
            assert metric(text, "mmap_prompt_set_loads_total", result="success") == 1

            # And a valid v2 published the same way is taken: the refusals did not wedge the watcher.
            v2 = make_set(tiny, "office", OFFICE, 2)
            publish(v2, prompts)

            async def v2_served() -> bool:
                return (await client.get("/tasks/clipart")).json()["version"] == v2.version
            await _eventually(v2_served, "v2 served")
            assert (await _listing(client))["office"]["last_error"] is None

    run(scenario())
