"""``make bench-quality`` (issues 12, 20): every detector on the five real categories over three seeds.

For each real category (MVTec AD ``bottle``, ``transistor`` and ``toothbrush``, MVTec 3D-AD ``tire``, MPDD
``metal_plate``) and each seed, one *cell* trains the DDPM as ``diffad train`` does (the ``cpu`` preset: 64 px crops
of the 256 px working resolution) with a fixed budget of optimiser **steps** (never minutes, so the figures do not
depend on the machine's load; phase ``ddpm``), then, for each phase, copies the DDPM, calibrates it on the
validation split and evaluates it on the test split (25 tiles per image):

* ``default``: ``SamplingConfig.fast()``: ``self_aware`` (noise error at t = 150 x 3 draws + a 7-step denoising
  reconstruction = 10 UNet passes; maps ``combined``, ``noise_error``, ``multiscale``) and ``denoise`` (the
  baseline, 10 steps), without the head;
* ``head``: the same, with the learned head ``diffad train`` adds (the default detector: ``combined`` with the
  head's map); ``head_sizes``: a head trained on defects of every kind and size instead (measured, not the default);
* ``whole`` (validation only): the same weights on the whole image as one tile;
* ``inpaint23``: diffad 0.2's default, self-aware inpainting (t = 300 x 3 + 10 steps x 2 resamplings = 23 passes);
* ``thesis``: ``SamplingConfig.thesis()`` (301 passes; ``denoise`` 50 steps).

Every cell is also scored on validation (:func:`validation_set`: its seed's held-out images, with synthetic
defects): the choices are made there, pooled over categories and seeds, never on the test split.

Then ``<out>/bench_quality.json`` and ``<out>/table.md`` give, per category and detector, mean ± std over seeds
of image AUROC, pixel AUROC, AUPRO, image F1-max, UNet passes and seconds per image, and the suspect-pixel masks'
statistics (share of normal pixels, share of defect pixels, precision); the mean over the categories; and the
DDPM training minutes per cell.

Resumable: every step of every cell is skipped when its output exists (training resumes from its last
checkpoint), so ``make bench-quality`` continues an interrupted run; delete ``<out>`` to start over. Cells run
``--jobs`` at a time, each in its own one-thread process; every cell's ``ddpm`` phase runs before any evaluation.

Cost (2-core CPU, ``--jobs 2``, one thread per cell, measured in issue 20): a DDPM of 1500 steps 40-56 minutes
under load (``train_seconds`` in its log), ``default`` 10-35 minutes per cell, ``head`` 11-29; one seed of the five
categories is about 9 hours of one core. ``--quick``: bottle and tire, one seed, 400 steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from harness import REAL_CATEGORIES, SHARED_DATA, mean_over_categories

logger = logging.getLogger("bench_quality")

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the shared real data and its five categories (harness's, the peer's bench reads the same)
SHARED, CATEGORIES = SHARED_DATA, REAL_CATEGORIES
#: evaluation phases, in the order they run (each calibrates its own copy of the cell's DDPM)
EVAL_PHASES = ("default", "head", "head_sizes", "whole", "inpaint23", "thesis")
#: head phase -> more ``train_segmenter.py`` flags (``head_sizes``: the head trained on defects of every kind and
#: size, as validation draws them, instead of the small default ones)
HEAD_PHASES = {"head": (), "head_sizes": ("--defect_kinds", "scratch,crack,pit,stain,blob,displace",
                                          "--defect_scale_range", "1,8")}
#: The precision every cell calibrates and runs: the default call's ``auto`` (bf16 on CPUs with AMX/AVX512-BF16,
#: about 2.5x faster at 256 px; make bench-cpu measured bf16 moving the bottle AUROCs by < 0.001), else fp32.
PRECISION = os.environ.get("DIFFAD_BENCH_PRECISION", "auto")
#: phases measured on validation only (a lever that loses there never sees the test split)
VALIDATION_ONLY = ("whole",)
#: the phases ``make bench-quality`` runs unless told (the thesis sampler at 256 px is 25 tiles x 301 passes; the
#: whole-image phase lost to tiles on validation in every category measured: ``--phases ddpm,default,whole`` to
#: measure it again)
DEFAULT_PHASES = ("ddpm", "default", "head")
#: detector -> (phase, "<method>/<map>") in that phase's metrics.json
DETECTORS = {
    "denoise (10 steps)": ("default", "denoise/multiscale"),
    "self_aware combined + head (default, 10 passes)": ("head", "self_aware/combined"),
    "self_aware learned (the head alone)": ("head", "self_aware/learned"),
    "combined + head trained on defects of every size": ("head_sizes", "self_aware/combined"),
    "head alone, trained on defects of every size": ("head_sizes", "self_aware/learned"),
    "self_aware combined without the head": ("default", "self_aware/combined"),
    "self_aware noise_error (default config)": ("default", "self_aware/noise_error"),
    "self_aware multiscale (default config)": ("default", "self_aware/multiscale"),
    "whole image: denoise (10 steps)": ("whole", "denoise/multiscale"),
    "whole image: self_aware combined (10 passes)": ("whole", "self_aware/combined"),
    "self_aware inpaint multiscale (0.2 default, 23 passes)": ("inpaint23", "self_aware/multiscale"),
    "self_aware inpaint combined (23 passes)": ("inpaint23", "self_aware/combined"),
    "denoise (thesis, 50 steps)": ("thesis", "denoise/multiscale"),
    "self_aware inpaint multiscale (thesis, 301 passes)": ("thesis", "self_aware/multiscale"),
    "self_aware inpaint combined (thesis)": ("thesis", "self_aware/combined"),
}
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "unet_passes_per_image", "seconds_per_image",
           "mask_normal_share", "mask_defect_recall", "mask_precision")


def phase_config(phase: str):
    """The :class:`SamplingConfig` an evaluation phase calibrates and runs."""
    from diffad.pipelines.self_aware_inpaint import SamplingConfig

    if phase in ("default", "whole") or phase in HEAD_PHASES:
        return SamplingConfig.fast()
    if phase == "inpaint23":
        return dataclasses.replace(SamplingConfig.fast(), mask_timesteps=(300,), reconstruction_steps=10,
                                   resample_steps=2, reconstruction="inpaint")
    if phase == "thesis":
        return SamplingConfig.thesis()
    raise ValueError(f"unknown phase {phase!r}")


def cell_dir(out: Path, category: str, seed: int) -> Path:
    return out / category / f"seed{seed}"


def run_ddpm_phase(out: Path, category: str, seed: int, ddpm_steps: Optional[int]) -> None:
    """Only the cell's DDPM: `diffad train`'s defaults (the ``cpu`` preset) with the bench's seed and step budget
    (None: the preset's), resuming from its last checkpoint (one kept, one every 250 steps); every detector is
    evaluated on these weights."""
    from diffad.presets import preset_defaults
    from diffad.workflow import train_ddpm_to_budget

    model = cell_dir(out, category, seed) / "models" / category
    if (model / "unet").is_dir() and (model / "model_index.json").is_file():
        return
    train_ddpm_to_budget(model, steps=ddpm_steps or preset_defaults("cpu")["max_train_steps"], seed=seed,
                         checkpointing_steps=250, data_dir=CATEGORIES[category], category=category)


def run_eval_phase(out: Path, category: str, seed: int, phase: str) -> None:
    """The cell's DDPM (no segmenter), calibrated with the phase's sampler and evaluated with it."""
    from diffad.calibration import calibrate_model
    from diffad.demo import evaluation_is_current, has_component
    from diffad.evaluation import evaluate_folder
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    cell = cell_dir(out, category, seed)
    model, copy = cell / "models" / category, cell / f"{phase}_models" / category
    if not (copy / "model_index.json").is_file():
        pipe = SelfAwareInpaintPipeline.from_pretrained(model)
        if phase == "whole":  # the same fully convolutional UNet run on the whole image: one tile
            pipe.unet.register_to_config(sample_size=pipe.resolution)
        SelfAwareInpaintPipeline(unet=pipe.unet, scheduler=pipe.scheduler,
                                 working_resolution=pipe.config.working_resolution).save_pretrained(copy)
    if phase in VALIDATION_ONLY:
        run_validation(copy, cell / f"{phase}_validation" / category / "metrics.json", category, seed,
                       phase_config(phase))
        return
    if not has_component(copy, "calibration"):
        calibrate_model(model_dir=copy, data=CATEGORIES[category], category=category, config=phase_config(phase),
                        precision=PRECISION, seed=seed, batch_size=16)
    if phase in HEAD_PHASES and not has_component(copy, "segmenter"):  # `diffad train`'s head, the same batches
        from diffad.cli import train_head

        train_head(copy, argparse.Namespace(data_dir=str(CATEGORIES[category]), category=category, seed=seed),
                   calibration_batch_size=16, segmenter_argv=HEAD_PHASES[phase])
    # the choices are made on validation, every seed's (each seed holds out other images: the small categories'
    # sets are 8-10 images, so one seed's moves AUROC in steps of 0.04); the head is trained first
    run_validation(copy, cell / f"{phase}_validation" / category / "metrics.json", category, seed,
                   phase_config(phase))
    evaluation = cell / f"{phase}_evaluation" / category
    if not evaluation_is_current(evaluation, [copy]):
        # the head phase adds self_aware maps only: its denoise rows are the default phase's, on the same DDPM
        evaluate_folder(copy, CATEGORIES[category], category, evaluation, batch_size=16, seed=seed,
                        methods=("self_aware",) if phase in HEAD_PHASES else None)


def validation_set(category: str, seed: int, resolution: int, copies: int = 1, max_scale: Optional[float] = None):
    """The VALIDATION data a choice is made on (never the test split): the cell's validation split (held-out
    ``train/good``, the split training never saw), even positions to calibrate, odd positions scored as they are
    and each once more with one synthetic defect (:class:`diffad.defects.DefectSynthesizer`, the kinds in turn:
    scratch, crack, pit, stain, DRAEM blob and ``displace``, a piece of the part pasted elsewhere: without a global
    kind, validation ranked a global map (the whole image at the tile size) against the test split's order), of
    every size (``VALIDATION_SCALE_RANGE``: small defects alone ranked the map filter sizes against it too).
    ``copies`` = 6: every kind on every held image (:func:`harness.validation_set`'s ``copies``); ``max_scale``: the
    largest size factor instead of ``VALIDATION_SCALE_RANGE``'s.
    Returns ``(calibration images, images, masks, labels, kinds)``."""
    from harness import validation_set as with_synthetic_defects

    from diffad.data import images_to_tensor, load_mvtec
    from diffad.defects import ALL_DEFECT_KINDS, VALIDATION_SCALE_RANGE, DefectSynthesizer

    split = load_mvtec(CATEGORIES[category], category, resolution=resolution, seed=seed)["validation"]
    x = images_to_tensor([row["image"] for row in split], resolution)
    scales = VALIDATION_SCALE_RANGE if max_scale is None else (VALIDATION_SCALE_RANGE[0], max_scale)
    synth = DefectSynthesizer(ALL_DEFECT_KINDS, textures=SHARED / "textures", scale_range=scales)
    held = len(x) // 2
    kinds = [ALL_DEFECT_KINDS[n % len(ALL_DEFECT_KINDS)] for n in range(held * copies)]
    calib, images, masks, labels = with_synthetic_defects(
        x, lambda img, n: synth(img, kind=kinds[n], generator=seed * 10_000 + n), copies=copies)
    return calib, images, masks, labels, ["good"] * held + kinds


def run_validation(model: Path, out_file: Path, category: str, seed: int, config, copies: int = 1,
                   max_scale: Optional[float] = None) -> None:
    """Calibrate a copy of ``model`` on half the validation split and score the other half with and without
    synthetic defects (:func:`validation_set`): every method and map's metrics -> ``out_file``."""
    import dataclasses as dc


    from diffad.metrics import compute_anomaly_metrics
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
    from diffad.pipelines.self_aware_inpaint import image_generator

    if out_file.is_file():
        return
    from diffad.precision import inference_device

    pipe = SelfAwareInpaintPipeline.from_pretrained(model).to(inference_device())
    pipe.set_progress_bar_config(disable=True)
    calib, images, masks, labels, kinds = validation_set(category, seed, pipe.resolution, copies, max_scale)
    from diffad.precision import resolve_precision

    config = dc.replace(config, precision=resolve_precision(PRECISION, pipe.device))
    pipe.calibrate(calib, config=config, generator=[image_generator(seed, im) for im in calib], batch_size=16)
    results: dict[str, Any] = {"num_images": int(len(images)), "kinds": sorted(set(kinds) - {"good"})}
    t0 = time.time()
    methods = ("self_aware",) if pipe.segmenter is not None else ("self_aware", "denoise")
    for method in methods:
        out = pipe(images, method=method, generator=[image_generator(seed, im) for im in images], batch_size=16)
        for name, maps in out.anomaly_maps.items():
            results[f"{method}/{name}"] = compute_anomaly_metrics(out.scores[name], labels, maps, masks)
            per_kind = {}
            for kind in results["kinds"]:  # each kind against the normal images
                keep = np.array([k in ("good", kind) for k in kinds])
                per_kind[kind] = compute_anomaly_metrics(out.scores[name][keep], labels[keep])["image_auroc"]
            results[f"{method}/{name}"]["image_auroc_per_kind"] = per_kind
    results["seconds_per_image"] = (time.time() - t0) / (len(methods) * len(images))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2))


