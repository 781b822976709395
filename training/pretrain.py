"""Pretrain the embedded default: a tiny open_clip CLIP on captioned procedural images.

    python -m training.pretrain [--out mmap_model/weights/mmap-tiny] [--steps 500] [--seed 0] [--seen a,b,c]

The architecture is `mmap_model/weights/mmap-tiny/open_clip_config.json` (native ViT + native
text tower, so it can be prompted). Training uses open_clip's standard contrastive loss
(`open_clip.ClipLoss`) on images of the SEEN domains only, each paired with a freshly sampled
caption naming class, domain and attributes; the other domains stay unseen so that prompts have
room to help there. `--seen` picks other seen domains (experiments; the embedded default keeps
SEEN_DOMAINS). Images are drawn once (a fixed pool per class and seen domain, deterministic
by seed) and put through the model's own eval preprocess; each step samples a batch from the pool.

Writes open_clip's format (`open_clip_config.json` + `open_clip_model.safetensors`, loadable
with `open_clip.create_model('local-dir:<out>')`) and `MODEL_CARD.md` with per-domain zero-shot
accuracy on a fresh sample (another seed) of every domain.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from mmap_model import EMBEDDED_MODEL, PromptedCLIP, class_text_features, load_backbone
from mmap_model.backbone import EMBEDDED_DIR

from . import synthetic
from .configs import HelpFormatter, comma_list

SEEN_DOMAINS = ["photo", "clipart", "sketch", "product"]
EVAL_SEED_OFFSET = 1000  # evaluation images come from another seed than the training pool


def preprocess_pool(preprocess, images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> the model's input tensors [N, 3, S, S], through open_clip's preprocess."""
    return torch.stack([preprocess(Image.fromarray(a)) for a in images])


def draw_pool(domains: list[str], per_class: int, seed: int, size: int,
              preprocess) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Every class x domain, `per_class` images each: (inputs, class ids, domain ids)."""
    inputs, classes, doms = [], [], []
    n_classes = len(synthetic.CLASSES)
    for d_i, domain in enumerate(tqdm(domains, desc="drawing", leave=False)):
        cls = np.repeat(np.arange(n_classes), per_class)
        idx = np.tile(np.arange(per_class), n_classes)
        inputs.append(preprocess_pool(preprocess, synthetic.batch(domain, cls, idx, seed=seed, size=size)))
        classes.append(cls)
        doms.append(np.full(len(cls), d_i))
    return torch.cat(inputs), np.concatenate(classes), np.concatenate(doms)


@torch.no_grad()
def zero_shot(model, tokenizer, preprocess, domains: list[str], per_class: int, seed: int, size: int,
              domain_prompts: bool) -> dict[str, float]:
    """Top-1 accuracy per domain with the hand-written template (`synthetic.prompt_text`)."""
    prompted = PromptedCLIP(model)
    model.eval()
    accuracy = {}
    for domain in domains:
        inputs, labels, _ = draw_pool([domain], per_class, seed, size, preprocess)
        template = synthetic.prompt_text("{}", domain if domain_prompts else None)
        text = class_text_features(prompted, tokenizer, synthetic.CLASSES, template)
        pred = (model.encode_image(inputs, normalize=True) @ text.T).argmax(-1).numpy()
        accuracy[domain] = float((pred == labels).mean())
    return accuracy


def train(args: argparse.Namespace, evaluate: bool = True) -> dict:
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    backbone = load_backbone(EMBEDDED_MODEL, None)  # random init of the embedded architecture
    model, tokenizer, preprocess = backbone.model, backbone.tokenizer, backbone.preprocess
    model.train().requires_grad_(True)
    prompted = PromptedCLIP(model)
    pool, pool_cls, pool_dom = draw_pool(args.seen, args.pool_per_class, args.seed, args.size, preprocess)
    loss_fn = open_clip.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="pretrain")
    for step in bar:
        idx = rng.integers(len(pool), size=args.batch_size)
        texts = [synthetic.caption(int(pool_cls[i]), args.seen[pool_dom[i]], rng) for i in idx]
        images = pool[torch.from_numpy(idx)]
        if rng.random() < 0.5:  # horizontal flip of the whole batch: cheap augmentation, shapes stay shapes
            images = images.flip(-1)
        image_features = model.encode_image(images, normalize=True)
        text_features = prompted.encode_text(tokenizer(texts), normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    train_seconds = time.perf_counter() - start
    model.eval().requires_grad_(False)
    if not evaluate:
        return {"model": model, "results": {}, "train_seconds": train_seconds}
    eval_seed = args.seed + EVAL_SEED_OFFSET
    results = {"eval_seed": eval_seed, "eval_per_class": args.eval_per_class,
        "generic": zero_shot(model, tokenizer, preprocess, list(synthetic.DOMAINS), args.eval_per_class, eval_seed,
                             args.size, domain_prompts=False),
        "domain": zero_shot(model, tokenizer, preprocess, list(synthetic.DOMAINS), args.eval_per_class, eval_seed,
                            args.size, domain_prompts=True),
    }
    return {"model": model, "results": results, "train_seconds": train_seconds}


def write(out: Path, model, args: argparse.Namespace, results: dict, train_seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != EMBEDDED_DIR.resolve():
        shutil.copy(EMBEDDED_DIR / "open_clip_config.json", out / "open_clip_config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    (out / "zero_shot.json").write_text(json.dumps({**results, "train_seconds": train_seconds}, indent=2))
    write_card(out, args)


def model_card(args: argparse.Namespace, results: dict, train_seconds: float) -> str:
    cfg = json.loads((EMBEDDED_DIR / "open_clip_config.json").read_text())["model_cfg"]
    rows = "\n".join(
        f"| {d} | {synthetic.DOMAINS[d]} | {'seen' if d in args.seen else 'unseen'} | "
        f"{100 * results['domain'][d]:.1f} | {100 * results['generic'][d]:.1f} |"
        for d in synthetic.DOMAINS)
    seen = np.mean([results["domain"][d] for d in args.seen])
    unseen = np.mean([results["domain"][d] for d in synthetic.DOMAINS if d not in args.seen])
    return f"""# mmap-tiny: the embedded default CLIP

