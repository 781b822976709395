"""Many tasks on one engine: incremental snapshots, bank rows reused only when no request can read them, catalog
paging, bounded metric labels, settled directory changes (docs/architecture.md, "Many tasks")."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers.service import DOODLES, OFFICE, image_bytes, make_set, metric, publish, run, serve, settings

from mmap_model import PromptConfig, TaskSpec
from service.engine import watcher as watcher_module
from service.engine.core import InferenceCore, Pending
from service.engine.watcher import DirectoryWatcher
from service.errors import LISTED_TASKS, unknown_task_detail
from service.http.engine_client import CatalogView
from service.http.uploads import Preprocessor
from service.metrics import OTHER_TASKS, Metrics
from service.transport import Catalog, CatalogDelta, Failed, Scored, TaskInfo

SCENES = {"indoor": TaskSpec(["kitchen", "office", "garage"], "a photo of a {}.", "places"),
          "outdoor": TaskSpec(["beach", "forest"], "a photo of a {}.", "places")}
NEW_CLIPART = {"clipart": TaskSpec(["dog", "cat", "car", "tree", "boat"], "a drawing of a {}.", "office")}


def ready_core(tiny, prompts: Path) -> InferenceCore:
    core = InferenceCore(settings(prompts), tiny, Metrics())
    core.registry.scan()
    core.ready = True
    return core


def admitted(core: InferenceCore, task: str, seed: int) -> Pending:
    pixels = Preprocessor(core.backbone.preprocess_cfg, 10**8)(image_bytes(seed))
    pending = core.admit(seed, task, pixels, 100, 0)
    assert isinstance(pending, Pending), pending
    return pending


def answers(core: InferenceCore, pending: list[Pending]) -> dict[tuple[str, int], Scored]:
    results = core.score(pending)
    assert all(isinstance(r, Scored) for r in results), results
    return {(r.task, r.id): r for r in results}


def test_incremental_publishing_scores_like_a_fresh_start(tiny, tmp_path):
    """Loads, reloads with new prompts, a newer set taking a task over, unloads and reloads, with the bank rows of
    replaced tasks reused: every task then scores exactly as in an engine that loaded the final directory at
    once, and the banks hold one row per loaded task."""
    prompts = tmp_path / "prompts"
    for ps in (make_set(tiny, "office", OFFICE, 1), make_set(tiny, "doodles", DOODLES, 2),
               make_set(tiny, "scenes", SCENES, 3, PromptConfig(method="maple"))):
        publish(ps, prompts)
    core = ready_core(tiny, prompts)
    registry = core.registry
    for change in (lambda: publish(make_set(tiny, "office", OFFICE, 4), prompts),
                   lambda: registry.load("office"),
                   lambda: registry.unload("doodles"),
                   lambda: publish(make_set(tiny, "drawings", NEW_CLIPART, 5), prompts),
                   lambda: registry.load("drawings"),  # newer: takes clipart over from office
                   lambda: publish(make_set(tiny, "doodles", DOODLES, 6), prompts),
                   lambda: registry.load("doodles"),
                   lambda: publish(make_set(tiny, "office", OFFICE, 7), prompts),
                   lambda: registry.load("office")):  # the newest publication again: clipart comes back
        change()
        core.reclaim([])  # nothing in flight: replaced rows are free for the next load
    fresh = ready_core(tiny, prompts)
    tasks = sorted(fresh.registry.snapshot.tasks)
    assert tasks == sorted(registry.snapshot.tasks) == sorted({*OFFICE, *DOODLES, *SCENES})
    assert registry.snapshot.tasks["clipart"].prompt_set == "office"
    assert set(registry.snapshot.sets["drawings"].handles) == {"clipart"}  # loaded, its task shadowed
    for task in tasks:
        assert registry.snapshot.tasks[task].version == fresh.registry.snapshot.tasks[task].version
    got = answers(core, [admitted(core, t, 10 * i + j) for i, t in enumerate(tasks) for j in range(3)])
    want = answers(fresh, [admitted(fresh, t, 10 * i + j) for i, t in enumerate(tasks) for j in range(3)])
    assert got.keys() == want.keys()
    for key, answer in got.items():
        assert answer.labels == want[key].labels, key
        assert max(abs(a - b) for a, b in zip(answer.scores, want[key].scores, strict=True)) <= 1e-5, key
    loaded = [h for s in registry.snapshot.sets.values() for h in s.handles.values() if h.slot.bank is not None]
    assert sum(bank.rows for bank in registry.banks) == len(loaded)  # replaced rows were reused, none leaked
    assert len({(id(h.slot.bank), h.slot.index) for h in loaded}) == len(loaded)


def test_a_request_keeps_its_bank_row_until_it_is_answered(tiny, tmp_path):
    """A request admitted before its task's set is replaced scores with the version it arrived in, even when
    rows are reclaimed and reused meanwhile: its row is reused only once no request in flight can read it."""
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    core = ready_core(tiny, prompts)
    before = admitted(core, "clipart", 1)
    expected = answers(core, [admitted(core, "clipart", 1)])[("clipart", 1)]
    publish(make_set(tiny, "office", OFFICE, 2), prompts)
    core.registry.load("office")
    core.reclaim([before])  # still queued: its rows stay
    publish(make_set(tiny, "doodles", DOODLES, 3), prompts)
    core.registry.load("doodles")  # takes fresh rows, not the ones `before` reads
    (old,) = core.score([before])
    assert old.version == expected.version and old.scores == pytest.approx(expected.scores, abs=1e-6)
    new = answers(core, [admitted(core, "clipart", 1)])[("clipart", 1)]
    assert new.version != old.version and new.scores != pytest.approx(old.scores, abs=1e-4)
    rows = sum(bank.rows for bank in core.registry.banks)
    core.reclaim([])
    publish(make_set(tiny, "office", OFFICE, 4), prompts)
    core.registry.load("office")
    core.reclaim([])
    assert sum(bank.rows for bank in core.registry.banks) == rows - len(OFFICE)  # the old office rows came back


def test_an_unknown_task_is_refused_naming_the_first_tasks_only(tiny, tmp_path):
    names = [f"task{i:05d}" for i in range(10_000)]
    detail = unknown_task_detail("nope", names[:LISTED_TASKS], len(names))
    assert len(detail) < 500 and "task00019" in detail and "task00020" not in detail and "10,000 in all" in detail
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    refused = ready_core(tiny, prompts).admit(0, "nope", b"", 1, 0)
    assert isinstance(refused, Failed) and refused.status == 404
    assert refused.detail == "unknown task 'nope'; loaded tasks: clipart, product, real"


def _info(task: str, version: str = "v1") -> TaskInfo:
    return TaskInfo(task, "set", version, "mmap", None, ["a"], [])


def test_a_workers_catalog_pages_and_follows_deltas():
    view = CatalogView("connecting")
    assert view.apply(Catalog("e1", 3, True, None, [_info(t) for t in ("b2", "a1", "c3", "b1")]))
    assert view.names == ["a1", "b1", "b2", "c3"]
    assert not view.apply(CatalogDelta("e1", 5, 4, True, None, [_info("z")], []))  # generation 4 was missed
    assert view.apply(CatalogDelta("e1", 3, 2, True, None, [_info("stale")], []))  # older: nothing to do
    assert view.apply(CatalogDelta("e1", 4, 3, True, None, [_info("b0"), _info("a1", "v2")], ["c3"]))
    assert view.names == ["a1", "b0", "b1", "b2"] and view.tasks["a1"].version == "v2" and view.generation == 4
    assert not view.apply(CatalogDelta("e2", 5, 4, True, None, [], []))  # another engine's generations
    page, after = view.page(2)
    assert [t.task for t in page] == ["a1", "b0"] and after == "b0"
    page, after = view.page(2, after)
    assert [t.task for t in page] == ["b1", "b2"] and after is None
    assert [t.task for t in view.page(10, prefix="b")[0]] == ["b0", "b1", "b2"]
    assert view.page(2, prefix="b") == ([view.tasks["b0"], view.tasks["b1"]], "b1")
    assert view.page(5, "b1", "b")[0] == [view.tasks["b2"]] and view.page(5, prefix="x") == ([], None)


def test_tasks_paging_and_metrics_labels_bounded(tiny, tmp_path):
    """GET /tasks pages in name order with a prefix filter; request metrics name at most metrics_max_tasks tasks
    (the first loaded), the other tasks count under "_other", and the totals stay exact."""
    prompts = tmp_path / "prompts"
    tasks = [f"t{i:02d}" for i in range(9)]
    for i, task in enumerate(tasks):
        publish(make_set(tiny, f"set{i}", {task: TaskSpec(["dog", "cat"], "a photo of a {}.", "g")}, i), prompts)

    async def scenario():
        async with serve(settings(prompts, metrics_max_tasks=3)) as client:
            everything = (await client.get("/tasks")).json()
            assert [t["task"] for t in everything["tasks"]] == tasks and everything["next"] is None
            seen, after = [], ""
            while True:
                page = (await client.get("/tasks", params={"limit": 4, "after": after})).json()
                seen += [t["task"] for t in page["tasks"]]
                if page["next"] is None:
                    break
                after = page["next"]
            assert seen == tasks
            assert [t["task"] for t in (await client.get("/tasks?prefix=t0&after=t05")).json()["tasks"]] == [
                "t06", "t07", "t08"]
            assert (await client.get("/tasks?limit=0")).status_code == 422
            for i, task in enumerate(tasks):
                for _ in range(i % 3 + 1):
                    response = await client.post(f"/classify?task={task}", content=image_bytes(i),
                                                 headers={"content-type": "image/png"})
                    assert response.status_code == 200, response.text
            text = (await client.get("/metrics")).text
        own = {t: metric(text, "mmap_requests_total", task=t, status="200") for t in tasks}
        assert own == {t: (i % 3 + 1 if i < 3 else 0) for i, t in enumerate(tasks)}
        other = metric(text, "mmap_requests_total", task=OTHER_TASKS, status="200")
        assert other == sum(i % 3 + 1 for i in range(3, len(tasks)))
        assert metric(text, "mmap_request_duration_seconds_count", task=OTHER_TASKS) == other
        assert metric(text, "mmap_tasks_loaded") == len(tasks) and metric(text, "mmap_prompt_sets_loaded") == 9

    run(scenario())


def test_a_change_is_applied_once_settled(tiny, tmp_path):
    """A set renamed into place whole (its files written long enough ago) is applied at the first poll that sees
    it; one whose files were just written waits for debounce_s, and the poll says when that is."""
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    watcher = DirectoryWatcher(debounce_s=5.0)
    for file in (prompts / "office").iterdir():
        os.utime(file, (time.time() - 10, time.time() - 10))
    now = time.monotonic()
    changes = watcher.poll(prompts, ["office"], now)
    assert list(changes.load) == ["office"] and changes.due == float("inf")
    publish(make_set(tiny, "doodles", DOODLES, 2), prompts)
    changes = watcher.poll(prompts, ["office", "doodles"], now)
    assert not changes.load and now + 4 < changes.due <= now + 5
    assert list(watcher.poll(prompts, ["office", "doodles"], changes.due).load) == ["doodles"]
    changes = watcher.poll(prompts, ["doodles"], now + 6)  # office gone: removal waits for debounce_s too
    assert not changes.remove and changes.due == now + 11
    assert watcher.poll(prompts, ["doodles"], now + 11).remove == ["office"]


def test_a_poll_of_many_sets_pauses_and_sees_every_set(tiny, tmp_path, monkeypatch):
    """The poll sleeps briefly every PAUSE_EVERY sets it looks at (so that the engine's loop can take the GIL),
    and still finds every set."""
    prompts = tmp_path / "prompts"
    publish(make_set(tiny, "office", OFFICE, 1), prompts)
    names = ["office", *(f"empty-{i:03d}" for i in range(watcher_module.PAUSE_EVERY * 2))]  # no promptset.json
    for name in names[1:]:
        (prompts / name).mkdir()
    pauses = []
    monkeypatch.setattr(watcher_module.time, "sleep", pauses.append)
    changes = DirectoryWatcher(debounce_s=0.0).poll(prompts, names, time.monotonic())
    assert list(changes.load) == ["office"]
    assert pauses == [watcher_module.PAUSE_S] * 2  # 129 names looked at, then the 1 found: paused at 64 and 128
