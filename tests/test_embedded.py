"""The embedded default: it loads offline, it does its job, and its model card is reproducible."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from mmap_model import load_backbone
from mmap_model.backbone import EMBEDDED_DIR
from training import pretrain, synthetic

CARD = (json.loads((EMBEDDED_DIR / "zero_shot.json").read_text()) if (EMBEDDED_DIR / "zero_shot.json").is_file()
        else None)
needs_weights = pytest.mark.skipif(CARD is None,
                                   reason="embedded weights not trained yet (python -m training.pretrain)")


@pytest.fixture(scope="module")
def fresh(embedded) -> dict[str, float]:
    """Zero-shot accuracy (domain templates) on images never drawn before (seed 7), 400 per domain: ~3 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is several times faster on a shared 2-core box
    try:
        with torch.inference_mode():
            return pretrain.zero_shot(embedded.model, embedded.tokenizer, embedded.preprocess,
                                      list(synthetic.DOMAINS), per_class=10, seed=7, size=64, domain_prompts=True)
    finally:
        torch.set_num_threads(threads)


@needs_weights
def test_zero_shot_on_a_fresh_sample_of_seen_domains(fresh):
    """Fresh images of the pretraining domains are classified about as well as the card says."""
    for domain in pretrain.SEEN_DOMAINS:
        bar = max(0.70, CARD["domain"][domain] - 0.08)  # 400 images: ±8 points covers sampling noise
        assert fresh[domain] >= bar, (domain, fresh[domain], bar)


@needs_weights
def test_unseen_domains_are_harder_but_far_above_chance(fresh):
    """The card's claim, measured on the shipped weights: every domain left out of pretraining scores below every
    pretraining domain by a clear margin, and still far above chance (1 in 40)."""
    seen = [fresh[d] for d in pretrain.SEEN_DOMAINS]
    unseen = [fresh[d] for d in synthetic.DOMAINS if d not in pretrain.SEEN_DOMAINS]
    assert min(seen) > max(unseen) + 0.10, fresh
    assert min(unseen) > 10 / len(synthetic.CLASSES), fresh
    for domain in synthetic.DOMAINS:  # and the card's numbers are these weights' numbers, up to sampling noise
        assert fresh[domain] == pytest.approx(CARD["domain"][domain], abs=0.08), (domain, fresh[domain])


@needs_weights
def test_model_card_evaluation_reproduces(embedded):
    """Re-running the card's evaluation (same seed) on the shipped weights gives the card's numbers."""
    for domain in ("sketch", "quickdraw"):
        for kind, domain_prompts in (("domain", True), ("generic", False)):
            acc = pretrain.zero_shot(embedded.model, embedded.tokenizer, embedded.preprocess, [domain],
                                     per_class=CARD["eval_per_class"], seed=CARD["eval_seed"], size=64,
                                     domain_prompts=domain_prompts)
            assert acc[domain] == pytest.approx(CARD[kind][domain], abs=1e-9), (domain, kind)


def test_pretraining_is_deterministic_by_seed():
    """Two short runs with one seed give identical weights (the full run is the same code, longer)."""
    def run():
        args = argparse.Namespace(steps=2, batch_size=8, lr=1e-3, weight_decay=0.1, pool_per_class=1, eval_per_class=1,
                                  size=32, seed=3, seen=pretrain.SEEN_DOMAINS)
        return pretrain.train(args, evaluate=False)["model"].state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_seen_domains_are_checked_before_any_training(capsys):
    for seen in ("photo,oil", ","):
        with pytest.raises(SystemExit):
            pretrain.main(["--seen", seen, "--steps", "1"])
        assert "--seen needs domains of" in capsys.readouterr().err


def test_seeded_random_weights_are_one_function_and_leave_the_callers_random_state_alone(tiny):
    state = torch.random.get_rng_state()
    again = load_backbone("mmap-tiny", None, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert again.fingerprint == tiny.fingerprint  # conftest's `tiny`, the service's random:0, --pretrained none
    assert load_backbone("mmap-tiny", "none", seed=1).fingerprint != tiny.fingerprint
    with pytest.raises(ValueError, match="pretrained=None"):
        load_backbone("mmap-tiny", "embedded", seed=0)
