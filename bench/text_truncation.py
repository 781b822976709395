"""EOT truncation speed-up of the text tower: `python bench/text_truncation.py [--model ViT-B-32]`.

Encodes a task's class texts (prompted, 4 placeholder tokens) with the full 77-position context
and truncated after the last EOT, alternating the two in one run, and prints the median times and
their ratio. Random weights: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from mmap_model import PromptedCLIP, load_backbone, prompt_texts

CLASSES = ["alarm clock", "backpack", "batteries", "bed", "bike", "bottle", "bucket", "calculator", "calendar",
           "candles", "chair", "clipboards", "computer", "couch", "curtains", "desk lamp", "drill", "eraser",
           "exit sign", "fan", "file cabinet", "flipflops", "flowers", "folder", "fork", "glasses", "hammer",
           "helmet", "kettle", "keyboard", "knives", "lamp shade", "laptop", "marker", "monitor", "mop", "mouse",
           "mug", "notebook", "oven", "pan", "paper clip", "pen", "pencil", "postit notes", "printer", "push pin",
           "radio", "refrigerator", "ruler", "scissors", "screwdriver", "shelf", "sink", "sneakers", "soda",
           "speaker", "spoon", "table", "telephone", "toothbrush", "toys", "trash can", "tv", "webcam"]  # Office-Home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    backbone = load_backbone(args.model, None, seed=0)
    prompted = PromptedCLIP(backbone.model)
    tokens = backbone.tokenizer(prompt_texts(CLASSES, "a photo of a {}.", 4))
    prompts = torch.randn(9, 4, backbone.widths.d_t) * 0.02
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.inference_mode():
        for truncate in (False, True):  # warm-up
            prompted.encode_text(tokens, prompts, truncate=truncate)
        for _ in range(args.repeats):
            for truncate in (False, True):
                start = time.perf_counter()
                prompted.encode_text(tokens, prompts, truncate=truncate)
                times[truncate].append(time.perf_counter() - start)
    full, short = statistics.median(times[False]), statistics.median(times[True])
    length = int(tokens.argmax(-1).max()) + 1
    print(f"model {args.model}, {len(CLASSES)} class texts, {torch.get_num_threads()} threads; "
          f"longest EOT at position {length - 1}")
    print(f"77 positions: {1000 * full:.1f} ms   truncated to {length}: {1000 * short:.1f} ms   "
          f"speed-up {full / short:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({
            "command": shlex.join(["python", *sys.argv]), "model": args.model, "texts": len(CLASSES),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "positions": [77, length],
            "seconds": {"full": times[False], "truncated": times[True]}, "speedup": full / short}, indent=1))


if __name__ == "__main__":
    main()
