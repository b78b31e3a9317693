"""Issue 20 lever pilot: does the DDPM see a dark, low-contrast category (tire: mean -0.85, sd 0.10 in [-1, 1])
better when its images are stretched? Writes a copy of the shared data's ``--category`` with every photo (train and
test) mapped per channel by one affine rule fitted on ``train/good``: the channel's mean to ``--target_mean`` and its
standard deviation to ``--target_std`` (0-255 units), clipped to 0-255 (0.7% of tire's values clip). Masks, licence
and readme files are copied as they are; ``textures`` (the synthetic defects' source) is linked. The bench then runs
on the copy, with the same seeds and splits (the file names are unchanged)::

    python benchmarks/probe_contrast.py --category tire --out /tmp/contrast
    DIFFAD_BENCH_DATA=/tmp/contrast python benchmarks/bench_quality.py --categories tire --seeds 0 \\
        --out bench_output/quality_contrast --peer none

Validation's synthetic defects are then drawn on the stretched photos, so validation compares two different sets;
the test split's real defects are the same. A pilot on one category: a library rule (stored in the model, fitted by
``diffad train``) would have to be chosen on validation in all five.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from diffad.data import read_image
from harness import REAL_CATEGORIES, SHARED_DATA


def stretch(src: Path, dst: Path, target_mean: float, target_std: float) -> float:
    """Write the stretched copy of category folder ``src`` to ``dst``; returns the share of values clipped."""
    train = sorted((src / "train" / "good").glob("*.png"))
    if not train:
        raise SystemExit(f"{src}/train/good holds no PNG photos")
    values = np.stack([np.asarray(read_image(f), dtype=np.float64) for f in train])
    mean, std = values.mean(axis=(0, 1, 2)), values.std(axis=(0, 1, 2))
    clipped = total = 0
    for path in sorted(src.rglob("*")):
        out = dst / path.relative_to(src)
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() != ".png" or "ground_truth" in path.parts:
            shutil.copy2(path, out)
            continue
        y = (np.asarray(read_image(path), dtype=np.float64) - mean) * (target_std / std) + target_mean
        clipped += int(((y < 0) | (y > 255)).sum())
        total += y.size
        Image.fromarray(np.clip(np.round(y), 0, 255).astype(np.uint8)).save(out)
    print(f"{src.name}: mean {np.round(mean, 2)}, sd {np.round(std, 2)} (0-255) -> {target_mean:g}, {target_std:g}; "
          f"{clipped / max(total, 1):.2%} of values clipped")
    return clipped / max(total, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--category", default="tire", choices=sorted(REAL_CATEGORIES))
    p.add_argument("--out", type=Path, required=True, help="the copy's root (DIFFAD_BENCH_DATA for the bench)")
    p.add_argument("--target_mean", type=float, default=96.0)
    p.add_argument("--target_std", type=float, default=32.0)
    a = p.parse_args()
    root = REAL_CATEGORIES[a.category]
    stretch(root / a.category, a.out / root.relative_to(SHARED_DATA) / a.category, a.target_mean, a.target_std)
    textures = a.out / "textures"
    if not textures.exists():
        os.symlink(SHARED_DATA / "textures", textures)


if __name__ == "__main__":
    main()
