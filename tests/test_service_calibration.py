"""Calibrated scores and abstention through the service: a task's temperature divides its logits (its own classes
and a caller's labels alike), and `min_score` (or the task's default) makes an answer abstain."""

from __future__ import annotations

import dataclasses

import pytest
from helpers.service import OFFICE, image_bytes, make_set, publish, reference_scores, run, scores, serve, settings

from mmap_model import PromptSet


@pytest.fixture(scope="module")
def calibrated(tiny, tmp_path_factory):
    """office with clipart's temperature 0.02 (the random backbone's scores are near uniform: this sharpens them)
    and product's default threshold 0.99; doodles as it was trained (no temperature, no threshold)."""
    directory = tmp_path_factory.mktemp("prompts")
    ps = make_set(tiny, "office", OFFICE, 1)
    ps.tasks["clipart"] = dataclasses.replace(ps.tasks["clipart"], temperature=0.02)
    ps.tasks["product"] = dataclasses.replace(ps.tasks["product"], min_score=0.99)
    publish(ps, directory)
    return directory, PromptSet.load(directory / "office")


def test_the_temperature_divides_the_logits_of_the_task_and_of_caller_labels(tiny, calibrated):
    directory, ps = calibrated
    data = image_bytes(3)

    async def scenario():
        async with serve(settings(directory)) as c:
            info = (await c.get("/tasks/clipart")).json()
            assert (info["temperature"], info["min_score"]) == (0.02, None)
            got = scores(await c.post("/classify", params={"task": "clipart", "top_k": 10},
                                      files={"file": ("a.png", data, "image/png")}))
            expected = reference_scores(tiny, ps, "clipart", data)
            assert got == pytest.approx(expected, abs=2e-5)
            assert max(got.values()) > 0.5  # what T = 1 would not give on these near-uniform scores
            uncalibrated = reference_scores(tiny, dataclasses.replace(ps, tasks={
                "clipart": dataclasses.replace(ps.tasks["clipart"], temperature=1.0)}), "clipart", data)
            assert max(uncalibrated.values()) < 0.5
            assert sorted(got, key=got.get) == sorted(uncalibrated, key=uncalibrated.get)  # the same order
            # labels=: the task's prompts, template and temperature
            labels = ["kettle", "dog", "harbour"]
            got = scores(await c.post("/classify", params={"task": "clipart", "labels": ",".join(labels)},
                                      files={"file": ("a.png", data, "image/png")}))
            assert got == pytest.approx(reference_scores(tiny, ps, "clipart", data, labels), abs=2e-5)

    run(scenario())


def test_min_score_abstains_below_it_and_a_task_default_applies(calibrated):
    directory, _ = calibrated
    data = image_bytes(4)
    form = {"file": ("a.png", data, "image/png")}

    async def scenario():
        async with serve(settings(directory)) as c:
            confident = (await c.post("/classify", params={"task": "clipart", "min_score": 0.1}, files=form)).json()
            assert confident["abstained"] is False and confident["predictions"][0]["score"] >= 0.1
            unsure = (await c.post("/classify", params={"task": "clipart", "min_score": 1}, files=form)).json()
            assert unsure["abstained"] is True and unsure["predictions"] == confident["predictions"]
            # product's default (0.99) applies without min_score, and an explicit one overrides it
            assert (await c.post("/classify", params={"task": "product"}, files=form)).json()["abstained"] is True
            answer = (await c.post("/classify", params={"task": "product", "min_score": 0}, files=form)).json()
            assert answer["abstained"] is False
            # ... but not to caller labels: the default was chosen for the task's classes
            answer = (await c.post("/classify", params={"task": "product", "labels": "a,b"}, files=form)).json()
            assert answer["abstained"] is False
            # no threshold at all: never abstains
            assert (await c.post("/classify", params={"task": "clipart"}, files=form)).json()["abstained"] is False
            # batches: per image
            batch = (await c.post("/classify/batch", params={"task": "clipart", "min_score": 0.5},
                                  files=[("file", ("a.png", image_bytes(i), "image/png")) for i in range(6)])).json()
            for item in batch["results"]:
                assert item["abstained"] is (item["predictions"][0]["score"] < 0.5)
            for bad in ("1.5", "-0.1", "x", "nan"):
                response = await c.post("/classify", params={"task": "clipart", "min_score": bad}, files=form)
                assert response.status_code == 422 and "min_score" in response.json()["detail"]

    run(scenario())
