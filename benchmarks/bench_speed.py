"""Speed benchmark (issue 8): the thesis-faithful reference path against the fast default, side by side.

For a trained pipeline folder (or one trained here with ``training/train_ddpm.py``) and an MVTec-layout category:
calibrate on the validation split (normal images), then run every test image one by one through each path and
report the median seconds per image, UNet passes per image, image and pixel AUROC (scikit-learn), the speed-up and
the memory peaks; the figures go to a JSON file.

Example (CPU, one thread, tiny 64 px model trained for 8 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data_dir ../shared/data/mvtec_subset --category bottle \
        --model /tmp/bottle64 --resolution 64 --output bench_speed_bottle.json

The paths run interleaved image by image (each image through every path before the next image), so that a shared
machine's load hits them alike. Memory: ``tracemalloc_peak_mib`` per path covers Python/numpy allocations only (not
torch's CPU allocator); ``peak_rss_mib`` is the whole process's peak resident size (``resource``).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from diffad.data import load_mvtec
from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

logger = logging.getLogger("bench_speed")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True, help="MVTec AD-layout root (or a category folder).")
    p.add_argument("--category", default=None, help="Category folder name (e.g. bottle).")
    p.add_argument("--model", default=None, help="Trained pipeline folder; trained here when absent (see --train_*).")
    p.add_argument("--train_output_dir", default=None, help="Where to train a model when --model is not given "
                   "(a finished model already there is reused).")
    p.add_argument("--train_preset", default="tiny", help="train_ddpm --preset when training here.")
    p.add_argument("--train_minutes", type=float, default=5.0, help="train_ddpm --max_train_minutes when training here.")
    p.add_argument("--resolution", type=int, default=64, help="Image resolution R (must match the model).")
    p.add_argument("--max_test_images", type=int, default=None, help="Use at most this many test images "
                   "(a seeded, stratified subset keeps good and defective images in proportion).")
    p.add_argument("--max_validation_images", type=int, default=None, help="Calibrate on at most this many.")
    p.add_argument("--modes", default="fast,reference", help="Comma-separated paths to time, in order.")
    p.add_argument("--method", default="self_aware", choices=("self_aware", "denoise"))
    p.add_argument("--seed", type=int, default=0, help="Noise seed of calibration and inference.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU).")
    p.add_argument("--output", default="bench_speed.json", help="JSON file for the figures.")
    return p.parse_args(argv)


def split_tensors(split, resolution: int, limit: Optional[int], seed: int):
    """``(images (N, 3, R, R) in [-1, 1], masks (N, R, R) bool, labels (N,) int)`` of a DatasetDict split."""
    n = len(split)
    idx = np.arange(n)
    if limit is not None and limit < n:
        labels_all = np.array(split["label"])
        rng = np.random.default_rng(seed)
        picked = []
        for lab in np.unique(labels_all):
            members = idx[labels_all == lab]
            k = max(1, int(round(limit * len(members) / n)))
            picked.extend(rng.choice(members, size=min(k, len(members)), replace=False).tolist())
        idx = np.sort(np.array(picked))
    imgs, masks, labels = [], [], []
    for i in idx:
        row = split[int(i)]
        img = row["image"].convert("RGB").resize((resolution, resolution), resample=3)
        imgs.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
        m = row["mask"].convert("L").resize((resolution, resolution), resample=0)
        masks.append(np.asarray(m) > 127)
        labels.append(int(row["label"]))
    return torch.stack(imgs), np.stack(masks), np.array(labels)


def train_model(args: argparse.Namespace) -> Path:
    from diffad.training.train_ddpm import main, parse_args as train_parse_args

    out = args.train_output_dir or f"bench_model_{args.category or 'data'}_{args.resolution}"
    if (Path(out) / "model_index.json").is_file():
        logger.info("reusing the model already trained in %s", out)
        return Path(out)
    argv = ["--data_dir", args.data_dir, "--output_dir", out, "--preset", args.train_preset,
            "--resolution", str(args.resolution), "--max_train_minutes", str(args.train_minutes),
            "--report_to", "none", "--seed", str(args.seed)]
    if args.category:
        argv += ["--category", args.category]
    return Path(main(train_parse_args(argv)))


def run_path(pipe: SelfAwareInpaintPipeline, images: torch.Tensor, *, seed: int, **call_kwargs: Any) -> Dict[str, Any]:
    """Every image alone (batch 1), timed; seeds ``seed + i`` per image so that paths see the same noise seeds."""
    seconds, scores, maps, passes, recs, masks = [], [], [], [], [], []
    for i in range(images.shape[0]):
        start = time.perf_counter()
        out = pipe(images[i:i + 1], generator=torch.Generator().manual_seed(seed + i), output_type="pt", **call_kwargs)
        seconds.append(time.perf_counter() - start)
        scores.append(float(out.scores[0]))
        maps.append(out.anomaly_maps[0].numpy())
        passes.append(int(out.num_unet_passes))
        recs.append(out.reconstructions[0] * 2 - 1)
        masks.append(out.masks[0].numpy())
    return {"seconds": seconds, "scores": np.array(scores), "maps": np.stack(maps), "passes": passes,
            "reconstructions": torch.stack(recs), "masks": np.stack(masks)}


def auroc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None


def benchmark(args: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else train_model(args)
    pipe = SelfAwareInpaintPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if pipe.resolution != args.resolution:
        raise ValueError(f"--resolution {args.resolution} does not match the model's {pipe.resolution}")
    data = load_mvtec(args.data_dir, args.category, resolution=args.resolution)
    val, _, _ = split_tensors(data["validation"], args.resolution, args.max_validation_images, args.seed)
    test, gt_masks, labels = split_tensors(data["test"], args.resolution, args.max_test_images, args.seed)
    logger.info("calibrating on %d validation images; %d test images (%d defective)", len(val), len(test),
                int(labels.sum()))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # Each path gets its own calibration, made in its own mode: the mask levers (noise draws, filter) live in the
    # calibration, so the reference path is the thesis's (1 noise draw, 51 timesteps: 301 passes per image).
    pipes: Dict[str, SelfAwareInpaintPipeline] = {}
    calibration_s: Dict[str, float] = {}
    for mode in modes:
        pipes[mode] = pipe if not pipes else SelfAwareInpaintPipeline.from_pretrained(model)
        pipes[mode].set_progress_bar_config(disable=True)
        start = time.perf_counter()
        pipes[mode].calibrate(val, methods=(args.method,), mode=mode, generator=torch.Generator().manual_seed(args.seed))
        calibration_s[mode] = time.perf_counter() - start
    result: Dict[str, Any] = {
        "data_dir": str(args.data_dir), "category": args.category, "model": str(model),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "resolution": args.resolution,
        "method": args.method, "num_test_images": int(len(test)), "num_defective": int(labels.sum()),
        "num_validation_images": int(len(val)), "calibration_seconds": calibration_s, "threads": args.threads,
        "torch": torch.__version__, "paths": {},
    }
    # Interleave the paths image by image, so that both see the same load on a shared machine.
    runs: Dict[str, Dict[str, Any]] = {m: {"seconds": [], "scores": [], "maps": [], "passes": [], "py_peak": 0}
                                       for m in modes}
    tracemalloc.start()
    for i in range(test.shape[0]):
        for mode in modes:
            tracemalloc.reset_peak()
            r = run_path(pipes[mode], test[i:i + 1], seed=args.seed + i, method=args.method, mode=mode)
            runs[mode]["py_peak"] = max(runs[mode]["py_peak"], tracemalloc.get_traced_memory()[1])
            for key in ("seconds", "passes"):
                runs[mode][key].extend(r[key])
            runs[mode]["scores"].extend(r["scores"].tolist())
            runs[mode]["maps"].append(r["maps"])
    tracemalloc.stop()
    for mode in modes:
        r = runs[mode]
        maps = np.concatenate(r["maps"])
        result["paths"][mode] = {
            "median_seconds_per_image": statistics.median(r["seconds"]),
            "mean_seconds_per_image": statistics.fmean(r["seconds"]),
            "unet_passes_per_image": statistics.fmean(r["passes"]),
            "max_unet_passes_per_image": max(r["passes"]),
            "image_auroc": auroc(labels, np.array(r["scores"])),
            "pixel_auroc": auroc(gt_masks.reshape(-1).astype(int), maps.reshape(-1)),
            "tracemalloc_peak_mib": r["py_peak"] / 2**20,
        }
        logger.info("%s: %s", mode, result["paths"][mode])
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    paths = result["paths"]
    if "fast" in paths and "reference" in paths:
        f, ref = paths["fast"], paths["reference"]
        result["speedup_median"] = ref["median_seconds_per_image"] / f["median_seconds_per_image"]
        result["pass_ratio"] = ref["unet_passes_per_image"] / f["unet_passes_per_image"]
        if f["image_auroc"] is not None and ref["image_auroc"] is not None:
            result["image_auroc_fast_minus_reference"] = f["image_auroc"] - ref["image_auroc"]
    return result


def format_table(result: Dict[str, Any]) -> str:
    lines = [f"{result['category']} @ {result['resolution']} px, {result['num_test_images']} test images, "
             f"method {result['method']}",
             "| path | median s/image | passes/image | image AUROC | pixel AUROC | Python peak MiB |",
             "|---|---|---|---|---|---|"]
    for mode, p in result["paths"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {mode} | {p['median_seconds_per_image']:.3f} | {p['unet_passes_per_image']:.1f} | "
                     f"{fmt(p['image_auroc'])} | {fmt(p['pixel_auroc'])} | {p['tracemalloc_peak_mib']:.1f} |")
    if "speedup_median" in result:
        lines.append(f"speed-up (median s/image): {result['speedup_median']:.1f}x; pass ratio "
                     f"{result['pass_ratio']:.1f}x")
    lines.append(f"process peak RSS: {result['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    result = benchmark(args)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(format_table(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
