"""Speed benchmark (issue 8): the thesis's sampler (``SamplingConfig.thesis()``) against the fast default
(``SamplingConfig.fast()``), side by side.

For a trained pipeline folder (or one trained here with ``training/train_ddpm.py``) and an MVTec-layout category:
calibrate one copy of the pipeline per sampling config on the validation split (normal images; a pipeline runs
exactly the config it was calibrated with), then run every test image one by one through each copy and report the
median seconds per image, UNet passes per image, image and pixel AUROC of every map the call returns
(scikit-learn; one call gives them all), the speed-up and the memory peaks; the figures go to a JSON file.

Example (CPU, one thread, tiny 64 px model trained for 8 minutes)::

    OMP_NUM_THREADS=1 python benchmarks/bench_speed.py --data_dir ../shared/data/mvtec_subset --category bottle \
        --model /tmp/bottle64 --resolution 64 --output bench_speed_bottle.json

The configs run interleaved image by image (each image through every config before the next image), so that a
shared machine's load hits them alike. Memory: ``tracemalloc_peak_mib`` per path covers Python/numpy allocations only (not
torch's CPU allocator); ``peak_rss_mib`` is the whole process's peak resident size (``harness.peak_rss_mib``).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from harness import auroc, peak_rss_mib, run_path, split_tensors

from diffad.data import load_mvtec
from diffad.pipelines.self_aware_inpaint import METHODS, SAMPLING_PRESETS, SamplingConfig, SelfAwareInpaintPipeline
from diffad.workflow import train_ddpm_to_budget

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
    p.add_argument("--configs", default="fast,thesis",
                   help=f"Comma-separated sampling presets to time, in order (from {', '.join(SAMPLING_PRESETS)}).")
    p.add_argument("--method", default="self_aware", choices=METHODS)
    p.add_argument("--anomaly_map", default="multiscale",
                   help="The map whose AUROCs are the headline columns (every map's are in the JSON).")
    p.add_argument("--seed", type=int, default=0, help="Noise seed of calibration and inference.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU).")
    p.add_argument("--output", default="bench_speed.json", help="JSON file for the figures.")
    return p.parse_args(argv)


def train_model(args: argparse.Namespace) -> Path:
    """The DDPM the benchmark measures: ``args.train_output_dir``'s when trained already, else one trained here for
    ``--train_minutes`` (:func:`diffad.workflow.train_ddpm_to_budget`)."""
    out = args.train_output_dir or f"bench_model_{args.category or 'data'}_{args.resolution}"
    if (Path(out) / "model_index.json").is_file():
        logger.info("reusing the model already trained in %s", out)
        return Path(out)
    return train_ddpm_to_budget(out, minutes=args.train_minutes, seed=args.seed, resume=False, checkpointing_steps=500,
                                data_dir=args.data_dir, category=args.category, preset=args.train_preset,
                                resolution=args.resolution)


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
    names = [m.strip() for m in args.configs.split(",") if m.strip()]
    for name in names:
        if name not in SAMPLING_PRESETS:
            raise ValueError(f"--configs: unknown sampling preset {name!r}; choose from {', '.join(SAMPLING_PRESETS)}")
    # One calibrated copy per sampling config: a pipeline runs exactly the config it was calibrated with (the mask
    # levers and Q_p included), so the thesis copy is the thesis's sampler end to end (301 passes per image).
    pipes: Dict[str, SelfAwareInpaintPipeline] = {}
    calibration_s: Dict[str, float] = {}
    for name in names:
        pipes[name] = pipe if not pipes else SelfAwareInpaintPipeline.from_pretrained(model)
        pipes[name].set_progress_bar_config(disable=True)
        start = time.perf_counter()
        pipes[name].calibrate(val, config=SamplingConfig.from_preset(name), methods=(args.method,),
                              generator=torch.Generator().manual_seed(args.seed))
        calibration_s[name] = time.perf_counter() - start
    result: Dict[str, Any] = {
        "data_dir": str(args.data_dir), "category": args.category, "model": str(model),
        "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()), "resolution": args.resolution,
        "method": args.method, "anomaly_map": args.anomaly_map, "num_test_images": int(len(test)),
        "num_defective": int(labels.sum()), "num_validation_images": int(len(val)),
        "calibration_seconds": calibration_s, "threads": args.threads, "torch": torch.__version__,
        "sampling_configs": {name: SamplingConfig.from_preset(name).to_dict() for name in names}, "paths": {},
    }
    # Interleave the configs image by image, so that both see the same load on a shared machine.
    runs: Dict[str, Dict[str, Any]] = {m: {"seconds": [], "scores": {}, "maps": {}, "passes": [], "py_peak": 0}
                                       for m in names}
    tracemalloc.start()
    for i in range(test.shape[0]):
        for name in names:
            tracemalloc.reset_peak()
            r = run_path(pipes[name], test[i:i + 1], seed=args.seed + i, method=args.method)
            runs[name]["py_peak"] = max(runs[name]["py_peak"], tracemalloc.get_traced_memory()[1])
            for key in ("seconds", "passes"):
                runs[name][key].extend(r[key])
            for m in r["scores"]:
                runs[name]["scores"].setdefault(m, []).extend(r["scores"][m].tolist())
                runs[name]["maps"].setdefault(m, []).append(r["maps"][m])
    tracemalloc.stop()
    for name in names:
        r = runs[name]
        if args.anomaly_map not in r["scores"]:
            raise ValueError(f"--anomaly_map {args.anomaly_map!r} is not among the maps returned ({', '.join(r['scores'])})")
        per_map = {}
        for m, scores in r["scores"].items():
            maps = np.concatenate(r["maps"][m])
            per_map[m] = {"image_auroc": auroc(labels, np.array(scores)),
                          "pixel_auroc": auroc(gt_masks.reshape(-1).astype(int), maps.reshape(-1))}
        result["paths"][name] = {
            "median_seconds_per_image": statistics.median(r["seconds"]),
            "mean_seconds_per_image": statistics.fmean(r["seconds"]),
            "unet_passes_per_image": statistics.fmean(r["passes"]),
            "max_unet_passes_per_image": max(r["passes"]),
            "image_auroc": per_map[args.anomaly_map]["image_auroc"],
            "pixel_auroc": per_map[args.anomaly_map]["pixel_auroc"],
            "maps": per_map,
            "tracemalloc_peak_mib": r["py_peak"] / 2**20,
        }
        logger.info("%s: %s", name, result["paths"][name])
    result["peak_rss_mib"] = peak_rss_mib()
    paths = result["paths"]
    if "fast" in paths and "thesis" in paths:
        f, ref = paths["fast"], paths["thesis"]
        result["speedup_median"] = ref["median_seconds_per_image"] / f["median_seconds_per_image"]
        result["pass_ratio"] = ref["unet_passes_per_image"] / f["unet_passes_per_image"]
        if f["image_auroc"] is not None and ref["image_auroc"] is not None:
            result["image_auroc_fast_minus_thesis"] = f["image_auroc"] - ref["image_auroc"]
    return result


def format_table(result: Dict[str, Any]) -> str:
    lines = [f"{result['category']} @ {result['resolution']} px, {result['num_test_images']} test images, "
             f"method {result['method']}, AUROCs of the {result['anomaly_map']} map",
             "| sampling config | median s/image | passes/image | image AUROC | pixel AUROC | Python peak MiB |",
             "|---|---|---|---|---|---|"]
    for name, p in result["paths"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {p['median_seconds_per_image']:.3f} | {p['unet_passes_per_image']:.1f} | "
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