def training_minutes(out: Path, category: str, seed: int) -> Optional[float]:
    path = cell_dir(out, category, seed) / "models" / category / "training_log.json"
    if not path.is_file():
        return None
    return float(json.loads(path.read_text())["summary"]["train_seconds"]) / 60


def phase_metrics(out: Path, category: str, seed: int, phase: str) -> Optional[dict[str, Any]]:
    path = cell_dir(out, category, seed) / f"{phase}_evaluation" / category / "metrics.json"
    return json.loads(path.read_text())["categories"][category] if path.is_file() else None


def validation_vs_test(out: Path, categories: Sequence[str], validation: str = "validation",
                       seed: int = 0) -> dict[str, Any]:
    """Does validation (synthetic defects on held-out good parts, the ``seed``'s split) predict the test split (the
    same seed's models)? Per category:
    each detector's image AUROC and AUPRO on both, the Spearman rank correlation of the detectors on each metric,
    and whether both pick the same best detector; plus the tiled-vs-whole-image choice made on validation.
    ``validation``: the results' folder suffix (``validation_copies6``, ``validation_scale16``: :mod:`bench_revalidate`'s)."""
    from scipy.stats import spearmanr

    result: dict[str, Any] = {}
    for category in categories:
        cell = cell_dir(out, category, seed)
        rows = {}
        for detector, (phase, key) in DETECTORS.items():
            val_path = cell / f"{phase}_{validation}" / category / "metrics.json"
            val_file = json.loads(val_path.read_text()) if val_path.is_file() else {}
            val = val_file.get(key)
            test = phase_metrics(out, category, seed, phase)
            rows[detector] = {"validation": val and {m: val.get(m) for m in ("image_auroc", "pixel_auroc", "aupro")},
                              "validation_images": val and val_file.get("num_images"),
                              "validation_per_kind": val and val.get("image_auroc_per_kind"),
                              "test": test and test.get(key) and {m: test[key].get(m)
                                                                  for m in ("image_auroc", "pixel_auroc", "aupro")}}
        both = {d: r for d, r in rows.items() if r["validation"] and r["test"]}
        agreement = {}
        for metric in ("image_auroc", "aupro"):
            names = [d for d in both if both[d]["validation"][metric] is not None and both[d]["test"][metric] is not None]
            if len(names) >= 3:
                v = [both[d]["validation"][metric] for d in names]
                t = [both[d]["test"][metric] for d in names]
                agreement[metric] = {"spearman": float(spearmanr(v, t).statistic), "detectors": len(names),
                                     "same_best": names[int(np.argmax(v))] == names[int(np.argmax(t))]}
        result[category] = {"detectors": rows, "agreement": agreement}
    return result


