"""Upload decoding + preprocessing throughput: `python bench/decode.py [--sizes 224 1024] [--devices cpu cuda]`.

Measures, in one run, the two ways the service can turn a JPEG upload into the image tower's input:
- cpu: decode=worker, a worker's path (`service.http.uploads.Preprocessor`: Pillow with its checks, resize
  and crop to uint8) then the engine's normalisation, on a thread pool of each of `--workers` sizes,
  as a worker's decode pool runs it;
- tensor: decode=engine, the engine's path (`service.engine.device_decode.DeviceDecoder`: torchvision's
  batched `decode_jpeg`, libjpeg-turbo on the CPU, one thread; nvjpeg on CUDA; then the resize and
  crop on tensors) and the normalisation on that device, `--batch` uploads per call, the host->device
  copy of the bytes included; once per device in `--devices`.
Also reports how far the engine's uint8 pixels are from the workers', in 8-bit levels: the GPU
decoder's IDCT and the tensor resize are not Pillow's, so the two cannot be identical.
Synthetic photos (bench/uploads.py), the same generator as bench/load.py's uploads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torchvision
from uploads import synthetic_jpegs

from mmap_model import load_backbone
from service.engine.backends import PixelNormalizer
from service.engine.device_decode import DeviceDecoder
from service.http.uploads import Preprocessor

MAX_PIXELS = 64_000_000


class TensorPath:
    """The engine's decode=engine path: `DeviceDecoder` on a device, then the on-device normalisation."""

    def __init__(self, cfg: dict, device: torch.device):
        self.device = device
        self.decode = DeviceDecoder(cfg, device)
        self.normalize = PixelNormalizer(device, cfg["mean"], cfg["std"])

    def __call__(self, jpegs: list[bytes]) -> torch.Tensor:
        return self.normalize(torch.stack(self.decode(jpegs)))


def cpu_rate(prepare, jpegs: list[bytes], workers: int, repeats: int) -> float:
    rates = []
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(prepare, jpegs[:workers]))  # threads started, first-call costs paid
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(prepare, jpegs))
            rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def tensor_rate(prepare: TensorPath, jpegs: list[bytes], batch: int, repeats: int) -> float:
    def sync():
        if prepare.device.type == "cuda":
            torch.cuda.synchronize(prepare.device)

    prepare(jpegs[:batch])
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(jpegs), batch):
            prepare(jpegs[i:i + batch])
        sync()
        rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="whose preprocessing (size, mean, std, interpolation)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 1024], help="upload heights (width = 4/3 x)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=sorted({1, 4, os.cpu_count() or 1}))
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    cfg = load_backbone(args.model, None).preprocess_cfg
    paths = {d: TensorPath(cfg, torch.device(d)) for d in args.devices}
    pillow = Preprocessor(cfg, MAX_PIXELS)
    normalize = PixelNormalizer(torch.device("cpu"), cfg["mean"], cfg["std"])

    def cpu_prepare(data: bytes) -> torch.Tensor:  # a worker's decode, then the engine's normalisation
        return normalize(torch.from_numpy(pillow(data)[None].copy()))[0]  # (Pillow's array is read-only)

    gpu = torch.cuda.get_device_name() if "cuda" in args.devices else None
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} cores"
          f"{', ' + gpu if gpu else ''}; {args.images} JPEGs per size, median of {args.repeats}\n")
    print("| upload | decode=worker: Pillow, a worker's threads | "
          + " | ".join(f"decode=engine on {d} | max / mean |Δ| vs Pillow (levels)" for d in paths) + " |")
    print("|" + " --- |" * (2 + 2 * len(paths)))
    results = []
    for size in args.sizes:
        jpegs = synthetic_jpegs(args.images, size, size * 4 // 3)  # landscape: the centre crop has work
        kib = statistics.mean(len(j) for j in jpegs) / 1024
        cpu = {w: cpu_rate(cpu_prepare, jpegs, w, args.repeats) for w in args.workers}
        reference = np.stack([pillow(j) for j in jpegs[:16]]).astype(int)  # the workers' uint8 pixels
        row = {"height": size, "width": size * 4 // 3, "kib": kib, "service_img_s": cpu}
        cells = [f"{size * 4 // 3}x{size} JPEG, {kib:.0f} KiB",
                 ", ".join(f"{r:,.0f} img/s ({w} thr)" for w, r in cpu.items())]
        for d, path in paths.items():
            rates = {b: tensor_rate(path, jpegs, b, args.repeats) for b in args.batch}
            levels = np.abs(torch.stack(path.decode(jpegs[:16])).cpu().numpy().astype(int) - reference)
            row[d] = {"img_s": rates, "max_levels": int(levels.max()), "mean_levels": float(levels.mean())}
            cells += [", ".join(f"{r:,.0f} img/s (batch {b})" for b, r in rates.items()),
                      f"{row[d]['max_levels']:.1f} / {row[d]['mean_levels']:.2f}"]
        results.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "cores": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