A tiny open_clip CLIP (native ViT image tower + native text tower) pretrained by this project on
its procedural multi-domain data (`training/synthetic/`), so that the product works end to end
offline. It is a stand-in for a real CLIP, not a general-purpose model: it knows {len(synthetic.CLASSES)}
drawn object classes in the styles below and nothing else.

- Architecture (`open_clip_config.json`): embed {cfg['embed_dim']}; vision {cfg['vision_cfg']['image_size']} px,
  patch {cfg['vision_cfg']['patch_size']}, width {cfg['vision_cfg']['width']}, {cfg['vision_cfg']['layers']} layers;
  text width {cfg['text_cfg']['width']}, {cfg['text_cfg']['heads']} heads, {cfg['text_cfg']['layers']} layers,
  context 77, open_clip's tokenizer. Load it with `mmap_model.load_backbone()` (model `mmap-tiny`, pretrained
  `embedded`) or `open_clip.create_model('local-dir:mmap_model/weights/mmap-tiny')`.
- Data: {len(synthetic.CLASSES)} classes x seen domains {", ".join(args.seen)}; a pool of {args.pool_per_class} images
  per class and domain drawn at {args.size} px (seed {args.seed}); each step pairs images with freshly sampled
  captions (`synthetic.caption`). \
Unseen during pretraining: {", ".join(d for d in synthetic.DOMAINS if d not in args.seen)}.
- Training: open_clip `ClipLoss`, AdamW (lr {args.lr}, weight decay {args.weight_decay}), batch {args.batch_size},
  {args.steps} steps, warm-up then cosine, deterministic by seed. It took {train_seconds / 60:.1f} minutes
  ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads).
- Reproduce: `python -m training.pretrain{'' if args.seen == SEEN_DOMAINS else ' --seen ' + ','.join(args.seen)}` \
(the other settings above are the defaults).

## Zero-shot top-1 accuracy (%)

{args.eval_per_class} fresh images per class and domain (seed {args.seed + EVAL_SEED_OFFSET}, never in the
training pool); chance is {100 / len(synthetic.CLASSES):.1f}%. "domain template" names the domain, as the
captions did ("{synthetic.prompt_text('{}', 'sketch')}"); "generic" always says "{synthetic.prompt_text('{}')}".

| domain | family | pretraining | domain template | generic |
|---|---|---|---|---|
{rows}

Mean over seen domains {100 * seen:.1f}%, over unseen domains {100 * unseen:.1f}% (domain template). The
generic template fails on sketches: the model learnt that "photo" means textured images, which is the kind of
modality gap prompts are meant to close. `tests/test_embedded.py` checks a fresh sample of every seen domain
against this card and re-runs the card's evaluation.
"""


def write_card(out: Path, args: argparse.Namespace) -> None:
    """(Re)write MODEL_CARD.md from the stored evaluation (zero_shot.json)."""
    results = json.loads((out / "zero_shot.json").read_text())
    (out / "MODEL_CARD.md").write_text(model_card(args, results, results["train_seconds"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.pretrain",
                                     description="Pretrain the embedded tiny CLIP on procedural data.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--pool-per-class", type=int, default=150)
    parser.add_argument("--eval-per-class", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="drawing size in px (the model resizes to its input)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seen", type=comma_list, default=SEEN_DOMAINS,
                        help=f"comma-separated domains to pretrain on (default: {','.join(SEEN_DOMAINS)})")
    args = parser.parse_args(argv)
    if not args.seen or not set(args.seen) <= set(synthetic.DOMAINS):
        parser.error(f"--seen needs domains of {sorted(synthetic.DOMAINS)}, got {args.seen}")
    torch.set_num_threads(args.threads)
    trained = train(args)
    write(args.out, trained["model"], args, trained["results"], trained["train_seconds"])
    for kind in ("generic", "domain"):
        print(kind, " ".join(f"{d}={100 * a:.1f}" for d, a in trained["results"][kind].items()))


if __name__ == "__main__":
    main()
