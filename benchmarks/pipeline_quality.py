"""Quality of the pipeline's variants, to choose defaults on VALIDATION data and to compare methods on test data.

``--split validation`` (choosing defaults): half of the validation split (normal images) calibrates the pipeline;
the other half is scored twice, as is and with a DRAEM-style synthetic defect (``diffad.make_anomaly``, textures from
``--textures``), so every lever is judged without touching the test split. ``--split test``: calibrate on the whole
validation split, score the real test split (the thesis's comparison: ``self_aware`` against ``denoise``).

Every variant runs with the same per-image noise seeds; ``--seeds`` repeats the whole run with other noise seeds
(FINDINGS: one seed moves image AUROC by up to 0.03 at this scale).

Example::

    OMP_NUM_THREADS=1 python benchmarks/pipeline_quality.py --data_dir ../shared/data/mvtec_subset --category bottle \
        --model /tmp/bottle64 --resolution 64 --split validation --output quality_bottle_val.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from diffad.data import load_mvtec
from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline, multiscale_anomaly_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import auroc, run_path, split_tensors  # noqa: E402

logger = logging.getLogger("pipeline_quality")

#: name -> pipeline call arguments. "fast" is the default; each other fast_* variant changes one lever. A
#: ``"calibrate"`` entry holds ``pipe.calibrate`` arguments (the mask levers and ``percentile`` belong to the
#: calibration): the pipeline is recalibrated on the same images and seed for that variant.
VARIANTS: Dict[str, Dict[str, Any]] = {
    "reference": dict(mode="reference"),
    "reference_fresh": dict(mode="reference", renoise="fresh"),
    "fast": dict(mode="fast"),
    "fast_fresh": dict(mode="fast", renoise="fresh"),
    "fast_resample1": dict(mode="fast", resample_steps=1),
    "fast_resample3": dict(mode="fast", resample_steps=3),
    "fast_steps5": dict(mode="fast", num_inpaint_steps=5),
    "fast_steps20x1": dict(mode="fast", num_inpaint_steps=20, resample_steps=1),
    "fast_steps7x3": dict(mode="fast", num_inpaint_steps=7, resample_steps=3),
    "fast_steps7x3_fresh": dict(mode="fast", num_inpaint_steps=7, resample_steps=3, renoise="fresh"),
    "fast_mask1": dict(mode="fast", num_mask_timesteps=1),
    "fast_selfcond_zeros": dict(mode="fast", self_condition_init="zeros"),
    # mask levers (the calibration's; thesis values 1/1/1): filter Q, several noise draws, dilate the mask
    "fast_mask_raw": dict(mode="fast", calibrate=dict(mask_filter_size=1, mask_noise_draws=1, mask_dilation=1)),
    "fast_mfilter3": dict(mode="fast", calibrate=dict(mask_filter_size=3, mask_noise_draws=1, mask_dilation=1)),
    "fast_mfilter5": dict(mode="fast", calibrate=dict(mask_filter_size=5, mask_noise_draws=1, mask_dilation=1)),
    "fast_mfilter9": dict(mode="fast", calibrate=dict(mask_filter_size=9, mask_noise_draws=1, mask_dilation=1)),
    "fast_mfilter5_p90": dict(mode="fast", calibrate=dict(mask_filter_size=5, mask_noise_draws=1, mask_dilation=1,
                                                          percentile=0.9)),
    "fast_draws3_t1": dict(mode="fast", num_mask_timesteps=1,
                           calibrate=dict(mask_filter_size=1, mask_noise_draws=3, mask_dilation=1)),
    "fast_draws3_t1_mfilter5": dict(mode="fast", num_mask_timesteps=1,
                                    calibrate=dict(mask_filter_size=5, mask_noise_draws=3, mask_dilation=1)),
    "fast_p90": dict(mode="fast", calibrate=dict(mask_filter_size=1, mask_noise_draws=1, mask_dilation=1,
                                                 percentile=0.9)),
    "fast_draws3_t1_p90": dict(mode="fast", num_mask_timesteps=1,
                               calibrate=dict(mask_filter_size=1, mask_noise_draws=3, mask_dilation=1, percentile=0.9)),
    "fast_draws2_t1": dict(mode="fast", num_mask_timesteps=1,
                           calibrate=dict(mask_filter_size=1, mask_noise_draws=2, mask_dilation=1)),
    "fast_dilate3": dict(mode="fast", calibrate=dict(mask_filter_size=1, mask_noise_draws=1, mask_dilation=3)),
    "fast_mfilter5_dilate3": dict(mode="fast", calibrate=dict(mask_filter_size=5, mask_noise_draws=1,
                                                              mask_dilation=3)),
    "fast_mfilter5_p90_dilate5": dict(mode="fast", calibrate=dict(mask_filter_size=5, mask_noise_draws=1,
                                                                  mask_dilation=5, percentile=0.9)),
    "denoise_reference": dict(method="denoise", mode="reference"),
    "denoise_fast": dict(method="denoise", mode="fast"),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--category", default=None)
    p.add_argument("--model", required=True, help="Trained pipeline folder.")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--split", choices=("validation", "test"), default="validation")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, from {', '.join(VARIANTS)}.")
    p.add_argument("--textures", default=None, help="Texture folder for synthetic defects (default: built-in).")
    p.add_argument("--max_images", type=int, default=None, help="Score at most this many images (stratified).")
    p.add_argument("--mean_filter_sizes", default=None,
                   help="Comma-separated odd sizes to report (the same reconstructions re-mapped; default: the "
                   "calibrated one).")
    p.add_argument("--seeds", default="0", help="Comma-separated noise seeds.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="pipeline_quality.json")
    return p.parse_args(argv)


def validation_set(data, resolution: int, textures: Optional[str], seed: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Split validation in two: calibration images, and a scored set of normal + synthetic-defect images."""
    from diffad.anomalies import make_anomaly

    val, _, _ = split_tensors(data["validation"], resolution, None, seed)
    half = val.shape[0] // 2
    calib, held = val[:half], val[half:]
    g = torch.Generator().manual_seed(seed)
    defective, masks = [], []
    for img in held:
        for _ in range(20):  # half of the draws stay normal: draw until a defect appears
            anomalous, mask = make_anomaly(img, textures=textures, generator=g)
            if mask.sum() > 0:
                break
        defective.append(anomalous)
        masks.append(mask[0].numpy() > 0.5)
    images = torch.cat([held, torch.stack(defective)])
    gt = np.concatenate([np.zeros((len(held),) + tuple(held.shape[-2:]), dtype=bool), np.stack(masks)])
    labels = np.array([0] * len(held) + [1] * len(held))
    return calib, images, gt, labels


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = SelfAwareInpaintPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    data = load_mvtec(args.data_dir, args.category, resolution=args.resolution)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.split == "validation":
        calib, images, gt, labels = validation_set(data, args.resolution, args.textures, seeds[0])
    else:
        calib, _, _ = split_tensors(data["validation"], args.resolution, None, seeds[0])
        images, gt, labels = split_tensors(data["test"], args.resolution, args.max_images, seeds[0])
    if args.max_images is not None and args.split == "validation" and len(images) > args.max_images:
        keep = np.r_[0:args.max_images // 2, len(images) // 2:len(images) // 2 + args.max_images // 2]
        images, gt, labels = images[keep], gt[keep], labels[keep]
    logger.info("calibrating on %d images; scoring %d (%d defective)", len(calib), len(images), int(labels.sum()))
    calibrated: Optional[Dict[str, Any]] = None

    def calibrate(cal_args: Dict[str, Any], mode: str) -> None:
        nonlocal calibrated
        key = {"mode": mode, **cal_args}
        if key != calibrated:  # Q_p depends on the mask levers: refit on the same images with the same seed
            pipe.calibrate(calib, methods=(), mode=mode, generator=torch.Generator().manual_seed(seeds[0]), **cal_args)
            calibrated = key

    calibrate({}, "fast")
    filters = ([int(s) for s in args.mean_filter_sizes.split(",")] if args.mean_filter_sizes
               else [int(pipe.calibration.config.mean_filter_size)])
    results: Dict[str, Any] = {"split": args.split, "category": args.category, "model": str(args.model),
                               "num_images": int(len(images)), "num_defective": int(labels.sum()),
                               "seeds": seeds, "variants": {}}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        call = dict(VARIANTS[name])
        cal_args = call.pop("calibrate", {})
        calibrate(cal_args, call.get("mode", "fast"))
        per_filter: Dict[int, Dict[str, List[float]]] = {f: {"image_auroc": [], "pixel_auroc": []} for f in filters}
        seconds, passes, cover_normal, cover_defect, recall = [], [], [], [], []
        for seed in seeds:
            start = time.perf_counter()
            r = run_path(pipe, images, seed=seed * 1000, **call)
            seconds.append((time.perf_counter() - start) / len(images))
            passes.append(statistics.fmean(r["passes"]))
            m = r["masks"]
            cover_normal.append(float(m[labels == 0].mean()))
            cover_defect.append(float(m[labels == 1].mean()))
            recall.append(float(m[gt].mean()) if gt.any() and m.any() else 0.0)
            for f in filters:  # the same reconstructions, re-mapped with each filter size
                maps = multiscale_anomaly_map(images, r["reconstructions"], mean_filter_size=f).numpy()
                scores = maps.reshape(len(maps), -1).max(1)
                per_filter[f]["image_auroc"].append(auroc(labels, scores))
                per_filter[f]["pixel_auroc"].append(auroc(gt.reshape(-1).astype(int), maps.reshape(-1)))
        entry = {"call": VARIANTS[name], "mask_levers": {k: pipe.calibration.config[k] for k in
                                                        ("percentile", "mask_filter_size", "mask_noise_draws",
                                                         "mask_dilation")},
                 "seconds_per_image": statistics.fmean(seconds),
                 "unet_passes_per_image": statistics.fmean(passes),
                 "mask_cover_normal": statistics.fmean(cover_normal), "mask_cover_defective": statistics.fmean(cover_defect),
                 "mask_recall_of_defect_pixels": statistics.fmean(recall)}
        for f in filters:
            entry[f"filter{f}"] = {k: {"mean": statistics.fmean(v), "per_seed": v} for k, v in per_filter[f].items()}
        results["variants"][name] = entry
        logger.info("%s: %s", name, json.dumps(entry))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| variant | passes | s/image | mask cover normal/defective, defect recall | " + " | ".join(f"img AUROC f{f} | px AUROC f{f}" for f in filters) + " |",
             "|---|---|---|---|" + "---|---|" * len(filters)]
    for name, e in results["variants"].items():
        cells = " | ".join(f"{e[f'filter{f}']['image_auroc']['mean']:.3f} | {e[f'filter{f}']['pixel_auroc']['mean']:.3f}"
                           for f in filters)
        cover = f"{e['mask_cover_normal']:.2f}/{e['mask_cover_defective']:.2f}, {e['mask_recall_of_defect_pixels']:.2f}"
        lines.append(f"| {name} | {e['unet_passes_per_image']:.1f} | {e['seconds_per_image']:.2f} | {cover} | {cells} |")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
