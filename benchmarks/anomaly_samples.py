"""Save a 4 x 4 grid of DRAEM synthetic anomalies (each cell: anomalous image | mask) as a PNG, to eyeball.

Uses the real MVTec AD bottle images (../shared/data/mvtec_subset/bottle/train/good) and the
DTD textures (../shared/data/textures) when present, else the embedded synthetic dataset and
the built-in procedural textures.

    python benchmarks/anomaly_samples.py [--out bench_output/anomaly_samples.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffad.anomalies import AnomalySynthesizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
logger = logging.getLogger("anomaly_samples")


def _normal_images(resolution: int, count: int, workdir: Path) -> tuple[list[Path], str]:
    real = SHARED / "mvtec_subset" / "bottle" / "train" / "good"
    if real.is_dir():
        return sorted(real.glob("*.png"))[:count], f"real MVTec AD bottle ({real})"
    from diffad.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(workdir, seed=0, resolution=resolution, num_train=count,
                                  num_test_good=1, num_test_defect_per_type=1)
    files = sorted(Path(root).glob("*/train/good/*.png"))[:count]
    return files, f"synthetic default ({root})"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_output" / "anomaly_samples.png")
    parser.add_argument("--resolution", type=int, default=128, help="side of each sample in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--textures", type=str, default=None,
                        help="texture folder; default ../shared/data/textures if present, else procedural")
    parser.add_argument("--procedural", action="store_true", help="use the built-in procedural textures")
    parser.add_argument("--normal-probability", type=float, default=0.0,
                        help="share of samples left normal (training uses 0.5; 0 shows 16 anomalies)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    textures = None if args.procedural else (args.textures or (str(SHARED / "textures")
                                                                 if (SHARED / "textures").is_dir() else None))
    synth = AnomalySynthesizer(textures, normal_probability=args.normal_probability)
    r, gap = args.resolution, 4
    grid = Image.new("RGB", (4 * (2 * r + gap) + 3 * gap, 4 * r + 3 * gap), (255, 255, 255))
    with tempfile.TemporaryDirectory() as tmp:
        files, source = _normal_images(r, 16, Path(tmp))
        generator = torch.Generator().manual_seed(args.seed)
        for k in range(16):
            src = files[k % len(files)]
            with Image.open(src) as im:
                arr = np.asarray(im.convert("RGB").resize((r, r), Image.BILINEAR), dtype=np.float32)
            image = torch.from_numpy(arr / 127.5 - 1.0).permute(2, 0, 1)
            anomalous, mask = synth(image, generator=generator)
            a = ((anomalous.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            m = (mask[0].numpy() * 255).astype(np.uint8)
            x, y = (k % 4) * (2 * r + 2 * gap), (k // 4) * (r + gap)
            grid.paste(Image.fromarray(a), (x, y))
            grid.paste(Image.fromarray(m).convert("RGB"), (x + r, y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    logger.info("16 samples from %s, textures %s -> %s", source, textures or "procedural", args.out)
    return args.out


if __name__ == "__main__":
    main()
