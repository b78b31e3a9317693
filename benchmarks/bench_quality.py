"""``make bench-quality`` (issue 12): every detector on the three real categories over three seeds.

For each real category (MVTec AD ``bottle``, MVTec 3D-AD ``tire``, MPDD ``metal_plate``) and each seed, one
*cell* trains the tiny DDPM and the segmenter with a fixed budget of optimiser **steps** (never minutes, so the
figures do not depend on the machine's load) and evaluates, on the test split:

* phase ``fast``: the default sampler (``SamplingConfig.fast()``, calibrated on the validation split):
  ``denoise`` (10 steps) and ``self_aware`` with every map (multiscale, learned, noise_error), from
  ``benchmarks/bench_real.py``'s steps (train DDPM, calibrate, train segmenter, evaluate);
* phase ``thesis``: the same DDPM recalibrated with ``SamplingConfig.thesis()`` (301 passes; 50-step denoise).

Then ``<out>/bench_quality.json`` and ``<out>/table.md`` give, per category and detector, mean ± std over seeds
of image AUROC, pixel AUROC, AUPRO, image F1-max, UNet passes and seconds per image, and the inpainting masks'
statistics (share of normal pixels masked, share of defect pixels masked, precision); and the mean over the
categories.

Resumable: every step of every cell is skipped when its output exists (training resumes from its last
checkpoint), so ``make bench-quality`` continues an interrupted run; delete ``<out>`` to start over. Cells run
``--jobs`` at a time, each in its own one-thread process; all ``fast`` phases run before any ``thesis`` phase.

Cost (2-core CPU, ``--jobs 2``): a ``fast`` phase is about 15-20 CPU-minutes (1500 DDPM steps, 500 segmenter
steps, evaluation), a ``thesis`` phase about 5-10 (301 + 50 passes per test image); the full run (9 cells) is
about 2-2.5 hours. ``--quick``: one seed, 400 + 150 steps, about 25 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

logger = logging.getLogger("bench_quality")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared" / "data"
#: category -> the MVTec AD-layout root that holds it
CATEGORIES = {"bottle": SHARED / "mvtec_subset", "tire": SHARED / "more_real", "metal_plate": SHARED / "more_real"}
#: detector -> (phase, "<method>/<map>") in that phase's metrics.json
DETECTORS = {
    "denoise (fast, 10 steps)": ("fast", "denoise/multiscale"),
    "self_aware multiscale (fast, default)": ("fast", "self_aware/multiscale"),
    "self_aware learned (fast)": ("fast", "self_aware/learned"),
    "self_aware noise_error (fast)": ("fast", "self_aware/noise_error"),
    "denoise (thesis, 50 steps)": ("thesis", "denoise/multiscale"),
    "self_aware multiscale (thesis)": ("thesis", "self_aware/multiscale"),
    "self_aware noise_error (thesis)": ("thesis", "self_aware/noise_error"),
}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "unet_passes_per_image", "seconds_per_image",
           "mask_normal_share", "mask_defect_recall", "mask_precision")


def cell_dir(out: Path, category: str, seed: int) -> Path:
    return out / category / f"seed{seed}"


def run_fast_phase(out: Path, category: str, seed: int, ddpm_steps: int, segmenter_steps: int) -> None:
    """Train, calibrate (fast), train the segmenter and evaluate: ``benchmarks/bench_real.py`` for one cell."""
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    from bench_real import BenchConfig, run_bench

    textures = SHARED / "textures"
    run_bench(BenchConfig(data_dir=str(CATEGORIES[category]), out=str(cell_dir(out, category, seed)),
                          categories=[category], seed=seed, ddpm_steps=ddpm_steps, segmenter_steps=segmenter_steps,
                          textures_dir=str(textures) if textures.is_dir() else None, config="fast"))


def run_thesis_phase(out: Path, category: str, seed: int) -> None:
    """The cell's DDPM (no segmenter), calibrated with the thesis's sampler and evaluated with it."""
    from diffad.cli import calibrate_model
    from diffad.demo import evaluation_is_current, has_component
    from diffad.evaluation import evaluate_folder
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    cell = cell_dir(out, category, seed)
    model, thesis = cell / "models" / category, cell / "thesis_models" / category
    if not (thesis / "model_index.json").is_file():
        pipe = SelfAwareInpaintPipeline.from_pretrained(model)
        SelfAwareInpaintPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_pretrained(thesis)
    if not has_component(thesis, "calibration"):
        calibrate_model(model_dir=thesis, data=CATEGORIES[category], category=category, config="thesis", seed=seed,
                        batch_size=16)
    evaluation = cell / "thesis_evaluation" / category
    if not evaluation_is_current(evaluation, [thesis]):
        evaluate_folder(thesis, CATEGORIES[category], category, evaluation, config="thesis", batch_size=16,
                        seed=seed)


def phase_metrics(out: Path, category: str, seed: int, phase: str) -> Optional[dict[str, Any]]:
    folder = "evaluation" if phase == "fast" else "thesis_evaluation"
    path = cell_dir(out, category, seed) / folder / category / "metrics.json"
    return json.loads(path.read_text())["categories"][category] if path.is_file() else None


def summarize(out: Path, categories: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean ± std over seeds per category and detector, and over seeds of the per-seed category mean."""
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}
    for category in categories:
        for seed in seeds:
            for detector, (phase, key) in DETECTORS.items():
                metrics = phase_metrics(out, category, seed, phase)
                if metrics and key in metrics:
                    runs.setdefault(category, {}).setdefault(detector, []).append(metrics[key])

    def stats(values: list[dict[str, float]]) -> dict[str, Any]:
        result: dict[str, Any] = {"num_seeds": len(values)}
        for m in METRICS:
            vs = [v[m] for v in values if v.get(m) is not None and np.isfinite(v[m])]
            if vs:
                result[m] = {"mean": float(np.mean(vs)), "std": float(np.std(vs))}
        return result

    per_category = {c: {d: stats(v) for d, v in dets.items()} for c, dets in runs.items()}
    mean: dict[str, Any] = {}
    for detector in DETECTORS:
        per_seed = []
        for i in range(len(seeds)):
            cells = [runs[c][detector][i] for c in categories if len(runs.get(c, {}).get(detector, [])) > i]
            if len(cells) == len(categories):
                per_seed.append({m: float(np.mean([c[m] for c in cells])) for m in METRICS
                                 if all(c.get(m) is not None and np.isfinite(c[m]) for c in cells)})
        if per_seed:
            mean[detector] = stats(per_seed)
    return {"categories": per_category, "mean_over_categories": mean}


