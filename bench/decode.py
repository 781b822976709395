"""Upload decoding + preprocessing throughput: `python bench/decode.py [--sizes 224 1024] [--devices cpu cuda]`.

Measures, in one run, the two ways a JPEG upload can become the image tower's input tensor:
- cpu: the service's path, `service.images.decode_image` (Pillow, with its checks) then open_clip's
  eval transform (`Backbone.preprocess`), on a thread pool of each of `--workers` sizes, as the
  service's decode pool runs it;
- tensor: torchvision's batched JPEG decoder (`torchvision.io.decode_jpeg`: libjpeg-turbo on the CPU,
  one thread; nvjpeg on CUDA) with the same resize (shortest side, bicubic, antialiased), centre crop
  and normalisation done on tensors on that device, `--batch` uploads per call, the host->device copy
  of the bytes included; once per device in `--devices`.
Also reports how far the tensor path's input is from the service's (Pillow) input, in 8-bit pixel
levels: the GPU decoder's IDCT and the tensor resize are not Pillow's, so the two cannot be identical.
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

import torch
import torchvision
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from uploads import synthetic_jpegs

from mmap_model import load_backbone
from service.images import decode_image

MAX_PIXELS = 64_000_000


class TensorPreprocess:
    """open_clip's eval transform (resize shortest side, centre crop, normalise) on decoded uint8 tensors."""

    def __init__(self, cfg: dict, device: torch.device):
        if cfg.get("resize_mode", "shortest") != "shortest":
            raise ValueError(f"only resize_mode 'shortest' is implemented here, not {cfg['resize_mode']!r}")
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
        self.mean = torch.tensor(cfg["mean"], device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=device).view(1, 3, 1, 1)
        self.device = device

    def __call__(self, jpegs: list[bytes]) -> Tensor:
        decoded = decode_jpeg([torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs],
                              mode=ImageReadMode.RGB, device=self.device)
        crops = [TF.center_crop(TF.resize(image, [self.size], self.interpolation, antialias=True), [self.size])
                 for image in decoded]
        return (torch.stack(crops).float() / 255 - self.mean) / self.std


def cpu_rate(prepare, jpegs: list[bytes], workers: int, repeats: int) -> float:
    rates = []
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(prepare, jpegs[:workers]))  # threads started, first-call costs paid
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(prepare, jpegs))
            rates.append(len(jpegs) / (time.perf_counter() - start))
    return statistics.median(rates)


def tensor_rate(prepare: TensorPreprocess, jpegs: list[bytes], batch: int, repeats: int) -> float:
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

    backbone = load_backbone(args.model, None)
    paths = {d: TensorPreprocess(backbone.model.visual.preprocess_cfg, torch.device(d)) for d in args.devices}

    def cpu_prepare(data: bytes) -> Tensor:
        return backbone.preprocess(decode_image(data, MAX_PIXELS))

    gpu = torch.cuda.get_device_name() if "cuda" in args.devices else None
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} cores"
          f"{', ' + gpu if gpu else ''}; {args.images} JPEGs per size, median of {args.repeats}\n")
    print("| upload | service path: Pillow + open_clip transform | "
          + " | ".join(f"decode_jpeg + tensor resize on {d} | max / mean |Δ| vs Pillow (levels)" for d in paths) + " |")
    print("|" + " --- |" * (2 + 2 * len(paths)))
    results = []
    for size in args.sizes:
        jpegs = synthetic_jpegs(args.images, size, size * 4 // 3)  # landscape: the centre crop has work
        kib = statistics.mean(len(j) for j in jpegs) / 1024
        cpu = {w: cpu_rate(cpu_prepare, jpegs, w, args.repeats) for w in args.workers}
        reference = torch.stack([cpu_prepare(j) for j in jpegs[:16]])
        row = {"height": size, "width": size * 4 // 3, "kib": kib, "service_img_s": cpu}
        cells = [f"{size * 4 // 3}x{size} JPEG, {kib:.0f} KiB",
                 ", ".join(f"{r:,.0f} img/s ({w} thr)" for w, r in cpu.items())]
        for d, path in paths.items():
            rates = {b: tensor_rate(path, jpegs, b, args.repeats) for b in args.batch}
            levels = (path(jpegs[:16]).cpu() - reference).abs() * path.std.cpu() * 255  # back to 8-bit pixel units
            row[d] = {"img_s": rates, "max_levels": levels.max().item(), "mean_levels": levels.mean().item()}
            cells += [", ".join(f"{r:,.0f} img/s (batch {b})" for b, r in rates.items()),
                      f"{row[d]['max_levels']:.1f} / {row[d]['mean_levels']:.2f}"]
        results.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "cores": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
