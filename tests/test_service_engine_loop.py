"""The engine's loop, in this process, driven through its real socket and shared-memory ring as an HTTP worker
drives it: label sets new to the cache that arrive together get their text features from one forward, and with
two batches in flight the next batch is launched before the last is answered."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import zmq
from helpers.service import DOODLES, OFFICE, image_bytes, make_set, publish
from helpers.service import settings as service_settings

from mmap_model import Backbone, PromptedCLIP, class_text_features, load_backbone
from service.engine.core import InferenceCore
from service.engine.loop import Engine
from service.http.engine_client import CatalogView
from service.http.uploads import Preprocessor
from service.metrics import Metrics
from service.transport import (
    Call,
    Catalog,
    CatalogDelta,
    Hello,
    Infer,
    ListSets,
    PixelRing,
    Reply,
    Results,
    Scored,
    Sync,
    Welcome,
    decode_to_worker,
    encode,
)

SETS = [("dog", "kettle"), ("owl", "lamp", "mug"), ("cat",), ("dog", "kettle", "zebra"), ("pen", "boat"),
        ("dog", "kettle")]  # the first again: computed once


def answers(socket: zmq.Socket, n: int) -> dict[int, object]:
    """The next `n` answers by request id (catalog pushes skipped)."""
    got: dict[int, object] = {}
    while len(got) < n:
        assert socket.poll(20_000), "no answer from the engine"
        message = decode_to_worker(socket.recv())
        if isinstance(message, Results):
            got.update({item.id: item for item in message.items})
    return got


@contextlib.contextmanager
def engine_loop(tiny, tmp_path: Path, slots: int = 8, backbone: Backbone | None = None,
                **overrides) -> Iterator[tuple[Engine, zmq.Socket, PixelRing]]:
    """The office set's engine loop on a thread (its model: `backbone`, else `tiny`), with its first launched
    batch held until `engine.hold` is set, and one worker's socket and ring connected to it, once it is ready."""
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path / "prompts")
    core = InferenceCore(service_settings(tmp_path / "prompts", **overrides), backbone or tiny, Metrics())
    hold, held = threading.Event(), threading.Event()
    launch = core.launch

    def first_batch_held(items):  # the loop is busy with a batch while the next requests arrive
        if not held.is_set():
            held.set()
            assert hold.wait(20)
        return launch(items)

    core.launch = first_batch_held
    engine = Engine(core.settings, core, f"ipc://{tmp_path}/engine")
    engine.hold, engine.held = hold, held
    engine.start()
    loop = engine.thread = threading.Thread(target=engine.run)
    loop.start()
    context = zmq.Context()
    worker = context.socket(zmq.DEALER)
    height, width = tiny.preprocess_cfg["size"]
    ring = PixelRing(tmp_path / "ring", slots, height, width, create=True)
    try:
        worker.connect(engine.address)
        worker.send(encode(Hello(worker=0, pid=0, ring=str(ring.path), slots=slots)))
        while True:  # ready once the prompt sets are loaded and the model warmed up
            assert worker.poll(30_000)
            message = decode_to_worker(worker.recv())
            catalog = message.catalog if isinstance(message, Welcome) else message
            if isinstance(catalog, Catalog | CatalogDelta) and catalog.ready:
                break
        yield engine, worker, ring
    finally:
        hold.set()
        engine.stop()
        loop.join(30)
        engine.close()
        worker.close(linger=0)
        context.term()
        ring.unlink()


