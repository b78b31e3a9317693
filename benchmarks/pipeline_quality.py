"""Quality of the pipeline's variants, to choose defaults on VALIDATION data and to compare methods on test data.

``--split validation`` (choosing defaults): half of the validation split (normal images) calibrates the pipeline;
the other half is scored twice, as is and with a DRAEM-style synthetic defect (``diffad.make_anomaly``, textures from
``--textures``), so every lever is judged without touching the test split. ``--split test``: calibrate on the whole
validation split, score the real test split (the thesis's comparison: ``self_aware`` against ``denoise``).

Every variant runs with the same per-image noise seeds; ``--seeds`` repeats the whole run with other noise seeds
(one seed moves image AUROC by up to 0.03 at this scale).

Example::

    OMP_NUM_THREADS=1 python benchmarks/pipeline_quality.py --data_dir ../shared/data/mvtec_subset --category bottle \
        --model /tmp/bottle64 --resolution 64 --split validation --output quality_bottle_val.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from harness import auroc, run_path, split_tensors, validation_set

from diffad.anomalies import make_anomaly
from diffad.data import load_mvtec
from diffad.evaluation import mask_statistics
from diffad.pipelines.self_aware_inpaint import (
    SamplingConfig,
    SelfAwareInpaintPipeline,
    default_mean_filter_size,
    multiscale_anomaly_map,
)


logger = logging.getLogger("pipeline_quality")

FAST, THESIS = SamplingConfig.fast(), SamplingConfig.thesis()


#: diffad 0.2's default: self-aware inpainting, t = 300 x 3 draws + 10 steps x 2 resamplings (23 passes)
INPAINT23 = dataclasses.replace(FAST, mask_timesteps=(300,), reconstruction_steps=10, resample_steps=2,
                                reconstruction="inpaint")


def _inpaint(**changes: Any) -> SamplingConfig:
    return dataclasses.replace(INPAINT23, **changes)


#: name -> (method, sampling config). "fast" is the default (10 passes, denoising reconstruction); each inpaint*
#: variant changes one or two levers of diffad 0.2's inpainting default "inpaint23". A pipeline runs exactly the
#: config it was calibrated with, so each config is calibrated on the same images with the same seed before its
#: variant runs (Q_p depends on the mask levers).
VARIANTS: Dict[str, Tuple[str, SamplingConfig]] = {
    "thesis": ("self_aware", THESIS),
    "thesis_fresh": ("self_aware", dataclasses.replace(THESIS, renoise="fresh")),
    "fast": ("self_aware", FAST),
    "inpaint23": ("self_aware", INPAINT23),
    "inpaint23_fixed": ("self_aware", _inpaint(renoise="fixed")),
    "inpaint23_resample1": ("self_aware", _inpaint(resample_steps=1)),
    "inpaint23_resample3": ("self_aware", _inpaint(resample_steps=3)),
    "inpaint23_steps5": ("self_aware", _inpaint(reconstruction_steps=5)),
    "inpaint23_steps20x1": ("self_aware", _inpaint(reconstruction_steps=20, resample_steps=1)),
    "inpaint23_steps7x3": ("self_aware", _inpaint(reconstruction_steps=7, resample_steps=3)),
    "inpaint23_steps7x3_fixed": ("self_aware", _inpaint(reconstruction_steps=7, resample_steps=3, renoise="fixed")),
    # mask levers: noise draws and timesteps of Q, the percentile p of Q_p
    "inpaint23_draws1": ("self_aware", _inpaint(mask_noise_draws=1)),
    "inpaint23_draws2": ("self_aware", _inpaint(mask_noise_draws=2)),
    "inpaint23_draws1_t3": ("self_aware", _inpaint(mask_timesteps=(300, 325, 350), mask_noise_draws=1)),
    "inpaint23_thesis_mask": ("self_aware", _inpaint(mask_timesteps=THESIS.mask_timesteps, mask_noise_draws=1)),
    "inpaint23_p70": ("self_aware", _inpaint(mask_percentile=0.7)),
    "inpaint23_p90": ("self_aware", _inpaint(mask_percentile=0.9)),
    # at most 10 UNet passes per image (issue 12's budget)
    "inpaint10": ("self_aware", _inpaint(reconstruction_steps=7, resample_steps=1)),
    "inpaint10_draws2": ("self_aware", _inpaint(mask_noise_draws=2, reconstruction_steps=8, resample_steps=1)),
    "inpaint10_p90": ("self_aware", _inpaint(reconstruction_steps=7, resample_steps=1, mask_percentile=0.9)),
    "inpaint10_t100": ("self_aware", _inpaint(reconstruction_steps=7, resample_steps=1, inpaint_start=100)),
    "denoise_thesis": ("denoise", THESIS),
    "denoise_fast": ("denoise", FAST),
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
                   "variant's own map filter).")
    p.add_argument("--seeds", default="0", help="Comma-separated noise seeds.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default="pipeline_quality.json")
    return p.parse_args(argv)


def defect_or_retry(textures: Optional[str]) -> Callable[[torch.Tensor, torch.Generator], Tuple[torch.Tensor, torch.Tensor]]:
    """A synthetic defect for :func:`harness.validation_set`: DRAEM's :func:`make_anomaly`, drawn again (up to 20 times)
    while it leaves the image normal (half of its draws do)."""
    def make_defect(img: torch.Tensor, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        for _ in range(20):  # half of the draws stay normal: draw until a defect appears
            anomalous, mask = make_anomaly(img, textures=textures, generator=g)
            if mask.sum() > 0:
                break
        return anomalous, mask
    return make_defect


def scored_images(args: argparse.Namespace, data, seed: int
                  ) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """``(calibration images, scored images, their masks, labels)`` of ``--split`` (at most ``--max_images``
    scored, half normal and half defective on the validation split)."""
    if args.split == "validation":
        val, _, _ = split_tensors(data["validation"], args.resolution, None, seed)
        make_defect = defect_or_retry(args.textures)
        calib, images, gt, labels = validation_set(
            val, lambda img, i: make_defect(img, torch.Generator().manual_seed(seed * 10_000 + i)))
    else:
        calib, _, _ = split_tensors(data["validation"], args.resolution, None, seed)
        images, gt, labels = split_tensors(data["test"], args.resolution, args.max_images, seed)
    if args.max_images is not None and args.split == "validation" and len(images) > args.max_images:
        keep = np.r_[0:args.max_images // 2, len(images) // 2:len(images) // 2 + args.max_images // 2]
        images, gt, labels = images[keep], gt[keep], labels[keep]
    return calib, images, gt, labels


def _mean(values: List[Optional[float]]) -> Optional[float]:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def score_variant(pipe: SelfAwareInpaintPipeline, method: str, config: SamplingConfig, images: torch.Tensor,
                  gt: np.ndarray, labels: np.ndarray, seeds: List[int], filters: List[int]) -> Dict[str, Any]:
    """Score a calibrated variant over ``seeds``: seconds and passes per image, the mask statistics (self_aware),
    every returned map's AUROCs and the multi-scale map's at each mean-filter size in ``filters``."""
    per_filter: Dict[int, Dict[str, List[float]]] = {f: {"image_auroc": [], "pixel_auroc": []} for f in filters}
    per_map: Dict[str, Dict[str, List[float]]] = {}
    seconds, passes, mask_stats = [], [], []
    for seed in seeds:
        start = time.perf_counter()
        r = run_path(pipe, images, seed=seed * 1000, method=method)
        seconds.append((time.perf_counter() - start) / len(images))
        passes.append(statistics.fmean(r["passes"]))
        m = r["masks"]
        mask_stats.append(mask_statistics(m.reshape(len(m), -1).sum(1), (m & gt).reshape(len(m), -1).sum(1),
                                          gt.reshape(len(gt), -1).sum(1), labels, m[0].size))
        for map_name, scores in r["scores"].items():  # every map the call returned, at the variant's filter
            maps = r["maps"][map_name]
            entry = per_map.setdefault(map_name, {"image_auroc": [], "pixel_auroc": []})
            entry["image_auroc"].append(auroc(labels, scores))
            entry["pixel_auroc"].append(auroc(gt.reshape(-1).astype(int), maps.reshape(-1)))
        for f in filters:  # the same reconstructions, re-mapped with each filter size
            maps = multiscale_anomaly_map(images, r["reconstructions"], mean_filter_size=f).numpy()
            scores = maps.reshape(len(maps), -1).max(1)
            per_filter[f]["image_auroc"].append(auroc(labels, scores))
            per_filter[f]["pixel_auroc"].append(auroc(gt.reshape(-1).astype(int), maps.reshape(-1)))
    entry = {"method": method, "config": config.to_dict(), "preset": config.preset_name,
             "seconds_per_image": statistics.fmean(seconds),
             "unet_passes_per_image": statistics.fmean(passes),
             **({k: _mean([s[k] for s in mask_stats]) for k in mask_stats[0]} if method == "self_aware" else {}),
             "maps": {k: {m: {"mean": _mean(v), "per_seed": v} for m, v in d.items()} for k, d in per_map.items()}}
    for f in filters:
        entry[f"filter{f}"] = {k: {"mean": _mean(v), "per_seed": v} for k, v in per_filter[f].items()}
    return entry


def markdown(results: Dict[str, Any]) -> str:
    """One row per variant: passes, seconds, mask coverage and the AUROCs at every filter size measured."""
    def fmt(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2f}"

    shown = sorted({f for e in results["variants"].values() for f in
                    (int(k[len("filter"):]) for k in e if k.startswith("filter"))})
    lines = ["| variant | passes | s/image | mask normal share, defect recall, precision | "
             + " | ".join(f"img AUROC f{f} | px AUROC f{f}" for f in shown) + " |",
             "|---|---|---|---|" + "---|---|" * len(shown)]
    for name, e in results["variants"].items():
        cells = " | ".join(
            f"{fmt(e[f'filter{f}']['image_auroc']['mean'])} | {fmt(e[f'filter{f}']['pixel_auroc']['mean'])}"
            if f"filter{f}" in e else "- | -" for f in shown)
        cover = (f"{fmt(e['mask_normal_share'])}, {fmt(e['mask_defect_recall'])}, {fmt(e['mask_precision'])}"
                 if "mask_normal_share" in e else "-")
        lines.append(f"| {name} | {e['unet_passes_per_image']:.1f} | {e['seconds_per_image']:.2f} | {cover} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = SelfAwareInpaintPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    data = load_mvtec(args.data_dir, args.category, resolution=args.resolution)
    seeds = [int(s) for s in args.seeds.split(",")]
    calib, images, gt, labels = scored_images(args, data, seeds[0])
    logger.info("calibrating on %d images; scoring %d (%d defective)", len(calib), len(images), int(labels.sum()))

    calibrated: Dict[str, Any] = {"config": None, "methods": ()}

    def calibrate(config: SamplingConfig, method: str) -> None:
        """Calibrate ``config`` on ``calib`` (same images, same seed every time) unless this run already did for a
        method that lets ``method`` run (``denoise`` runs on any calibration, without decisions; ``self_aware``
        needs its own thresholds)."""
        if calibrated["config"] == config and (method == "denoise" or method in calibrated["methods"]):
            return
        pipe.calibrate(calib, config=config, methods=(method,), generator=torch.Generator().manual_seed(seeds[0]))
        calibrated.update(config=config, methods=(method,))

    results: Dict[str, Any] = {"split": args.split, "category": args.category, "model": str(args.model),
                               "num_images": int(len(images)), "num_defective": int(labels.sum()),
                               "seeds": seeds, "variants": {}}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    filter_sizes = [int(s) for s in args.mean_filter_sizes.split(",")] if args.mean_filter_sizes else None
    for name in names:
        method, config = VARIANTS[name]
        calibrate(config, method)
        filters = filter_sizes or [config.map_filter_size or default_mean_filter_size(pipe.resolution)]
        entry = score_variant(pipe, method, config, images, gt, labels, seeds, filters)
        results["variants"][name] = entry
        logger.info("%s: %s", name, json.dumps(entry))
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    sys.stdout.write(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
