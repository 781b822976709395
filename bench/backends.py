"""Image-tower throughput, torch vs onnxruntime, in one run: `python bench/backends.py [--model ViT-B-32]`.

The backends are the service's own (`service.engine.backends.TorchImageTower`, eager, with CUDA graphs or
with torch.compile; `service.engine.onnx.backend.OnnxImageTower`), called as the engine calls them: CPU fp32
images and per-sample visual prompts [B, J, m, d_v] (default J=9, m=4: a grouped task under the
default PromptConfig) in, normalised features out, so host-device copies are included. Random
weights (seed 0): the cost does not depend on their values. For each batch size the backends are
measured alternately, `--repeats` rounds each (a round repeats the forward for at least
`--min-round-s`), and the median round is reported; the graph is exported first (not timed).

    python bench/backends.py --model ViT-B-32 --batch-sizes 1 8 32 --threads 2          # CPU
    python bench/backends.py --model ViT-B-16 --device cuda --precision fp16 \\
        --batch-sizes 1 8 32 128 256 --json report.json                                   # GPU host
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from mmap_model import load_backbone
from service.engine.backends import TorchImageTower

Tower = Callable[[Tensor, Tensor | None], Tensor]


def sync() -> None:
    """Wait for the GPU: a CUDA forward returns once its kernels are queued, not run."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_round(tower: Tower, images: Tensor, prompts: Tensor | None, min_round_s: float, single_s: float) -> float:
    """Seconds per forward, averaged over enough forwards to last `min_round_s` (the GPU's work included)."""
    iters = max(1, math.ceil(min_round_s / max(single_s, 1e-6)))
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        tower(images, prompts)
    sync()
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--depth", type=int, default=9, help="J (clamped to the tower's depth)")
    parser.add_argument("--tokens", type=int, default=4, help="m; 0 = unprompted")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads of both backends")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min-round-s", type=float, default=0.5)
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"],
                        choices=["torch", "onnx", "torch-graphs", "torch-compile"],
                        help="torch-graphs = the torch backend with cuda_graphs (CUDA); torch-compile = with "
                             "torch_compile=reduce-overhead (CUDA); both prepare the measured batch sizes only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, None, args.device, args.precision, seed=0)
    depth = min(args.depth, backbone.widths.layers_v) if args.tokens else 0
    towers: dict[str, Tower] = {}
    for name in args.backends:
        if name == "torch":
            towers[name] = TorchImageTower(backbone)
        elif name in ("torch-graphs", "torch-compile"):
            towers[name] = TorchImageTower(backbone, "reduce-overhead" if name == "torch-compile" else "off",
                                           max(args.batch_sizes), cuda_graphs=name == "torch-graphs")
            towers[name].buckets = sorted(args.batch_sizes)  # every size runs unpadded; no other is prepared
        else:
            from service.engine.onnx.backend import OnnxImageTower

            start = time.perf_counter()
            towers[name] = OnnxImageTower(backbone, cache_dir=Path(tempfile.mkdtemp(prefix="bench-onnx-")),
                                          threads=args.threads)
            towers[name](torch.zeros(1, 3, backbone.image_size, backbone.image_size),
                         None if not depth else torch.zeros(1, depth, args.tokens, backbone.widths.d_v,
                                                            device=backbone.device))
            print(f"onnx graph exported and opened in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    providers = {"onnx": towers["onnx"].provider} if "onnx" in towers else {}  # type: ignore[attr-defined]
    results = []
    generator = torch.Generator().manual_seed(1)
    for batch in args.batch_sizes:
        images = torch.randn(batch, 3, backbone.image_size, backbone.image_size, generator=generator)
        prompts = None if not depth else (torch.randn(batch, depth, args.tokens, backbone.widths.d_v,
                                                      generator=generator)
                                          * 0.02).to(backbone.device)
        single: dict[str, float] = {}
        outputs: dict[str, Tensor] = {}
        for name, tower in towers.items():  # warm-up (compiles, allocator, ORT arena) and the single-call time
            outputs[name] = tower(images, prompts).clone()  # a compiled tower's output lives in its graph's memory
            sync()
            start = time.perf_counter()
            tower(images, prompts)
            sync()
            single[name] = time.perf_counter() - start
        rounds: dict[str, list[float]] = {name: [] for name in towers}
        for _ in range(args.repeats):
            for name, tower in towers.items():
                rounds[name].append(timed_round(tower, images, prompts, args.min_round_s, single[name]))
        reference = outputs[next(iter(towers))]
        row = {"batch": batch}
        for name in towers:
            seconds = statistics.median(rounds[name])
            row[name] = {"ms_per_batch": 1000 * seconds, "images_per_s": batch / seconds,
                         "max_abs_diff_vs_first": float((outputs[name] - reference).abs().max())}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    env = {"model": args.model, "device": args.device, "precision": args.precision, "depth": depth,
           "tokens": args.tokens, "threads": args.threads, "cpu_count": os.cpu_count(),
           "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__, "python": platform.python_version(),
           "onnx_provider": providers.get("onnx"),
           "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    if "onnx" in towers:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    print(f"{args.model} {args.device}/{args.precision}, J={depth} m={args.tokens}, {args.threads} threads, "
          f"torch {env['torch']}, onnxruntime {env.get('onnxruntime', '-')} ({env['onnx_provider'] or '-'}), "
          f"load average {env['load_avg_1m']:.1f} on {env['cpu_count']} CPUs")
    names = list(towers)
    header = " | ".join(f"{n} img/s" for n in names)
    ratio = len(names) > 1
    print(f"| batch | {header} |{' ' + names[1] + ' / ' + names[0] + ' |' if ratio else ''}")
    print("|---:|" + "---:|" * (len(names) + ratio))
    for row in results:
        cells = " | ".join(f"{row[n]['images_per_s']:.1f}" for n in names)
        extra = f" {row[names[1]]['images_per_s'] / row[names[0]]['images_per_s']:.2f}x |" if ratio else ""
        print(f"| {row['batch']} | {cells} |{extra}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))


if __name__ == "__main__":
    main()
