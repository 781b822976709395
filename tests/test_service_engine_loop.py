"""The engine's loop, in this process, driven through its real socket and shared-memory ring as an HTTP worker
drives it: label sets new to the cache that arrive together get their text features from one forward."""

from __future__ import annotations

import threading

import torch
import zmq
from helpers.service import OFFICE, image_bytes, make_set, publish
from helpers.service import settings as service_settings

from mmap_model import PromptedCLIP, class_text_features
from service.core import InferenceCore
from service.engine import Engine
from service.metrics import Metrics
from service.transport import Catalog, Hello, Infer, PixelRing, Results, Scored, Welcome, decode_to_worker, encode
from service.uploads import Preprocessor

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


def test_new_label_sets_arriving_together_share_one_text_forward(tiny, tmp_path):
    office = make_set(tiny, "office", OFFICE, 1)
    publish(office, tmp_path / "prompts")
    core = InferenceCore(service_settings(tmp_path / "prompts"), tiny, Metrics())
    forwards = []  # the text tower's calls, counted around the real one
    encode_text = core.prompted.encode_text
    core.prompted.encode_text = lambda tokens, *a, **k: forwards.append(len(tokens)) or encode_text(tokens, *a, **k)
    hold, held = threading.Event(), threading.Event()
    score = core.score

    def first_batch_held(items):  # the loop is busy with a batch while the label requests arrive
        if not held.is_set():
            held.set()
            assert hold.wait(20)
        return score(items)

    core.score = first_batch_held
    engine = Engine(core.settings, core, f"ipc://{tmp_path}/engine")
    engine.start()
    loop = threading.Thread(target=engine.run)
    loop.start()
    context = zmq.Context()
    worker = context.socket(zmq.DEALER)
    height, width = tiny.preprocess_cfg["size"]
    ring = PixelRing(tmp_path / "ring", 8, height, width, create=True)
    try:
        worker.connect(engine.address)
        worker.send(encode(Hello(worker=0, pid=0, ring=str(ring.path), slots=8)))
        while True:  # ready once the prompt sets are loaded and the model warmed up
            assert worker.poll(30_000)
            message = decode_to_worker(worker.recv())
            catalog = message.catalog if isinstance(message, Welcome) else message
            if isinstance(catalog, Catalog) and catalog.ready:
                break
        pixels = Preprocessor(tiny.preprocess_cfg, 10**8)(image_bytes(1))
        ring.pixels[:] = pixels
        worker.send(encode(Infer(id=0, slot=0, task="clipart", top_k=3)))
        assert held.wait(20)
        forwards.clear()  # warm-up and start-up forwards are not this test's
        for i, labels in enumerate(SETS, start=1):
            worker.send(encode(Infer(id=i, slot=i, task="clipart", top_k=5, labels=list(labels))))
        hold.set()
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
    finally:
        hold.set()
        engine.stop()
        loop.join(30)
        engine.close()
        worker.close(linger=0)
        context.term()
        ring.unlink()
