"""The engine's loop, in this process, driven through its real socket and shared-memory ring as a worker
drives it: a label set whose text features are being computed holds up no other request."""

from __future__ import annotations

import threading

import numpy as np
import zmq
from helpers.service import OFFICE, image_bytes, make_set, publish
from helpers.service import settings as service_settings

from service.core import InferenceCore
from service.engine import Engine
from service.metrics import Metrics
from service.transport import Catalog, Hello, Infer, PixelRing, Results, Scored, Welcome, decode_to_worker, encode
from service.uploads import Preprocessor


def answers(socket: zmq.Socket, timeout_ms: int = 20_000) -> list:
    """The next Results' items (catalog pushes skipped)."""
    while True:
        assert socket.poll(timeout_ms), "no answer from the engine"
        message = decode_to_worker(socket.recv())
        if isinstance(message, Results):
            return message.items


def test_a_label_set_being_computed_holds_up_no_other_request(tiny, tmp_path):
    publish(make_set(tiny, "office", OFFICE, 1), tmp_path / "prompts")
    core = InferenceCore(service_settings(tmp_path / "prompts"), tiny, Metrics())
    release = threading.Event()
    compute = core.compute_label_features

    def held(handle, classes):  # the real text tower, started only once the test says so
        assert release.wait(30)
        return compute(handle, classes)

    core.compute_label_features = held
    engine = Engine(core.settings, core, f"ipc://{tmp_path}/engine")
    engine.start()
    loop = threading.Thread(target=engine.run)
    loop.start()
    context = zmq.Context()
    worker = context.socket(zmq.DEALER)
    height, width = tiny.preprocess_cfg["size"]
    ring = PixelRing(tmp_path / "ring", 4, height, width, create=True)
    try:
        worker.connect(engine.address)
        worker.send(encode(Hello(worker=0, pid=0, ring=str(ring.path), slots=4)))
        while True:  # the catalog turns ready once the prompt sets are loaded and the model warmed up
            assert worker.poll(30_000)
            message = decode_to_worker(worker.recv())
            catalog = message.catalog if isinstance(message, Welcome) else message
            if isinstance(catalog, Catalog) and catalog.ready:
                break
        ring.pixels[0] = ring.pixels[1] = ring.pixels[2] = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
        worker.send(encode(Infer(id=1, slot=0, task="clipart", top_k=2, labels=["a lynx", "a teapot"])))
        worker.send(encode(Infer(id=2, slot=1, task="clipart", top_k=2)))
        worker.send(encode(Infer(id=3, slot=2, task="real", top_k=2, labels=["a lynx", "a teapot"])))
        first = answers(worker)  # while the label set's features are held back
        assert [a.id for a in first] == [2] and isinstance(first[0], Scored)
        release.set()
        later: list = []
        while len(later) < 2:
            later += answers(worker)
        assert sorted(a.id for a in later) == [1, 3]
        for answer in later:
            assert isinstance(answer, Scored) and set(answer.labels) == {"a lynx", "a teapot"}
            assert np.isclose(sum(answer.scores), 1.0, atol=1e-5)
        assert not engine.awaiting_labels and len(core.label_cache) == 2  # clipart's and real's, one each
    finally:
        release.set()
        engine.stop()
        loop.join(30)
        engine.close()
        worker.close(linger=0)
        context.term()
        ring.unlink()