def test_new_label_sets_arriving_together_share_one_text_forward(tiny, tmp_path):
    with engine_loop(tiny, tmp_path) as (engine, worker, ring):
        core = engine.core
        forwards = []  # the text tower's calls, counted around the real one
        encode_text = core.prompted.encode_text
        core.prompted.encode_text = lambda tokens, *a, **k: forwards.append(len(tokens)) or encode_text(tokens, *a,
                                                                                                         **k)
        pixels = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
        ring.pixels[:] = pixels
        worker.send(encode(Infer(id=0, slot=0, task="clipart", top_k=3)))
        assert engine.held.wait(20)
        for i, labels in enumerate(SETS, start=1):
            worker.send(encode(Infer(id=i, slot=i, task="clipart", top_k=5, labels=list(labels))))
        engine.hold.set()
        got = answers(worker, 1 + len(SETS))
        assert forwards == [sum(len(s) for s in dict.fromkeys(SETS))]  # one forward, each new set's names once
        image = core.normalize(torch.from_numpy(pixels[None].copy()))
        prompted, handle = PromptedCLIP(tiny.model), core.registry.snapshot.tasks["clipart"]
        with torch.inference_mode():
            features = prompted.encode_image(image, handle.visual_prompts, normalize=True)
            for i, labels in enumerate(SETS, start=1):  # each as if it had been computed alone
                text = class_text_features(prompted, tiny.tokenizer, list(labels), handle.template,
                                           handle.text_prompts)
                expected = dict(zip(labels, (prompted.logit_scale * features @ text.T).softmax(-1)[0].tolist(),
                                    strict=True))
                answer = got[i]
                assert isinstance(answer, Scored) and set(answer.labels) == set(labels)
                assert max(abs(s - expected[label]) for label, s in zip(answer.labels, answer.scores,
                                                                       strict=True)) <= 1e-5
        assert len(core.label_cache) == len(dict.fromkeys(SETS))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_two_batches_in_flight_launch_the_next_before_answering_the_last_and_answer_alike(tiny, tmp_path, device):
    """batches_in_flight 2: the loop launches batch N+1 before it answers batch N, and every answer is what one
    batch at a time gives (the same requests scored by the core directly). On CUDA the device still computes a
    batch while the next one's pixels are staged and copied."""
    tasks = ["clipart", "real", "product"]
    backbone, tolerance = (None, 1e-5) if device == "cpu" else (load_backbone("mmap-tiny", None, "cuda", "fp16",
                                                                              seed=0), 2e-2)
    with engine_loop(tiny, tmp_path, slots=24, backbone=backbone, device=device, max_batch_size=4,
                     batches_in_flight=2) as (engine, worker, ring):
        core = engine.core
        waiting = []  # batches launched and not yet answered, seen at each launch
        launch = core.launch
        core.launch = lambda items: waiting.append(len(engine.in_flight)) or launch(items)
        preprocess = Preprocessor(tiny.preprocess_cfg, 10**8)
        for i in range(24):
            ring.pixels[i] = preprocess(image_bytes(i % 6))
        worker.send(encode(Infer(id=0, slot=0, task=tasks[0], top_k=3)))
        assert engine.held.wait(20)
        for i in range(1, 24):  # queued while the first batch is held: five more batches in a row
            worker.send(encode(Infer(id=i, slot=i, task=tasks[i % 3], top_k=3)))
        engine.hold.set()
        got = answers(worker, 24)
        assert max(waiting) == 1 and not engine.in_flight  # the next launched while one was in flight; none left
        admitted = [core.admit(i, tasks[i % 3], ring.pixels[i], 3, 0) for i in range(24)]
        for item, expected in zip(admitted, core.score(admitted), strict=True):
            answer = got[item.request]
            assert isinstance(answer, Scored) and len(answer.labels) == 3, item.request
            want = dict(zip(expected.labels, expected.scores, strict=True))
            assert max(abs(score - want.get(label, 0.0)) for label, score in zip(answer.labels, answer.scores,
                                                                                  strict=True)) <= tolerance


def test_a_batch_forward_time_counts_launching_and_waiting_not_the_time_between(tiny, tmp_path):
    """With batches in flight the loop does other work between a batch's launch and its answers: the forward
    time (metrics, Retry-After) must not count it."""
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path)
    core = InferenceCore(service_settings(tmp_path), tiny, Metrics())
    core.registry.scan()
    core.ready = True
    pixels = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
    launched = core.launch([core.admit(i, "clipart", pixels, 3, 0) for i in range(4)])
    time.sleep(0.5)
    assert all(isinstance(answer, Scored) for answer in core.finish(launched))
    assert 0 < core.last_forward_s < 0.5


def test_an_admin_call_is_answered_between_batches_while_batches_stay_due(tiny, tmp_path):
    """Under a load that keeps a batch always due, the loader thread's results (admin calls, the watcher's
    loads and their catalog pushes) still come back to the loop after the next batch, not once the load ends."""
    requests = 200
    with engine_loop(tiny, tmp_path, slots=1, max_batch_size=1) as (engine, worker, ring):
        ring.pixels[0] = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
        worker.send(encode(Infer(id=0, slot=0, task="clipart", top_k=3)))
        assert engine.held.wait(20)
        for i in range(1, requests):  # one image a batch: 200 batches due in a row
            worker.send(encode(Infer(id=i, slot=0, task="clipart", top_k=3)))
        worker.send(encode(Call(id=7, op=ListSets())))
        engine.hold.set()
        answered, reply_after = 0, None
        while answered < requests:
            assert worker.poll(20_000), "no answer from the engine"
            message = decode_to_worker(worker.recv())
            if isinstance(message, Results):
                answered += len(message.items)
            elif isinstance(message, Reply):
                assert message.status == 200 and message.listing.prompt_sets[0].name == "office"
                reply_after = answered
        assert reply_after is not None and reply_after < requests // 2, reply_after


