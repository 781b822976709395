"""Writing the dataset as an ImageFolder tree per domain, and its command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..configs import HelpFormatter
from .classes import CLASSES, class_folder
from .domains import DOMAINS
from .render import _check, image

# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------


def write_tree(out: Path, per_class: int, size: int = 64, domains: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Write ``out/<domain>/<class_folder>/<index:05d>.png`` for every domain x class.

    PNG is lossless, so reading a file back gives exactly ``image(c, d, index, seed, size)``.
    Returns a JSON-serialisable summary.
    """
    domains = list(DOMAINS) if domains is None else list(domains)
    for d in domains:
        _check(0, d)
    out = Path(out)
    counts: dict[str, int] = {}
    for d in domains:
        for ci, name in enumerate(CLASSES):
            folder = out / d / class_folder(name)
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                # Low zlib level: faster than the default, and PNG stays lossless.
                Image.fromarray(image(ci, d, index, seed, size)).save(folder / f"{index:05d}.png", compress_level=1)
        counts[d] = per_class * len(CLASSES)
    return {
        "out": str(out),
        "seed": seed,
        "size": size,
        "per_class": per_class,
        "num_classes": len(CLASSES),
        "domains": counts,
        "total": sum(counts.values()),
    }


def _domain_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DOMAINS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown domain(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(DOMAINS)}"
        )
    return names


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point: write an ImageFolder tree and print its summary as JSON."""
    parser = argparse.ArgumentParser(prog="python -m training.synthetic",
                                     description="Write the procedural multi-domain dataset as ImageFolder trees.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--per-class", type=int, required=True, help="images per class and domain")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument(
        "--domains", type=_domain_list, default=None, help=f"comma-separated subset of: {','.join(DOMAINS)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.size < 8 or args.seed < 0:
        parser.error("--per-class must be >= 1, --size >= 8 and --seed >= 0")
    summary = write_tree(args.out, args.per_class, args.size, args.domains, args.seed)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
