"""Shared fixtures: real (tiny or random-weight) open_clip backbones, never a download."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from mmap_model import Backbone, PromptedCLIP, load_backbone

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns loudly about random weights


def _random_backbone(model: str) -> Backbone:
    return load_backbone(model, None, seed=0)


@pytest.fixture(scope="session")
def tiny() -> Backbone:
    """The embedded default's architecture with random weights."""
    return _random_backbone("mmap-tiny")


@pytest.fixture(scope="session")
def embedded() -> Backbone:
    """The embedded default with its trained weights (mmap-tiny, pretrained="embedded")."""
    return load_backbone()


@pytest.fixture(scope="session")
def vitb32() -> Backbone:
    return _random_backbone("ViT-B-32")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: on the shared 2-core box two threads run tiny models 3-7x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_prompted(tiny: Backbone) -> PromptedCLIP:
    return PromptedCLIP(tiny.model)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI a skip for a missing dependency is a failure: CI must run every test but the GPU ones."""
    outcome = yield
    report = outcome.get_result()
    expected_failure = hasattr(report, "wasxfail")  # xfail reports as skipped; it is not a missing dependency
    if report.skipped and not expected_failure and os.environ.get("CI") and "gpu" not in item.keywords:
        report.outcome = "failed"
        report.longrepr = f"skipped in CI (every non-GPU test must run here): {report.longrepr}"


# `make test` runs the suite on two processes (pytest-xdist, `--dist loadfile`: a file's tests share one process
# and its module fixtures). The files holding the longest tests go first, so they overlap with the rest instead
# of ending the run alone (the 60-s hot-swap soak, the measured-transfer grouping, the memory test).
LONGEST_FIRST = ("test_reliability_faults.py", "test_training_embedded.py", "test_reliability_process.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its order
