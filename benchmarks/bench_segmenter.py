#!/usr/bin/env python
"""Learned (segmenter) vs multi-scale anomaly maps, per category, at a stated CPU budget.

For every category of the embedded synthetic default and of the real MVTec AD subset
(``../shared/data/mvtec_subset``), with the same budget for each:

1. train a DDPM with ``training/train_ddpm.py`` for ``--ddpm_minutes`` of training;
2. calibrate it on its validation split with the ``fast`` sampling config
   (:func:`diffad.calibration.calibrate_model`);
3. train the segmenter with ``training/train_segmenter.py`` for ``--segmenter_minutes``
   (the reconstruction cache is built first and not counted in those minutes);
4. evaluate the test split with :func:`diffad.evaluation.evaluate_pipeline` (which computes the
   numbers with :func:`diffad.metrics.compute_anomaly_metrics`), method ``self_aware``, both
   maps from the same reconstruction of each image (paired comparison): image AUROC, pixel AUROC,
   AUPRO.

Prints a markdown table and writes everything (metrics, settings, seconds per stage) as JSON.
Not a test: it takes minutes. Example (what ``make bench-segmenter`` runs)::

    python benchmarks/bench_segmenter.py --ddpm_minutes 4 --segmenter_minutes 2 --threads 1

MVTec AD images are CC BY-NC-SA 4.0; they are read from ``../shared/data`` and never copied.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from diffad.files import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL = Path(os.environ.get("DIFFAD_REAL_DATA", REPO_ROOT.parent / "shared" / "data")) / "mvtec_subset"
MAPS = ("multiscale", "learned")

logger = logging.getLogger("bench_segmenter")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv``, default ``sys.argv[1:]``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", type=str, default="synthetic,real",
                   help="Comma-separated: 'synthetic' (the embedded default) and/or 'real' (--real_root).")
    p.add_argument("--synthetic_categories", type=str, default=None,
                   help="Comma-separated synthetic categories (default: all of diffad.synthetic.SYNTHETIC_CATEGORIES).")
    p.add_argument("--real_root", type=str, default=str(DEFAULT_REAL),
                   help="MVTec-AD-layout root; every category folder in it is benchmarked.")
    p.add_argument("--real_categories", type=str, default=None, help="Comma-separated subset of --real_root's.")
    p.add_argument("--preset", type=str, default="tiny", help="DDPM preset (train_ddpm.py --preset).")
    p.add_argument("--resolution", type=int, default=64, help="Image size R for every model.")
    p.add_argument("--ddpm_minutes", type=float, default=4.0, help="DDPM training budget per category (minutes).")
    p.add_argument("--segmenter_minutes", type=float, default=2.0,
                   help="Segmenter training budget per category (minutes, after the reconstruction cache).")
    p.add_argument("--num_synthetic_factor", type=float, default=2.0,
                   help="Synthetic anomalies per normal training image (train_segmenter.py's default is 4).")
    p.add_argument("--textures_dir", type=str, default=None,
                   help="Texture folder for the synthetic anomalies (default: built-in procedural textures).")
    p.add_argument("--eval_batch_size", type=int, default=16, help="Test images per pipeline call.")
    p.add_argument("--seed", type=int, default=0, help="Seeds data splits, training, synthesis and test noise.")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (1 is fastest on a busy 2-core machine; default: torch's choice).")
    p.add_argument("--work_dir", type=str, default="/tmp/diffad-bench-segmenter",
                   help="Models, synthetic data and caches (a rerun reuses trained DDPMs and cached reconstructions).")
    p.add_argument("--out", type=str, default=None, help="JSON output (default: <work_dir>/bench_segmenter.json).")
    args = p.parse_args(argv)
    for key in ("ddpm_minutes", "segmenter_minutes", "num_synthetic_factor", "resolution", "eval_batch_size"):
        if getattr(args, key) <= 0:
            p.error(f"--{key} must be positive, got {getattr(args, key)}")
    return args


def _csv(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _jobs(args: argparse.Namespace, work: Path) -> List[Dict[str, str]]:
    """``[{"dataset", "data_dir", "category"}]`` for every category to benchmark."""
    from diffad.data import list_categories
    from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset

    wanted = _csv(args.datasets) or []
    unknown = set(wanted) - {"synthetic", "real"}
    if unknown:
        raise ValueError(f"--datasets takes 'synthetic' and/or 'real', got {sorted(unknown)}")
    jobs: List[Dict[str, str]] = []
    if "synthetic" in wanted:
        categories = _csv(args.synthetic_categories) or list(SYNTHETIC_CATEGORIES)
        root = work / "synthetic_data"
        if not all((root / c / "train" / "good").is_dir() for c in categories):
            make_synthetic_dataset(root, seed=args.seed, resolution=max(64, args.resolution), categories=categories)
        jobs += [{"dataset": "synthetic", "data_dir": str(root), "category": c} for c in categories]
    if "real" in wanted:
        root = Path(args.real_root)
        if not root.is_dir():
            logger.warning("real data not found at %s: skipping the real categories", root)
        else:
            categories = _csv(args.real_categories) or list_categories(root)
            jobs += [{"dataset": "real", "data_dir": str(root), "category": c} for c in categories]
    return jobs


def run_category(job: Dict[str, str], args: argparse.Namespace, work: Path) -> Dict[str, Any]:
    """Train, calibrate, add the segmenter and evaluate one category; returns its record."""
    from diffad.calibration import calibrate_model
    from diffad.data import load_mvtec
    from diffad.evaluation import evaluate_pipeline
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
    from diffad.training import train_segmenter
    from diffad.workflow import train_ddpm_to_budget, train_segmenter_to_budget

    model_dir = work / "models" / f"{job['dataset']}-{job['category']}"
    seconds: Dict[str, float] = {}
    tick = time.time()
    if not (model_dir / "model_index.json").is_file():
        train_ddpm_to_budget(model_dir, steps=1_000_000, minutes=args.ddpm_minutes, seed=args.seed, resume=False,
                             checkpointing_steps=1_000_000, data_dir=job["data_dir"], category=job["category"],
                             preset=args.preset, resolution=args.resolution)
    seconds["ddpm_training"] = time.time() - tick

    tick = time.time()
    calibrate_model(model_dir=model_dir, data=job["data_dir"], category=job["category"], config="fast",
                    seed=args.seed)
    seconds["calibration"] = time.time() - tick

    n_train = len(load_mvtec(job["data_dir"], job["category"], seed=args.seed)["train"])
    tick = time.time()
    train_segmenter_to_budget(model_dir, minutes=args.segmenter_minutes, seed=args.seed, resume=False,
                              checkpointing_steps=1_000_000, data_dir=job["data_dir"], category=job["category"],
                              num_synthetic=max(1, round(args.num_synthetic_factor * n_train)),
                              cache_dir=work / "cache", textures_dir=args.textures_dir or None)
    seconds["segmenter_total"] = time.time() - tick
    seg_log = json.loads((model_dir / train_segmenter.LOG_NAME).read_text())["summary"]
    ddpm_log = json.loads((model_dir / "training_log.json").read_text())["summary"]

    tick = time.time()
    pipe = SelfAwareInpaintPipeline.from_pretrained(str(model_dir))
    test = load_mvtec(job["data_dir"], job["category"], resolution=args.resolution, seed=args.seed)["test"]
    result = evaluate_pipeline(pipe, test, methods=["self_aware"], anomaly_maps=list(MAPS),
                               batch_size=args.eval_batch_size, seed=args.seed, num_figure_rows=0)
    seconds["evaluation"] = time.time() - tick
    metrics = {m: {k: result.metrics[f"self_aware/{m}"].get(k) for k in
                   ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "seconds_per_image",
                    "unet_passes_per_image", "num_images")} for m in MAPS}
    return {**job, "model_dir": str(model_dir), "metrics": metrics, "seconds": seconds,
            "ddpm": {k: ddpm_log.get(k) for k in ("total_optimizer_steps", "best_val_loss", "train_seconds")},
            "segmenter": {k: seg_log.get(k) for k in ("total_optimizer_steps", "final_train_loss", "train_seconds",
                                                      "cache_seconds_this_run", "cache_hit", "learned_threshold")}}


def markdown(records: List[Dict[str, Any]]) -> str:
    """One row per category and map, plus the unweighted mean per map."""
    rows = ["| dataset | category | map | image AUROC | pixel AUROC | AUPRO | s/image |", "|---|---|---|---|---|---|---|"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in records:
        for m in MAPS:
            x = r["metrics"][m]
            rows.append(f"| {r['dataset']} | {r['category']} | {m} | {f(x['image_auroc'])} | {f(x['pixel_auroc'])} | "
                        f"{f(x['aupro'])} | {f(x['seconds_per_image'])} |")
    for m in MAPS:
        def mean(key: str) -> Optional[float]:
            vals = [r["metrics"][m][key] for r in records if r["metrics"][m].get(key) is not None]
            return sum(vals) / len(vals) if vals else None
        rows.append(f"| all | mean | {m} | {f(mean('image_auroc'))} | {f(mean('pixel_auroc'))} | {f(mean('aupro'))} | "
                    f"{f(mean('seconds_per_image'))} |")
    return "\n".join(rows)


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Run every category; print the table; write and return the JSON payload."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    out = Path(args.out) if args.out else work / "bench_segmenter.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records: List[Dict[str, Any]] = []
    payload: Dict[str, Any] = {}
    for job in _jobs(args, work):
        logger.info("benchmarking %s/%s", job["dataset"], job["category"])
        records.append(run_category(job, args, work))
        # Written after every category, so an interrupted run keeps what it measured.
        payload = {"settings": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
                   "wall_seconds": time.time() - start, "categories": records, "table": markdown(records)}
        atomic_write_text(out, json.dumps(payload, indent=2, default=str) + "\n")
    if not records:
        raise SystemExit("bench_segmenter: error: no category to benchmark (see --datasets and --real_root)")
    sys.stdout.write(f"Learned vs multi-scale maps (self_aware, {args.preset} preset, {args.resolution} px; budget per "
                     f"category: DDPM {args.ddpm_minutes} min, segmenter {args.segmenter_minutes} min)\n\n")
    sys.stdout.write(payload["table"] + "\n\n" + f"JSON: {out}\n")
    return payload


if __name__ == "__main__":
    main(parse_args())