def catalog_updates(worker: zmq.Socket, wait_ms: int = 2_000) -> list[Catalog | CatalogDelta]:
    """The catalog messages the engine pushed until it fell silent for `wait_ms`."""
    got = []
    while worker.poll(wait_ms):
        message = decode_to_worker(worker.recv())
        if isinstance(message, Catalog | CatalogDelta):
            got.append(message)
    return got


def synced(worker: zmq.Socket, view: CatalogView) -> Catalog | CatalogDelta:
    """Ask the engine what changed since `view`'s generation (a worker's `Sync`); its answer."""
    worker.send(encode(Sync(view.source, view.generation)))
    return catalog_updates(worker)[-1]


def test_every_registry_change_reaches_the_workers_as_a_delta(tiny, tmp_path):
    """Each published snapshot has a new serial (an id() of a freed snapshot can come back, so the loop must not
    tell them apart by it), and each change reaches the workers as a delta of what changed: applied in order, the
    deltas give the final state, and a delta names only the tasks its change touched."""
    with engine_loop(tiny, tmp_path) as (engine, worker, ring):
        catalog_updates(worker, 300)
        view = CatalogView("")
        full = synced(worker, view)  # a copy from nowhere: the whole catalog
        assert isinstance(full, Catalog) and view.apply(full) and set(view.tasks) == set(OFFICE)
        registry, serials = engine.core.registry, [engine.core.registry.snapshot.serial]
        publish(make_set(tiny, "doodles", DOODLES, 2), tmp_path / "prompts")
        deltas = []
        for change in (lambda: registry.load("doodles"), lambda: registry.unload("office"),
                       lambda: registry.load("office")):
            change()
            serials.append(registry.snapshot.serial)
            deltas += catalog_updates(worker, 500)
        assert serials == list(range(serials[0], serials[0] + 4))
        assert deltas and all(isinstance(d, CatalogDelta) for d in deltas)
        assert all(view.apply(d) for d in deltas)
        assert set(view.tasks) == set(OFFICE) | set(DOODLES) and view.names == sorted(view.tasks)
        assert {t.task for t in deltas[0].tasks} == set(DOODLES) and not deltas[0].removed
        assert set(deltas[1].removed) == set(OFFICE) and not deltas[1].tasks


def test_a_worker_that_missed_a_delta_gets_what_it_missed(tiny, tmp_path):
    """A delta that does not follow the worker's copy is not applied; the worker's Sync gets the changes since its
    copy (a delta from its generation), after which its copy equals a fresh one."""
    with engine_loop(tiny, tmp_path) as (engine, worker, ring):
        catalog_updates(worker, 300)
        view = CatalogView("")
        view.apply(synced(worker, view))
        publish(make_set(tiny, "doodles", DOODLES, 2), tmp_path / "prompts")
        engine.core.registry.load("doodles")
        missed = catalog_updates(worker, 500)  # lost on the way
        engine.core.registry.unload("office")
        (after,) = catalog_updates(worker, 500)
        assert missed and not view.apply(after), "a delta that skips a generation must not be applied"
        answer = synced(worker, view)
        assert isinstance(answer, CatalogDelta) and answer.base == missed[0].base
        assert view.apply(answer) and set(view.tasks) == set(DOODLES)
        assert {t.task: t.version for t in synced(worker, CatalogView("")).tasks} == {
            t: i.version for t, i in view.tasks.items()}


def test_a_batch_still_on_the_device_when_the_engine_stops_is_answered(tiny, tmp_path):
    """With two batches in flight a turn of the loop can end with one launched and unanswered: if the engine stops
    then, closing it answers that batch (before, its requests waited for their workers' timeout)."""
    with engine_loop(tiny, tmp_path, max_batch_size=4, batches_in_flight=2) as (engine, worker, ring):
        ring.pixels[0] = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
        worker.send(encode(Infer(id=0, slot=0, task="clipart", top_k=3)))
        assert engine.held.wait(20)
        engine.stop()
        engine.hold.set()
        engine.thread.join(20)
        assert len(engine.in_flight) == 1  # launched, not answered when the loop ended
        engine.close()
        got = answers(worker, 1)
        assert isinstance(got[0], Scored) and len(got[0].labels) == 3
