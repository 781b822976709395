"""How much a busy Python thread slows the image tower's forward: `python bench/gil_convoy.py [--model mmap-tiny]`.

The service runs the forward on its inference thread while the event loop (HTTP) and the decode
threads also need the GIL. An eager forward hands the GIL back and takes it again around every op
(hundreds per forward); when another thread holds it, each take waits up to the interpreter's switch
interval (`sys.setswitchinterval`, 5 ms by default). A forward made of many short ops (a GPU forward,
whose ops are asynchronous launches, or a tiny model on the CPU) then slows by orders of magnitude.
Here one thread spins in pure Python (the worst case) while the forward is timed in another thread,
for the torch backend eager and compiled and for the onnx backend (one onnxruntime call per forward).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from mmap_model import load_backbone
from service.engine.backends import TorchImageTower


def median_ms(tower, images, prompts, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        tower(images, prompts)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def contended_ms(tower, images, prompts, n: int, interval_s: float) -> float:
    """The forward timed on its own thread while another thread spins in Python."""
    stop, result = threading.Event(), []

    def spin():
        while not stop.is_set():
            pass

    default = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        worker = threading.Thread(target=lambda: result.append(median_ms(tower, images, prompts, n)))
        worker.start()
        worker.join()
    finally:
        stop.set()
        spinner.join()
        sys.setswitchinterval(default)
    return result[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mmap-tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--forwards", type=int, default=20, help="timed forwards per cell (median)")
    parser.add_argument("--intervals-ms", type=float, nargs="+", default=[5.0, 1.0, 0.2])
    parser.add_argument("--backends", nargs="+", default=["eager", "compile", "onnx"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, None, seed=0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, backbone.image_size, backbone.image_size, generator=generator)
    prompts = torch.randn(args.batch, min(9, backbone.widths.layers_v), 4, backbone.widths.d_v,
                          generator=generator) * 0.04
    print(f"{args.model} cpu, batch {args.batch}, {args.threads} torch thread(s), torch {torch.__version__}; "
          f"median of {args.forwards} forwards\n")
    print("| backend | alone | " + " | ".join(f"busy thread, switch {i:g} ms" for i in args.intervals_ms) + " |")
    print("|---|---:|" + "---:|" * len(args.intervals_ms))
    rows = []
    for name in args.backends:
        if name == "onnx":
            from service.engine.onnx.backend import OnnxImageTower

            tower = OnnxImageTower(backbone, cache_dir=tempfile.mkdtemp())
        else:
            tower = TorchImageTower(backbone, "off" if name == "eager" else "default", args.batch)
        with torch.inference_mode():
            median_ms(tower, images, prompts, 3)  # first-call costs (a compile, a session) untimed
            cells = [median_ms(tower, images, prompts, args.forwards)]
            cells += [contended_ms(tower, images, prompts, args.forwards, i / 1000) for i in args.intervals_ms]
        print(f"| {name} | " + " | ".join(f"{c:.1f} ms" for c in cells) + " |", flush=True)
        rows.append({"backend": name, "alone_ms": cells[0],
                     "busy_ms": dict(zip(map(str, args.intervals_ms), cells[1:], strict=True))})
    if args.json:
        args.json.write_text(json.dumps({"command": shlex.join(["python", *sys.argv]), "model": args.model,
                                         "batch": args.batch, "threads": args.threads, "torch": torch.__version__,
                                         "forwards": args.forwards, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
