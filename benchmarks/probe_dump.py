"""Issue 20 levers, step 1: run the default sampler ONCE per image on a bench cell's DDPM and keep what every map
is made of (image, noise error ``Q``, reconstruction), so map, score and head variants are compared offline on the
same noise. Written per category to ``<out>/<category>.pt`` (float16):

* ``calib``: the validation split's even positions (what ``bench_quality``'s validation calibrates on);
* ``val``: its odd positions, as they are and with one synthetic defect each (:func:`bench_quality.validation_set`);
* ``train``: training images with synthetic defects (every kind in turn, other seeds than validation's): what a
  learned head would be trained on;
* ``test``: the test split (read only by the final comparison, never to choose).

Resumable: a category whose file exists is skipped. One thread per process::

    OMP_NUM_THREADS=1 python benchmarks/probe_dump.py --categories bottle,tire --out bench_output/probe
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CATEGORIES, SHARED, validation_set  # noqa: E402

from diffad.data import images_to_tensor, load_mvtec  # noqa: E402
from diffad.defects import DEFECT_KINDS, DefectSynthesizer  # noqa: E402
from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline  # noqa: E402
from diffad.pipelines.self_aware_inpaint.pipeline import COMBINED_MAPS, threshold_key  # noqa: E402
from diffad.pipelines.self_aware_inpaint import image_generator  # noqa: E402


@torch.no_grad()
def run(pipe, x, config, seed, q_p=None, dtype=torch.float16):
    """Q and the reconstruction of ``x`` in batches of 8 (each image's noise from its own generator), masked with
    ``q_p`` (None: the pipeline's calibrated one), as ``dtype``."""
    qs, recs = [], []
    q_p = pipe.calibration.q_threshold if q_p is None else q_p
    for i in range(0, x.shape[0], 8):
        xb = x[i:i + 8]
        gens = [image_generator(seed, im) for im in xb]
        with pipe._autocast(config):
            q = pipe._noise_error(xb, config, gens)
            part = pipe._inspect(xb, q, q_p.expand_as(q), "self_aware", config, gens)
        qs.append(q.to(dtype))
        recs.append(part["recs"].to(dtype))
    return torch.cat(qs), torch.cat(recs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--categories", default=",".join(CATEGORIES))
    parser.add_argument("--cells", default="bench_output/quality")
    parser.add_argument("--out", default="bench_output/probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_images", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for category in args.categories.split(","):
        target = out / f"{category}.pt"
        if target.is_file():
            continue
        t0 = time.time()
        pipe = SelfAwareInpaintPipeline.from_pretrained(Path(args.cells) / category / f"seed{args.seed}" / "models"
                                                        / category)
        pipe.set_progress_bar_config(disable=True)
        config = dataclasses.replace(SamplingConfig.fast(), precision="bf16")
        calib, images, masks, labels, kinds = validation_set(category, args.seed, pipe.resolution)
        print('pipe.calibrate(', time.time() - t0, flush=True)
        pipe.calibrate(calib, config=config, generator=[image_generator(args.seed, im) for im in calib],
                       batch_size=16, methods=("self_aware",))
        data = {"q_p": pipe.calibration.q_threshold.clone(),
                "thresholds": {n: pipe.calibration.threshold(threshold_key("self_aware", n)) for n in COMBINED_MAPS}}
        print('q, rec = run(pipe, calib', time.time() - t0, flush=True)
        q, rec = run(pipe, calib, config, args.seed)
        data["calib"] = {"x": calib.half(), "q": q, "rec": rec}
        print('q, rec = run(pipe, images', time.time() - t0, flush=True)
        q, rec = run(pipe, images, config, args.seed)
        data["val"] = {"x": images.half(), "q": q, "rec": rec, "mask": torch.from_numpy(masks),
                       "label": torch.from_numpy(labels), "kind": kinds}
        print('ds = load_mvtec', time.time() - t0, flush=True)
        ds = load_mvtec(CATEGORIES[category], category, resolution=pipe.resolution, seed=args.seed)
        train = images_to_tensor([row["image"] for row in ds["train"]], pipe.resolution)
        g = np.random.default_rng(1000 + args.seed)
        train = train[torch.from_numpy(g.permutation(len(train))[:args.train_images])]
        synth = DefectSynthesizer(textures=SHARED / "textures")
        pairs = [synth(im, kind=DEFECT_KINDS[i % len(DEFECT_KINDS)], generator=777_000 + i)
                 for i, im in enumerate(train)]
        print('tx = torch.stack', time.time() - t0, flush=True)
        tx = torch.stack([a for a, _ in pairs])
        q, rec = run(pipe, tx, config, args.seed)
        data["train"] = {"x": tx.half(), "q": q, "rec": rec, "mask": torch.stack([m[0] > 0.5 for _, m in pairs]),
                         "clean": train.half()}
        print('test = ds["test"]', time.time() - t0, flush=True)
        test = ds["test"]
        x = images_to_tensor([row["image"] for row in test], pipe.resolution)
        tm = np.stack([np.asarray(row["mask"].resize((pipe.resolution,) * 2, 0)) > 0 for row in test])
        q, rec = run(pipe, x, config, args.seed)
        data["test"] = {"x": x.half(), "q": q, "rec": rec, "mask": torch.from_numpy(tm),
                        "label": torch.tensor([row["label"] for row in test]),
                        "kind": [row["defect_type"] for row in test]}
        torch.save(data, str(target) + ".tmp")
        Path(str(target) + ".tmp").rename(target)
        print(f"{category}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
