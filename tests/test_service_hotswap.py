"""Hot swap: prompt sets replaced, added and removed under continuous traffic (directory watcher), the admin
API's load / reload / unload, and failures that leave the old version serving."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
from helpers.reliability import GoodTraffic
from helpers.service import (
    DOODLES,
    OFFICE,
    classify,
    image_bytes,
    make_set,
    metric,
    publish,
    run,
    serve,
    settings,
)

from mmap_model import PromptSet, TaskSpec
from mmap_model.promptset import CONFIG_FILE, WEIGHTS_FILE

ADMIN = {"authorization": "Bearer t0ken"}
SCENES = {"indoor": TaskSpec(["kitchen", "office"], "a photo of a {}.", "places")}
EXTRA = {"aerial": TaskSpec(["field", "road"], "an aerial photo of a {}.")}


async def _eventually(check, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        await asyncio.sleep(0.02)


async def _version(client: httpx.AsyncClient, task: str) -> str | None:
    response = await client.get(f"/tasks/{task}")
    return response.json()["version"] if response.status_code == 200 else None


def _tamper_weights(directory: Path) -> None:
    """Flip bytes at the end of the weights file and leave promptset.json as it was: a corrupt set."""
    weights = directory / WEIGHTS_FILE
    blob = bytearray(weights.read_bytes())
    blob[-8:] = bytes(b ^ 0xFF for b in blob[-8:])
    weights.write_bytes(bytes(blob))


def test_hot_swap_under_continuous_requests(tiny, tmp_path):
    prompts = tmp_path / "prompts"
    v1 = make_set(tiny, "office", OFFICE, 1)
    publish(v1, prompts)
    publish(make_set(tiny, "doodles", DOODLES, 2), prompts)
    publish(make_set(tiny, "extra", EXTRA, 3), prompts)
    v2 = make_set(tiny, "office", OFFICE, 11)
    bad = make_set(tiny, "office", OFFICE, 12)
    config = settings(prompts, watch_interval_s=0.05, watch_debounce_s=0.1, admin_token="t0ken")

    async def scenario():
        async with serve(config) as client:
            log: list[tuple[float, str, int, str]] = []  # sent at, task, status, version (or the error)
            stop = asyncio.Event()

            async def traffic(worker: int) -> None:
                i = 0
                while not stop.is_set():
                    task = ("clipart", "sketch", "real")[(worker + i) % 3]
                    sent = time.monotonic()
                    response = await classify(client, task, image_bytes(i % 7))
                    ok = response.status_code == 200
                    log.append((sent, task, response.status_code, response.json()["version"] if ok else response.text))
                    i += 1

            async def some_traffic() -> bool:
                return len(log) >= 20

            workers = [asyncio.create_task(traffic(w)) for w in range(4)]
            await _eventually(some_traffic, "traffic")

            publish(v2, prompts)  # replace
            await _eventually(lambda: _is(client, "clipart", v2.version), "office v2 served")
            swapped_at = time.monotonic()
            publish(make_set(tiny, "scenes", SCENES, 4), prompts)  # add
            await _eventually(lambda: _is(client, "indoor", None, exists=True), "scenes added")
            shutil.rmtree(prompts / "extra")  # remove
            await _eventually(lambda: _is(client, "aerial", None, exists=False), "extra removed")

            bad.save(prompts / ".office.bad")  # a corrupt replacement, published the same way
            _tamper_weights(prompts / ".office.bad")
            (prompts / "office").rename(prompts / ".office.v2")
            (prompts / ".office.bad").rename(prompts / "office")

            async def failure_reported() -> bool:
                listing = (await client.get("/admin/promptsets", headers=ADMIN)).json()["prompt_sets"]
                office = next(s for s in listing if s["name"] == "office")
                return office["last_error"] is not None
            await _eventually(failure_reported, "corrupt office reported")
            listing = (await client.get("/admin/promptsets", headers=ADMIN)).json()["prompt_sets"]
            office = next(s for s in listing if s["name"] == "office")
            assert office["state"] == "loaded" and office["version"] == v2.version
            assert "sha256 mismatch" in office["last_error"]
            await asyncio.sleep(0.3)  # more traffic on the old version after the failed swap
            stop.set()
            await asyncio.gather(*workers)

            assert (await classify(client, "indoor", image_bytes(1))).status_code == 200
            gone = await classify(client, "aerial", image_bytes(1))
            assert gone.status_code == 404 and "aerial" in gone.json()["detail"]
            text = (await client.get("/metrics")).text

        failed = [entry for entry in log if entry[2] != 200]
        assert not failed, failed[:5]
        assert len(log) >= 40, "traffic was not continuous"
        office_versions = [(sent, v) for sent, task, _, v in log if task in ("clipart", "real")]
        assert {v for _, v in office_versions} == {v1.version, v2.version}
        # Sent after v2 was listed: the request's snapshot is v2 (the corrupt v3 never served).
        assert all(v == v2.version for sent, v in office_versions if sent > swapped_at)
        assert metric(text, "mmap_prompt_set_loads_total", result="success") == 5  # 3 at start, v2, scenes
        assert metric(text, "mmap_prompt_set_loads_total", result="failure") == 1
        assert metric(text, "mmap_tasks_loaded") == len(OFFICE) + len(DOODLES) + len(SCENES)

    run(scenario())


async def _is(client: httpx.AsyncClient, task: str, version: str | None, exists: bool = True) -> bool:
    current = await _version(client, task)
    return current == version if version is not None else (current is not None) == exists


def test_admin_load_reload_unload_and_refusals(tiny, tmp_path):
    prompts = tmp_path / "prompts"
    v1 = make_set(tiny, "office", OFFICE, 1)
    publish(v1, prompts)
    (prompts / ".office2.tmp").mkdir()  # work in progress: ignored
    (prompts / "_scratch").mkdir()
    make_set(tiny, "spaced", EXTRA, 6).save(prompts / "not a name")  # ignored with a warning, not fatal

    async def scenario():
        async with serve(settings(prompts, admin_token="t0ken")) as client:
            async def admin(method: str, name: str = "") -> httpx.Response:
                return await client.request(method, f"/admin/promptsets{'/' + name if name else ''}", headers=ADMIN)

            listing = (await admin("GET")).json()
            assert [s["name"] for s in listing["prompt_sets"]] == ["office"]

            v2 = make_set(tiny, "office", OFFICE, 11)
            v2.save(prompts / "office")  # rewritten in place, then reloaded explicitly
            reloaded = await admin("POST", "office")
            assert reloaded.status_code == 200 and await _version(client, "clipart") == v2.version

            _tamper_weights(prompts / "office")
            corrupt = await admin("POST", "office")
            assert corrupt.status_code == 422 and corrupt.json()["error"] == "load_failed"
            assert ("sha256 mismatch" in corrupt.json()["detail"]
                    and f"{v2.version} keeps serving" in corrupt.json()["detail"])
            served = await classify(client, "clipart", image_bytes(1))
            assert served.status_code == 200 and served.json()["version"] == v2.version

            # A task defined by two sets is served by the newer publication; the older takes it back when that goes.
            moved = make_set(tiny, "office2", {"clipart": OFFICE["clipart"]}, 5)
            moved.save(prompts / "office2")
            assert (await admin("POST", "office2")).status_code == 200
            assert (await client.get("/tasks/clipart")).json()["prompt_set"] == "office2"
            assert (await client.get("/tasks/product")).json()["prompt_set"] == "office"
            sets = {s["name"]: s for s in (await admin("GET")).json()["prompt_sets"]}
            assert (sets["office"]["tasks"], sets["office"]["shadowed"]) == (["product", "real"], ["clipart"])
            assert (sets["office2"]["tasks"], sets["office2"]["shadowed"]) == (["clipart"], [])
            assert (await admin("DELETE", "office2")).status_code == 200
            assert (await client.get("/tasks/clipart")).json()["prompt_set"] == "office"

            assert (await admin("POST", "missing")).status_code == 404
            assert (await admin("POST", "bad name!")).json()["error"] == "invalid_name"

            assert (await admin("DELETE", "office")).status_code == 200
            assert (await classify(client, "clipart", image_bytes(1))).status_code == 404
            assert (await admin("DELETE", "office")).status_code == 404
            states = {s["name"]: s["state"] for s in (await admin("GET")).json()["prompt_sets"]}
            assert states == {"office": "failed", "office2": "available"}  # office's last load attempt failed

            v3 = make_set(tiny, "office", OFFICE, 13)
            v3.save(prompts / "office")
            assert (await admin("POST", "office")).status_code == 200
            assert await _version(client, "clipart") == v3.version
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_prompt_set_loads_total", result="failure") == 1

    run(scenario())


def test_watcher_waits_for_a_complete_set(tiny, tmp_path):
    """A set whose promptset.json is not written yet is not read; once complete it loads."""
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    late = make_set(tiny, "doodles", DOODLES, 2)
    config = settings(prompts, watch_interval_s=0.05, watch_debounce_s=0.1, admin_token="t0ken")

    async def scenario():
        async with serve(config) as client:
            late.save(prompts / "doodles")
            config_text = (prompts / "doodles" / CONFIG_FILE).read_text()
            (prompts / "doodles" / CONFIG_FILE).unlink()  # as if the weights were written and the config not yet
            await asyncio.sleep(0.5)
            assert await _version(client, "sketch") is None
            text = (await client.get("/metrics")).text
            assert metric(text, "mmap_prompt_set_loads_total", result="failure") == 0
            staging = prompts / "doodles" / f".{CONFIG_FILE}.tmp"
            staging.write_text(config_text)
            staging.rename(prompts / "doodles" / CONFIG_FILE)
            await _eventually(lambda: _is(client, "sketch", late.version), "doodles loaded once complete")

    run(scenario())


def test_regrouping_and_retraining_move_tasks_with_no_failed_request(tiny, tmp_path):
    """Tasks move between sets by publishing: the newest publication of a task serves it, in one swap each.
    Regrouping {clipart, product} + {sketch, quickdraw} into {clipart, sketch} + {product, quickdraw}, then
    retraining clipart alone, then republishing a set with new class names (same weights): traffic on every
    task meanwhile, not one failed request, and no admin call."""
    prompts = tmp_path / "prompts"
    office = {t: OFFICE[t] for t in ("clipart", "product")}
    publish(make_set(tiny, "g1", office, 1), prompts)
    publish(make_set(tiny, "g2", DOODLES, 2), prompts)
    h1 = make_set(tiny, "h1", {"clipart": OFFICE["clipart"], "sketch": DOODLES["sketch"]}, 3)
    h2 = make_set(tiny, "h2", {"product": OFFICE["product"], "quickdraw": DOODLES["quickdraw"]}, 4)
    retrained = make_set(tiny, "clipart-v2", {"clipart": OFFICE["clipart"]}, 5)
    config = settings(prompts, watch_interval_s=0.05, watch_debounce_s=0.1)

    async def owners(client: httpx.AsyncClient) -> dict[str, str]:
        return {t["task"]: t["prompt_set"] for t in (await client.get("/tasks")).json()["tasks"]}

    async def scenario():
        async with serve(config) as client:
            async with GoodTraffic(client, ("clipart", "product", "sketch", "quickdraw"), minimum=40) as traffic:
                publish(h1, prompts)
                await _eventually(lambda: _owned(client, {"clipart": "h1", "sketch": "h1", "product": "g1",
                                                          "quickdraw": "g2"}), "h1 took clipart and sketch")
                publish(h2, prompts)
                await _eventually(lambda: _owned(client, {"clipart": "h1", "sketch": "h1", "product": "h2",
                                                          "quickdraw": "h2"}), "h2 took product and quickdraw")
                shutil.rmtree(prompts / "g1")
                shutil.rmtree(prompts / "g2")  # nothing of theirs is served any more: removing them changes nothing
                await _eventually(lambda: _no_set(client, ("g1", "g2")), "g1 and g2 gone")
                publish(retrained, prompts)
                await _eventually(lambda: _owned(client, {"clipart": "clipart-v2", "sketch": "h1"}),
                                  "the retrained clipart served")
                old_version = await _version(client, "sketch")
                renamed = PromptSet.load(prompts / "h1")  # the same weights, new class names: a new version
                renamed.tasks["sketch"] = TaskSpec(["green apple", "pear"], DOODLES["sketch"].template, "lines")
                publish(renamed, prompts, "h1")
                await _eventually(lambda: _version_changed(client, "sketch", old_version), "new class names served")
            traffic.assert_all_served()
            assert (await client.get("/tasks/sketch")).json()["classes"] == ["green apple", "pear"]
            # Republishing h1 published all of its tasks anew: its clipart is again the newest publication.
            assert (await owners(client)) == {"clipart": "h1", "sketch": "h1", "product": "h2", "quickdraw": "h2"}

    run(scenario())


async def _owned(client: httpx.AsyncClient, expected: dict[str, str]) -> bool:
    served = {t["task"]: t["prompt_set"] for t in (await client.get("/tasks")).json()["tasks"]}
    return all(served.get(task) == owner for task, owner in expected.items())


async def _no_set(client: httpx.AsyncClient, names: tuple[str, ...]) -> bool:
    return not {t["prompt_set"] for t in (await client.get("/tasks")).json()["tasks"]} & set(names)


async def _version_changed(client: httpx.AsyncClient, task: str, old: str | None) -> bool:
    return await _version(client, task) not in (None, old)