def validation_means(*vts: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per detector scored on validation in every category of :func:`validation_vs_test`'s results (one per seed):
    the mean of image AUROC, pixel AUROC and AUPRO over the (category, seed) cells, ``plain`` (each counts once)
    and ``pooled`` (each weighted by its validation images), with ``cells``. The validation sets range from 8 images
    (toothbrush) to 48 (tire): in the plain mean a category whose AUROC moves in steps of 0.04 weighs as much as
    one with steps of 0.002."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    blocks = [block for vt in vts for block in vt.values()]
    detectors = dict.fromkeys(d for block in blocks for d in block["detectors"])
    for detector in detectors:
        rows = [block["detectors"].get(detector) or {} for block in blocks]
        if not rows or not all(r.get("validation") and r.get("validation_images") for r in rows):
            continue
        weights = np.asarray([r["validation_images"] for r in rows], float)
        out[detector] = {"cells": len(rows)}
        for metric in ("image_auroc", "pixel_auroc", "aupro"):
            values = np.asarray([r["validation"][metric] for r in rows], float)
            out[detector][metric] = {"plain": float(values.mean()),
                                     "pooled": float((values * weights).sum() / weights.sum())}
    return out


def summarize(out: Path, categories: Sequence[str], seeds: Sequence[int]) -> dict[str, Any]:
    """Mean ± std over seeds per category and detector, and over seeds of the per-seed category mean."""
    runs: dict[str, dict[str, dict[int, dict[str, float]]]] = {}  # detector -> category -> seed -> metrics
    for category in categories:
        for seed in seeds:
            for detector, (phase, key) in DETECTORS.items():
                metrics = phase_metrics(out, category, seed, phase)
                if metrics and key in metrics:
                    runs.setdefault(detector, {}).setdefault(category, {})[seed] = metrics[key]

    def stats(values: list[dict[str, float]]) -> dict[str, Any]:
        result: dict[str, Any] = {"num_seeds": len(values)}
        for m in METRICS:
            vs = [v[m] for v in values if v.get(m) is not None and np.isfinite(v[m])]
            if vs:
                result[m] = {"mean": float(np.mean(vs)), "std": float(np.std(vs))}
        return result

    per_category = {c: {d: stats(list(by_category[c].values())) for d, by_category in runs.items() if c in by_category}
                    for c in categories if any(c in by_category for by_category in runs.values())}
    mean: dict[str, Any] = {}
    for detector, by_category in runs.items():
        cells = {(c, s): metrics for c, by_seed in by_category.items() for s, metrics in by_seed.items()}
        means = mean_over_categories(cells, categories, METRICS)
        if means:
            mean[detector] = {"num_seeds": min(v["n"] for v in means.values()),
                              **{m: {"mean": v["mean"], "std": v["std"]} for m, v in means.items()}}
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


def add_peer_rows(summary: dict[str, Any], peer_json: Path) -> None:
    """The peer's rows (``make bench-peer``: anomalib's DRAEM on the same categories, splits, resolution and
    seeds) beside diffad's, scored by its library's default and by the DRAEM paper's rule (11x11 mean filter, then
    max); nothing when the peer has not run."""
    if not peer_json.is_file():
        return
    peer = json.loads(peer_json.read_text())
    names = {"anomalib": "peer: anomalib DRAEM (its default score)", "mean11": "peer: DRAEM (paper: 11x11 mean, max)"}
    for category, entry in peer.get("categories", {}).items():
        block = summary["categories"].setdefault(category, {})
        for rule, name in names.items():
            metrics = entry["rules"][rule]
            block[name] = {"num_seeds": len(entry["seeds"]),
                           **{m: {"mean": v["mean"], "std": v["std"]} for m, v in metrics.items() if m in METRICS}}
    for rule, name in names.items():  # the mean over the peer's categories: per seed, then mean ± std over seeds
        means = peer.get("mean_over_categories", {}).get(rule, {})
        if means and all(isinstance(v, dict) and v.get("n") for v in means.values()):
            summary["mean_over_categories"][name] = {
                "num_seeds": min(v["n"] for v in means.values()),
                **{m: {"mean": v["mean"], "std": v["std"]} for m, v in means.items() if m in METRICS}}


def validation_markdown(vt: dict[str, Any], means: Optional[dict[str, Any]] = None) -> str:
    """The validation (seed 0, synthetic defects) against test table: image AUROC / AUPRO of each detector; then
    ``means`` (:func:`validation_means`, default: of ``vt`` alone)."""
    if not vt:
        return ""
    lines = ["", "### Validation (synthetic defects, seed 0) against test: image AUROC / AUPRO", "",
             "| category | detector | validation | test |", "|---|---|---|---|"]
    fmt = lambda r: "-" if not r else f"{r['image_auroc']:.3f} / {r['aupro'] if r['aupro'] is None else round(r['aupro'], 3)}"  # noqa: E731
    for category, block in vt.items():
        for detector, r in block["detectors"].items():
            if r["validation"] or r["test"]:
                lines.append(f"| {category} | {detector} | {fmt(r['validation'])} | {fmt(r['test'])} |")
        for metric, a in block["agreement"].items():
            lines.append(f"| {category} | rank agreement on {metric} | Spearman {a['spearman']:.2f} over "
                         f"{a['detectors']} detectors | same best: {a['same_best']} |")
    means = validation_means(vt) if means is None else means
    if means:
        lines += ["", "### Validation, mean over categories and seeds: plain / pooled (weighted by each cell's "
                  "validation images)", "", "| detector | cells | image AUROC | pixel AUROC | AUPRO |",
                  "|---|---|---|---|---|"]
        lines += [f"| {d} | {m['cells']} | " + " | ".join(f"{m[k]['plain']:.3f} / {m[k]['pooled']:.3f}"
                                                          for k in ("image_auroc", "pixel_auroc", "aupro")) + " |"
                  for d, m in means.items()]
    return "\n".join(lines) + "\n"


def run_cell(args: argparse.Namespace) -> int:
    category, seed, phase = args.run_cell.split(":")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    import torch

    torch.set_num_threads(1)
    if phase == "ddpm":
        run_ddpm_phase(Path(args.out), category, int(seed), args.ddpm_steps)
    else:
        run_eval_phase(Path(args.out), category, int(seed), phase)
    return 0


def run_cells(script: str, specs: Sequence[str], out: Path, log_name: str, extra: Sequence[str],
              jobs: int) -> list[str]:
    """Run ``script --run-cell <category:seed:phase> --out <out> <extra>`` for every spec, ``jobs`` at a time, each in
    its own one-thread process logging to ``<cell>/<log_name>`` (``{phase}`` in it: the spec's phase); returns the
    failed specs (logged too)."""
    def work(spec: str) -> int:
        category, seed, phase = spec.split(":")
        log = cell_dir(out, category, int(seed)) / log_name.format(phase=phase)
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with log.open("a") as handle:
            rc = subprocess.call([sys.executable, script, "--run-cell", spec, "--out", str(out), *extra],
                                 stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
        logger.info("%s: exit %d after %.1f min (log %s)", spec, rc, (time.time() - t0) / 60, log)
        return rc

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [spec for spec, rc in zip(specs, pool.map(work, specs)) if rc != 0]
    if failed:
        logger.info("failed cells (see their logs; a re-run resumes them): %s", failed)
    return failed


def run_one_or_all(run_cell: Optional[str], work: Callable[[str, int, str], None], script: str, cells: Sequence[str],
                   out: Path, log_name: str, extra: Sequence[str], jobs: int) -> None:
    """A companion script's entry (bench_recalibrate, bench_revalidate): with ``run_cell`` (``category:seed:phase``)
    do that one cell's ``work`` in this one-thread process; else run every cell of ``cells`` through
    :func:`run_cells` and exit non-zero if one failed."""
    if run_cell:
        import torch

        torch.set_num_threads(1)
        category, seed, phase = run_cell.split(":")
        work(category, int(seed), phase)
        return
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    failed = run_cells(script, cells, out, log_name, extra, jobs)
    if failed:
        raise SystemExit(f"failed: {failed} (see their logs; a re-run resumes)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_output/quality")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ddpm_steps", type=int, default=None,
                   help="DDPM optimiser steps per cell (default: the cpu preset's, as `diffad train`)")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                   help=f"comma-separated, from ddpm,{','.join(EVAL_PHASES)} (they run in that order)")
    p.add_argument("--jobs", type=int, default=2, help="cells run at once, one thread each")
    p.add_argument("--peer", default="bench_output/peer/peer.json", help="make bench-peer's results, shown beside")
    p.add_argument("--quick", action="store_true",
                   help="bottle and tire, one seed, 400 DDPM steps, the default phase, into <out>_quick (~30 min)")
    p.add_argument("--max_test_images", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:  # the <= 30 min iteration loop: two categories, one seed, 400 steps, the default detector
        args.seeds, args.ddpm_steps, args.out = "0", 400, args.out + "_quick"
        args.categories = "bottle,tire" if args.categories == ",".join(CATEGORIES) else args.categories
        args.phases = "ddpm,head" if args.phases == ",".join(DEFAULT_PHASES) else args.phases
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
    phases = [ph for ph in args.phases.split(",") if ph]
    if any(ph not in ("ddpm",) + EVAL_PHASES for ph in phases):
        p.error(f"--phases: choose from ddpm,{','.join(EVAL_PHASES)}; got {args.phases}")
    for phase in [ph for ph in ("ddpm",) + EVAL_PHASES if ph in phases]:
        run_cells(__file__, [f"{c}:{s}:{phase}" for s in seeds for c in categories], out, "{phase}.log",
                  ["--ddpm_steps", str(args.ddpm_steps)] if args.ddpm_steps else [], args.jobs)
    summary = summarize(out, categories, seeds)
    summary["budget"] = {"ddpm_steps": args.ddpm_steps or "cpu preset", "seeds": seeds, "preset": "cpu",
                         "working_resolution": 256, "crop_and_tile": 64,
                         "detectors": DETECTORS}
    summary["ddpm_train_minutes"] = {f"{c}/seed{s}": training_minutes(out, c, s) for c in categories for s in seeds}
    per_seed = {s: validation_vs_test(out, categories, seed=s) for s in seeds}
    summary["validation_vs_test"] = per_seed.get(0, {})
    summary["validation_means"] = validation_means(*per_seed.values())
    add_peer_rows(summary, Path(args.peer))
    summary["wall_minutes_this_run"] = (time.time() - start) / 60
    (out / "bench_quality.json").write_text(json.dumps(summary, indent=2))
    minutes = [m for m in summary["ddpm_train_minutes"].values() if m is not None]
    table = markdown(summary) + (f"\nDDPM training ({args.ddpm_steps or 1500} steps, one thread, --jobs {args.jobs}): "
                                 f"{np.mean(minutes):.1f} ± {np.std(minutes):.1f} minutes per cell "
                                 f"({len(minutes)} cells)\n" if minutes else "")
    table += validation_markdown(summary["validation_vs_test"], summary["validation_means"])
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
