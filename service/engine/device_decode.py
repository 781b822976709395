"""JPEG uploads decoded by the engine, batched, on its device (`decode = "engine"`; nvjpeg on CUDA).

With `decode = "engine"` an HTTP worker checks a JPEG upload's header as always (format, pixel
count: `images.open_image`) and, if it is plain RGB or greyscale with no EXIF rotation, sends its
bytes instead of decoding it. The engine decodes the batch's JPEGs in one call of torchvision's
`decode_jpeg` on its device (nvjpeg on CUDA, libjpeg-turbo on the CPU) and then resizes and crops
each image there, as open_clip's eval transform does (torchvision's Resize of the short side, or
the squash to (H, W), then CenterCrop, antialiased). The result is the same uint8 [H, W, 3] the
workers' Pillow path gives, within the tolerance stated in docs/architecture.md ("Decoding on the
engine"): the decoders and resamplers are not Pillow's.

A file that cannot be decoded fails alone: when the batched call raises, each image is decoded on its
own, and on CUDA one that nvjpeg refuses is tried once more on the CPU before it is called corrupt. A
file without JPEG's end-of-image marker (cut short) is decoded on the CPU only, on its own.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

# torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; they are what this pins.
warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision.*")


def ends_whole(jpeg: bytes) -> bool:
    """The file ends with JPEG's end-of-image marker (trailing zero padding aside)."""
    return jpeg.rstrip(b"\0").endswith(b"\xff\xd9")


class UndecodableJpeg(Exception):
    """The decoders (every one tried) refused this file."""


class DeviceDecoder:
    """JPEG bytes -> uint8 [H, W, 3] at the model's input size, on `device`; `cfg`: open_clip's PreprocessCfg fields."""

    def __init__(self, cfg: dict[str, Any], device: torch.device):
        size = cfg["size"]
        self.height, self.width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.mode = cfg.get("resize_mode", "shortest")
        if self.mode not in ("shortest", "squash") or (self.mode == "shortest" and self.height != self.width):
            raise ValueError(f"the engine cannot preprocess resize_mode={self.mode!r} at size {size}")
        self.interpolation = InterpolationMode(cfg.get("interpolation", "bicubic"))
        self.device = torch.device(device)

    def __call__(self, jpegs: list[bytes]) -> list[Tensor | UndecodableJpeg]:
        """Each file's pixels [H, W, 3] uint8 on the device, or why it could not be decoded."""
        data = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]  # writable: no warning
        images: list[Tensor | UndecodableJpeg | None] = [None] * len(jpegs)
        # nvjpeg's hardware path may "decode" a file cut short without an error: such files (no end-of-image
        # marker) go to the CPU decoder, which refuses a truncated scan as Pillow does
        whole = [i for i, jpeg in enumerate(jpegs) if ends_whole(jpeg)]
        for i in sorted(set(range(len(jpegs))) - set(whole)):
            images[i] = self._decode_one(data[i], [torch.device("cpu")])
        if whole:
            if self.device.type == "cuda":  # nvjpeg writes on its own stream into memory taken on ours: let ours
                torch.cuda.current_stream(self.device).synchronize()  # finish what still reads such memory
            try:
                decoded = list(decode_jpeg([data[i] for i in whole], mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:  # one bad file fails the whole call: find it; on CUDA, what nvjpeg refuses
                devices = [self.device] + ([torch.device("cpu")] if self.device.type != "cpu" else [])
                decoded = [self._decode_one(data[i], devices) for i in whole]  # gets a second try on the CPU
            for i, image in zip(whole, decoded, strict=True):
                images[i] = image
        return [image if isinstance(image, UndecodableJpeg) else self.preprocess(image) for image in images]

    def _decode_one(self, data: Tensor, devices: list[torch.device]) -> Tensor | UndecodableJpeg:
        error: RuntimeError | None = None
        for device in devices:
            try:
                return decode_jpeg(data, mode=ImageReadMode.RGB, device=device).to(self.device)
            except RuntimeError as e:
                error = e
        return UndecodableJpeg(str(error).strip().splitlines()[-1])

    def preprocess(self, image: Tensor) -> Tensor:
        """uint8 [3, h, w] -> uint8 [H, W, 3]: torchvision's Resize (+ CenterCrop) as in open_clip's eval transform."""
        size = [self.height] if self.mode == "shortest" else [self.height, self.width]
        image = TF.resize(image, size, self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.height, self.width])
        return image.permute(1, 2, 0)