def markdown(summary: dict[str, Any]) -> str:
    def cell(s: dict[str, Any], m: str) -> str:
        return f"{s[m]['mean']:.3f} ± {s[m]['std']:.3f}" if m in s else "-"

    cols = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "unet_passes_per_image", "seconds_per_image",
            "mask_normal_share", "mask_defect_recall", "mask_precision")
    lines = []
    blocks = list(summary["categories"].items()) + [("mean over categories", summary["mean_over_categories"])]
    for name, dets in blocks:
        if not dets:
            continue
        seeds = max(s["num_seeds"] for s in dets.values())
        lines += [f"### {name} (mean ± std over {seeds} seed(s))", "",
                  "| detector | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        lines += [f"| {d} | " + " | ".join(cell(s, m) for m in cols) + " |" for d, s in dets.items()]
        lines.append("")
    return "\n".join(lines)


def run_cell(args: argparse.Namespace) -> int:
    category, seed, phase = args.run_cell.split(":")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    import torch

    torch.set_num_threads(1)
    if phase == "fast":
        run_fast_phase(Path(args.out), category, int(seed), args.ddpm_steps, args.segmenter_steps)
    else:
        run_thesis_phase(Path(args.out), category, int(seed))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_output/quality")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ddpm_steps", type=int, default=1500, help="DDPM optimiser steps per cell")
    p.add_argument("--segmenter_steps", type=int, default=500, help="segmenter optimiser steps per cell")
    p.add_argument("--phases", default="fast,thesis")
    p.add_argument("--jobs", type=int, default=2, help="cells run at once, one thread each")
    p.add_argument("--quick", action="store_true", help="one seed, 400 + 150 steps, into <out>_quick")
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.ddpm_steps, args.segmenter_steps, args.out = "0", 400, 150, args.out + "_quick"
    if args.run_cell:
        return run_cell(args)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    categories = [c for c in args.categories.split(",") if c]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        p.error(f"--categories: unknown {unknown}; choose from {', '.join(CATEGORIES)}")
    missing = [c for c in categories if not (CATEGORIES[c] / c).is_dir()]
    if missing:
        p.error(f"real data for {missing} not found under {SHARED}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()
    for phase in [ph for ph in ("fast", "thesis") if ph in args.phases.split(",")]:
        cells = [f"{c}:{s}:{phase}" for s in seeds for c in categories]

        def work(spec: str) -> tuple[str, int, float]:
            category, seed, _ = spec.split(":")
            log = cell_dir(out, category, int(seed)) / f"{phase}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with log.open("a") as handle:
                rc = subprocess.call([sys.executable, __file__, "--run-cell", spec, "--out", str(out),
                                      "--ddpm_steps", str(args.ddpm_steps), "--segmenter_steps",
                                      str(args.segmenter_steps)], stdout=handle, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, OMP_NUM_THREADS="1"))
            logger.info("%s: exit %d after %.1f min (log %s)", spec, rc, (time.time() - t0) / 60, log)
            return spec, rc, time.time() - t0

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(work, cells))
        failed = [spec for spec, rc, _ in results if rc != 0]
        if failed:
            logger.info("failed cells (see their logs; a re-run resumes them): %s", failed)
    summary = summarize(out, categories, seeds)
    summary["budget"] = {"ddpm_steps": args.ddpm_steps, "segmenter_steps": args.segmenter_steps, "seeds": seeds,
                         "preset": "tiny", "resolution": 64, "detectors": DETECTORS}
    summary["wall_minutes_this_run"] = (time.time() - start) / 60
    (out / "bench_quality.json").write_text(json.dumps(summary, indent=2))
    table = markdown(summary)
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
