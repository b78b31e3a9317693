"""``diffad evaluate``: run a pipeline over test splits; per-image scores, metrics, Table 4.1, Fig. 4.4.

Library entry point: :func:`evaluate_pipeline` (one category, one loaded pipeline). The command
``diffad evaluate`` (also ``python -m diffad.evaluation``, so ``accelerate launch -m
diffad.evaluation ...`` runs it on several processes) writes, under ``--out``:

* ``per_image.csv``: ``file, category, defect_type, label, method, map, score, decision, threshold``
  (decision ``defect`` / ``ok`` at that calibrated threshold, or ``unknown`` and no threshold where none was
  calibrated), written by diffad's one results writer (:mod:`diffad.results`);
* ``metrics.json``: per category and ``<method>/<map>``: image AUROC, image F1-max and its
  threshold, pixel AUROC, AUPRO, seconds per image, UNet passes per image, and for
  ``self_aware`` the inpainting-mask statistics (``mask_normal_share``, ``mask_defect_recall``,
  ``mask_precision``); plus the unweighted mean over categories; and ``metrics/<category>.json``
  with one category each;
* ``table.md``: the thesis's Table 4.1 form (rows: categories and the mean; columns:
  ``<method>/<map>``; each cell ``image AUROC (pixel AUROC / AUPRO)``), a seconds-per-image table
  (one column per method) and the self-aware mask statistics;
* ``figures/<category>.png``: Fig. 4.4-style rows of defective test images (original,
  reconstruction, noise-error map, inpainting mask, multi-scale map, learned map, ground truth).

One reconstruction, every map: each method runs ONCE per batch and every anomaly map evaluated
for it (``--anomaly-maps``; default: every map the model returns for that method,
``pipe.map_names(method)``) comes from that one output. So the seconds per image and the UNet
passes per image are per METHOD: every map of a method reports the same value, the method's
pipeline compute time summed over all processes and divided by the number of images (the cost of
one image on one worker, shared by all its maps).

Inpainting-mask statistics (``self_aware`` only; ``denoise`` masks nothing), over the test split:
``mask_normal_share`` is the mean share of pixels masked on normal (label 0) images (calibrated to
about ``1 - mask_percentile``); ``mask_defect_recall`` the share of ground-truth defect pixels that
were masked; ``mask_precision`` the share of the pixels masked on defective images that are defect
pixels. Each is None where it is undefined (no normal image, no defect pixel, nothing masked).

The sampler: a calibrated model runs the sampling config it was calibrated with
(``pipe.calibration.sampling``); ``--config fast|thesis`` only asserts which one that is and stops
with a one-line error when it is another (recalibrate with ``diffad calibrate --config ...``).

Model folders (``--model``): either one pipeline folder (holding ``model_index.json``), used
for the single category evaluated, or a folder with one pipeline folder per category named
after it: ``<model>/<category>/model_index.json`` (what ``--category all`` needs).

Distribution: the test images are cut into fixed batches (``--batch-size``) in dataset order;
the batches are split across processes (``Accelerator.split_between_processes``) and the
per-image results gathered (``gather_object``) and re-sorted. The noise of every image comes
from its own generator, :func:`diffad.pipelines.self_aware_inpaint.image_generator` of ``(seed, its pixels)``
(the one seeding rule of inference, as ``diffad detect``), never from its position, so any
number of processes gives exactly the metrics of one (the batches are the same); another
``--batch-size`` or image order draws the same noise, and moves scores only by the float
rounding of batched UNet arithmetic (about 1e-7).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffad.data import list_categories, load_mvtec
from diffad.detect import from_pretrained_quietly
from diffad.figures import FigureRow, inspection_figure
from diffad.metrics import compute_anomaly_metrics
from diffad.model_folder import MODEL_INDEX
from diffad.errors import report_error
from diffad.files import atomic_write_text
from diffad.pipelines.self_aware_inpaint import (MAP_NAMES, METHODS, SAMPLING_PRESETS, SamplingConfig, image_generator,
                                                threshold_key)
from diffad.precision import add_precision_assertion, check_network_precision, check_precision, inference_device
from diffad.results import calibration_hash, csv_text

__all__ = [
    "CategoryEvaluation",
    "MASK_KEYS",
    "check_config",
    "evaluate_pipeline",
    "evaluate_folder",
    "markdown_table",
    "mask_statistics",
    "mean_metrics",
    "register",
    "resolve_model_dir",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

CSV_FIELDS = ("file", "category", "defect_type", "label", "method", "map", "score", "decision", "threshold")
#: The inpainting-mask statistics recorded for ``self_aware`` (module docstring).
MASK_KEYS = ("mask_normal_share", "mask_defect_recall", "mask_precision")


@dataclass
class CategoryEvaluation:
    """What :func:`evaluate_pipeline` returns for one category (identical on every process).

    Attributes:
        category: the category name.
        records: one dict per image and ``<method>/<map>`` (the CSV's columns), in dataset order.
        metrics: ``{"<method>/<map>": {image_auroc, image_f1_max, image_f1_threshold, pixel_auroc,
            aupro, seconds_per_image, unet_passes_per_image, num_images}}``, plus :data:`MASK_KEYS` for
            ``self_aware``; seconds and passes are the method's, the same for each of its maps.
        figure_rows: :class:`diffad.figures.FigureRow` list for the Fig. 4.4-style panel.
        resolution: the model's resolution ``R`` (maps and masks are ``R x R``).
        sampling: the sampling config the pipeline ran (``SamplingConfig.to_dict()``), or None when unknown.
    """

    category: str
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    figure_rows: list[Any] = field(default_factory=list)
    resolution: int = 0
    sampling: Optional[dict[str, Any]] = None


def _mask_array(mask: Optional[Image.Image], resolution: int) -> np.ndarray:
    """A ground-truth mask (PIL, mode L) as ``(R, R)`` bool; None -> all False."""
    if mask is None:
        return np.zeros((resolution, resolution), dtype=bool)
    if mask.size != (resolution, resolution):
        mask = mask.resize((resolution, resolution), Image.Resampling.NEAREST)
    return np.asarray(mask.convert("L")) > 127


def _figure_indices(labels: Sequence[int], defect_types: Sequence[str], count: int) -> list[int]:
    """Up to ``count`` defective images, round-robin over defect types (first of each type first)."""
    by_type: dict[str, list[int]] = {}
    for i, (label, defect) in enumerate(zip(labels, defect_types)):
        if label == 1:
            by_type.setdefault(defect, []).append(i)
    chosen: list[int] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(chosen) < count and any(queues):
        for q in queues:
            if q and len(chosen) < count:
                chosen.append(q.pop(0))
    return sorted(chosen)


def mask_statistics(masked: Sequence[int], hits: Sequence[int], defect_pixels: Sequence[int],
                    labels: Sequence[int], pixels_per_image: int) -> dict[str, Optional[float]]:
    """The inpainting-mask statistics of a test split (module docstring), from per-image pixel counts.

    Args:
        masked: pixels masked in each image; hits: masked pixels that are ground-truth defect pixels;
        defect_pixels: ground-truth defect pixels of each image; labels: 1 = defective;
        pixels_per_image: ``R * R``.

    Returns:
        ``{"mask_normal_share", "mask_defect_recall", "mask_precision"}``, None where undefined.
    """
    masked, hits, gt = (np.asarray(v, dtype=np.float64) for v in (masked, hits, defect_pixels))
    labels = np.asarray(labels)
    normal, defective = labels == 0, labels == 1
    masked_on_defective = float(masked[defective].sum())
    return {
        "mask_normal_share": float(masked[normal].mean()) / pixels_per_image if normal.any() else None,
        "mask_defect_recall": float(hits.sum() / gt.sum()) if gt.sum() > 0 else None,
        "mask_precision": float(hits[defective].sum()) / masked_on_defective if masked_on_defective > 0 else None,
    }


def check_config(pipe, config: Union[None, str, Any], where: str = "the pipeline") -> Optional[dict[str, Any]]:
    """The sampling config ``pipe`` runs, as ``SamplingConfig.to_dict()`` (None when it cannot say).

    A calibrated pipeline runs its calibration's config; ``config`` (a preset name or a ``SamplingConfig``)
    must then be that one.

    Raises:
        ValueError: ``config`` is not a preset, or is not the config ``pipe`` was calibrated with (one line:
            recalibrate with ``diffad calibrate --config ...``).
    """
    if isinstance(config, str) and config not in SAMPLING_PRESETS:
        raise ValueError(f"--config must be one of {', '.join(SAMPLING_PRESETS)}; got {config!r}")
    wanted = None if config is None else SamplingConfig.from_preset(config)
    if not pipe.is_calibrated:
        return (wanted or SamplingConfig.fast()).to_dict()
    fitted = pipe.calibration.sampling  # raises for a diffad 0.1 calibration: recalibrate
    if wanted is not None and not fitted.matches(config):
        have = fitted.preset_name or "a custom"
        name = wanted.preset_name or "the wanted"
        raise ValueError(f"{where} was calibrated with the {have!r} sampling config, not {name!r}: recalibrate with "
                         f"`diffad calibrate --config {name} ...` (or evaluate without --config)")
    return fitted.to_dict()


def _maps_per_method(pipe, methods: Sequence[str], anomaly_maps: Optional[Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """``{method: maps to evaluate}``: every map the method returns (None), or those of ``anomaly_maps`` it has."""
    available = {m: tuple(pipe.map_names(m)) for m in methods}
    if anomaly_maps is None:
        return available
    for a in anomaly_maps:
        if a not in MAP_NAMES:
            raise ValueError(f"unknown anomaly map {a!r}; choose from {', '.join(MAP_NAMES)}")
    if "learned" in anomaly_maps and pipe.segmenter is None:
        raise ValueError("anomaly map 'learned' needs a segmenter in the model folder: train one with "
                         "training/train_segmenter.py, or leave 'learned' out of --anomaly-maps")
    chosen = {m: tuple(a for a in MAP_NAMES if a in anomaly_maps and a in available[m]) for m in methods}
    for m, names in chosen.items():
        if not names:
            raise ValueError(f"method {m!r} returns none of the anomaly maps {', '.join(anomaly_maps)} (its maps: "
                             f"{', '.join(available[m])}): add one of them or leave {m!r} out of --methods")
    return chosen


def evaluate_pipeline(
    pipe,
    dataset_split,
    *,
    methods: Optional[Sequence[str]] = None,
    anomaly_maps: Optional[Sequence[str]] = None,
    config: Union[None, str, Any] = None,
    batch_size: int = 8,
    seed: int = 0,
    accelerator=None,
    category: Optional[str] = None,
    num_figure_rows: int = 4,
    progress: bool = True,
) -> CategoryEvaluation:
    """Run ``pipe`` over a test split and compute the metrics for every method and map.

    Each method runs once per batch; every map evaluated for it comes from that one output.

    Args:
        pipe: a ``SelfAwareInpaintPipeline`` (calibrated for ``"self_aware"``).
        dataset_split: the ``test`` split of :func:`diffad.load_mvtec` (columns ``image``,
            ``mask``, ``label``, ``category``, ``defect_type``, ``file_name``).
        methods: any of the pipeline's ``METHODS`` (default: all of them).
        anomaly_maps: any of the pipeline's ``MAP_NAMES``; None: every map the model returns for each method
            (``pipe.map_names(method)``: ``multiscale``, ``learned`` with a segmenter, ``noise_error`` for
            ``self_aware``). Given, each method evaluates those of them it returns.
        config: None (run the calibration's sampling config), or a preset name / ``SamplingConfig`` that must
            equal it (``ValueError`` otherwise); for an uncalibrated pipeline (``denoise`` only), the config to run.
        batch_size: images per pipeline call; batches are formed in dataset order.
        seed: image ``x`` gets the generator ``diffad.pipelines.self_aware_inpaint.image_generator(seed, x)`` for every
            method (paired comparisons; the same noise whatever the batching, the order or the number of
            processes).
        accelerator: an ``accelerate.Accelerator`` to split the batches across processes; None = one.
        category: name for the records (default: the split's ``category`` column).
        num_figure_rows: defective images kept for the Fig. 4.4 panel.
        progress: show a tqdm bar (main process only).

    Returns:
        A :class:`CategoryEvaluation`, the same on every process.

    Raises:
        ValueError: unknown method or map, ``learned`` without a segmenter, a method that returns none of the
            maps asked for, another sampling config than the calibration's, a batch size < 1, or a test split on
            which a metric is undefined (e.g. no defective image).
    """
    methods, maps_of = _check_arguments(pipe, methods, anomaly_maps, batch_size)
    sampling = check_config(pipe, config)
    labels, defect_types, files, category = _split_columns(dataset_split, category)
    n, resolution = len(labels), int(pipe.resolution)
    run = _Batches(pipe, dataset_split, methods, maps_of, config, seed, resolution,
                   figure_indices=set(_figure_indices(labels, defect_types, num_figure_rows)),
                   figure_method="self_aware" if "self_aware" in methods else methods[0])
    pipe.set_progress_bar_config(disable=True)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    gathered, seconds = _run_on_processes(run, batches, accelerator, f"evaluate {category}", progress)

    per_method = _method_statistics(gathered, methods, seconds, labels, resolution)
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, Any]] = {}
    gt = np.stack([r["gt"] for r in gathered])
    has_pixels = bool(gt.any() and not gt.all())
    for method in methods:
        for kind in maps_of[method]:
            key = threshold_key(method, kind)
            scores = np.array([r["out"][key]["score"] for r in gathered], dtype=np.float64)
            maps = np.stack([r["out"][key]["map"] for r in gathered])
            values = compute_anomaly_metrics(scores, labels, maps if has_pixels else None, gt if has_pixels else None)
            metrics[key] = {**values, **per_method[method], "num_images": n}
            threshold = pipe.calibration.threshold(key) if pipe.is_calibrated else None  # what decided the rows
            records += [{"file": files[r["index"]], "category": category, "defect_type": defect_types[r["index"]],
                         "label": labels[r["index"]], "method": method, "map": kind, **_decision(r["out"][key], threshold)}
                        for r in gathered]
    return CategoryEvaluation(category=category, records=records, metrics=metrics,
                              figure_rows=_figure_rows(gathered, files), resolution=resolution, sampling=sampling)


def _check_arguments(pipe, methods: Optional[Sequence[str]], anomaly_maps: Optional[Sequence[str]],
                     batch_size: int) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The methods and each method's maps, or the first ``ValueError`` of :func:`evaluate_pipeline`'s arguments."""
    methods = list(METHODS if methods is None else methods)
    if not methods:
        raise ValueError("need at least one method")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if anomaly_maps is not None and not list(anomaly_maps):
        raise ValueError("need at least one anomaly map (or None for every map)")
    maps_of = _maps_per_method(pipe, methods, None if anomaly_maps is None else list(anomaly_maps))
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if "self_aware" in methods and not pipe.is_calibrated:
        raise ValueError("method 'self_aware' needs a calibrated model: run `diffad calibrate` on it first "
                         "(or evaluate --methods denoise)")
    return methods, maps_of


def _split_columns(dataset_split, category: Optional[str]) -> tuple[list[int], list[str], list[str], str]:
    """The test split's labels, defect types, file names and category (``category`` when given), or a
    ``ValueError`` for a split on which image AUROC is undefined (empty, or one class only)."""
    n = len(dataset_split)
    if n == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    labels = [int(v) for v in dataset_split["label"]]
    if len(set(labels)) < 2:  # before any model call: AUROC needs both classes
        only = "good" if labels[0] == 0 else "defective"
        raise ValueError(f"the test split has only {only} images ({n}): image AUROC needs good and defective test "
                         "images; add test/good/ and at least one test/<defect>/ folder with its ground_truth masks")
    files = list(dataset_split["file_name"]) if "file_name" in dataset_split.column_names else [str(i) for i in range(n)]
    if category is None:
        category = str(dataset_split["category"][0]) if "category" in dataset_split.column_names else ""
    return labels, list(dataset_split["defect_type"]), files, category


@dataclass
class _Batches:
    """One evaluation's model calls: ONE pipeline call per method and batch, every map of the method from it.

    A result per image: ``index`` (in the split), ``gt`` (its ``(R, R)`` defect mask), ``out`` (per
    ``<method>/<map>``: ``score``, ``decision`` (None without a threshold) and the ``(R, R)`` ``map``), ``passes``
    (UNet passes per method), ``mask_counts`` (``self_aware``: the masked pixels, and those on the defect) and, for
    the figure's images, ``figure`` (its panels)."""

    pipe: Any
    dataset_split: Any
    methods: list[str]
    maps_of: dict[str, tuple[str, ...]]
    config: Any
    seed: int
    resolution: int
    figure_indices: set[int]
    figure_method: str
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, batches: list[list[int]], bar: Any) -> list[dict[str, Any]]:
        """The results of ``batches`` (lists of split indices), ``bar`` advanced per image; :attr:`seconds` sums
        each method's call time."""
        self.seconds = {m: 0.0 for m in self.methods}
        results: list[dict[str, Any]] = []
        for batch in batches:
            results += self._batch(batch)
            bar.update(len(batch))
        return results

    def _batch(self, batch: list[int]) -> list[dict[str, Any]]:
        rows = [self.dataset_split[i] for i in batch]
        images = [row["image"].convert("RGB") for row in rows]
        results = [{"index": i, "gt": _mask_array(row.get("mask"), self.resolution), "out": {}, "passes": {}}
                   for i, row in zip(batch, rows)]
        for method in self.methods:
            generators = [image_generator(self.seed, image) for image in images]
            start = time.perf_counter()
            out = self.pipe(images, method=method, config=self.config, generator=generators, batch_size=len(batch),
                            output_type="np")
            self.seconds[method] += time.perf_counter() - start
            masks = np.asarray(out.inpaint_masks, dtype=bool)
            for j, res in enumerate(results):
                self._record(res, method, out, j, masks[j], images[j])
        return results

    def _record(self, res: dict[str, Any], method: str, out: Any, j: int, mask: np.ndarray,
                image: Image.Image) -> None:
        """Image ``j`` of ``method``'s output ``out`` (its inpainting ``mask``) into its result ``res``."""
        for kind in self.maps_of[method]:
            decisions = out.is_anomalous.get(kind)
            res["out"][threshold_key(method, kind)] = {
                "score": float(out.scores[kind][j]),
                "decision": None if decisions is None else bool(decisions[j]),
                "map": np.asarray(out.anomaly_maps[kind][j], dtype=np.float32),
            }
        res["passes"][method] = int(out.unet_passes[j])
        if method == "self_aware":
            res["mask_counts"] = (int(mask.sum()), int((mask & res["gt"]).sum()))
        if res["index"] in self.figure_indices and method == self.figure_method:
            res["figure"] = {kind: res["out"][threshold_key(method, kind)]["map"] for kind in self.maps_of[method]}
            res["figure"]["reconstruction"] = np.asarray(out.reconstructions[j])
            res["figure"]["inpainting_mask"] = mask
            res["figure"]["image"] = np.asarray(image.resize((self.resolution, self.resolution),
                                                             Image.Resampling.BICUBIC))


def _run_on_processes(run: _Batches, batches: list[list[int]], accelerator, desc: str,
                      progress: bool) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """Every image's result in split order, and each process's seconds per method: the batches split between the
    accelerator's processes (None: this one), a progress bar on the main process."""
    is_main = accelerator is None or accelerator.is_main_process

    def process(my_batches: list[list[int]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        bar = tqdm(total=sum(map(len, my_batches)), desc=desc, disable=not (progress and is_main), unit="img")
        local = run.run(my_batches, bar)
        bar.close()
        return local, run.seconds

    if accelerator is None or accelerator.num_processes == 1:
        gathered, seconds = process(batches)
        seconds_all = [seconds]
    else:
        from accelerate.utils import gather_object

        with accelerator.split_between_processes(batches) as my_batches:
            local, seconds = process(list(my_batches))
        gathered = gather_object(local)
        seconds_all = gather_object([seconds])
    gathered = sorted(gathered, key=lambda r: r["index"])
    n = sum(map(len, batches))
    if [r["index"] for r in gathered] != list(range(n)):
        raise RuntimeError(f"gathered {len(gathered)} results for {n} images: a process lost or repeated images")
    return gathered, seconds_all


def _method_statistics(gathered: list[dict[str, Any]], methods: list[str], seconds_all: list[dict[str, float]],
                       labels: list[int], resolution: int) -> dict[str, dict[str, Any]]:
    """Per method: seconds and UNet passes per image, and for ``self_aware`` the inpainting masks' statistics."""
    n = len(gathered)
    gt = np.stack([r["gt"] for r in gathered])
    per_method: dict[str, dict[str, Any]] = {}
    for method in methods:
        values: dict[str, Any] = {
            "seconds_per_image": sum(s[method] for s in seconds_all) / n,
            "unet_passes_per_image": float(np.mean([r["passes"][method] for r in gathered])),
        }
        if method == "self_aware":
            values.update(mask_statistics([r["mask_counts"][0] for r in gathered],
                                          [r["mask_counts"][1] for r in gathered],
                                          gt.reshape(n, -1).sum(axis=1), labels, resolution * resolution))
        per_method[method] = values
    return per_method


def _decision(out: dict[str, Any], threshold: Optional[float]) -> dict[str, str]:
    """The ``score``, ``decision`` and ``threshold`` cells of one image's row for one map."""
    decision = "unknown" if out["decision"] is None else ("defect" if out["decision"] else "ok")
    return {"score": f"{out['score']:.8g}", "decision": decision,
            "threshold": "" if threshold is None or out["decision"] is None else f"{threshold:.8g}"}


def _figure_rows(gathered: list[dict[str, Any]], files: list[str]) -> list[FigureRow]:
    """The Fig. 4.4 rows of the images chosen for it, in split order."""
    return [FigureRow(image=fig["image"], reconstruction=fig["reconstruction"], inpainting_mask=fig["inpainting_mask"],
                      multiscale_map=fig.get("multiscale"), learned_map=fig.get("learned"), ground_truth=r["gt"],
                      title=files[r["index"]], noise_error_map=fig.get("noise_error"))
            for r in gathered if (fig := r.get("figure")) is not None]


# ----------------------------------------------------------------------------- tables and files


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def mean_metrics(per_category: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """The unweighted mean over categories of every metric, per ``<method>/<map>`` (the table's last row);
    categories where a metric is undefined (None) are left out of its mean."""
    keys = sorted({k for cat in per_category.values() for k in cat})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        cats = [cat[key] for cat in per_category.values() if key in cat]
        names = sorted({m for c in cats for m in c if m not in ("num_images", "image_f1_threshold")})
        out[key] = {}
        for m in names:
            values = [c[m] for c in cats if _is_number(c.get(m))]
            out[key][m] = float(np.mean(values)) if values else None
        out[key]["num_categories"] = len(cats)
    return out


def _key_order(key: str) -> tuple[int, int, str]:
    method, _, kind = key.partition("/")
    return (METHODS.index(method) if method in METHODS else len(METHODS),
            MAP_NAMES.index(kind) if kind in MAP_NAMES else len(MAP_NAMES), key)


def markdown_table(per_category: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Table 4.1 form: rows = categories + mean, columns = ``<method>/<map>``; cells
    ``image AUROC (pixel AUROC / AUPRO)``; then seconds per image per method (shared by its maps) and, when
    recorded, the self-aware inpainting-mask statistics."""
    keys = sorted({k for cat in per_category.values() for k in cat}, key=_key_order)
    methods = list(dict.fromkeys(k.split("/")[0] for k in keys))
    mean = mean_metrics(per_category)
    header = "| category | " + " | ".join(keys) + " |"
    rule = "|---|" + "---|" * len(keys)

    def cell(values: Optional[dict[str, Any]]) -> str:
        if values is None:
            return "-"
        return f"{_fmt(values.get('image_auroc'))} ({_fmt(values.get('pixel_auroc'))} / {_fmt(values.get('aupro'))})"

    def method_values(category: str, method: str) -> Optional[dict[str, Any]]:
        return next((v for k, v in per_category[category].items() if k.split("/")[0] == method), None)

    lines = ["Image AUROC (pixel AUROC / AUPRO), per category and method/map.", "", header, rule]
    for category in sorted(per_category):
        lines.append(f"| {category} | " + " | ".join(cell(per_category[category].get(k)) for k in keys) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean.get(k))}**" for k in keys) + " |")
    lines += ["", "Seconds per image (UNet passes per image), per method: one reconstruction gives all its maps.", "",
              "| category | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for category in sorted(per_category):
        cells = []
        for method in methods:
            v = method_values(category, method)
            cells.append("-" if v is None else f"{v['seconds_per_image']:.3f} ({v['unet_passes_per_image']:.0f})")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    if any("mask_normal_share" in (method_values(c, "self_aware") or {}) for c in per_category):
        lines += ["", "Self-aware inpainting mask: share of normal pixels masked, share of defect pixels masked "
                  "(recall), share of masked pixels on defective images that are defects (precision).", "",
                  "| category | normal share | defect recall | precision |", "|---|---|---|---|"]
        for category in sorted(per_category):
            v = method_values(category, "self_aware") or {}
            lines.append(f"| {category} | " + " | ".join(_fmt(v.get(k)) for k in MASK_KEYS) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_outputs(results: Sequence[CategoryEvaluation], out_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``per_image.csv``, ``metrics.json``, ``metrics/<category>.json``, ``table.md`` and the figures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "per_image.csv", csv_text([r for result in results for r in result.records],
                                                          CSV_FIELDS))
    per_category = {r.category: r.metrics for r in results}
    for r in results:
        _write_json(out_dir / "metrics" / f"{r.category}.json", {"category": r.category, "metrics": r.metrics,
                                                                  "settings": settings})
    _write_json(out_dir / "metrics.json", {"categories": per_category, "mean": mean_metrics(per_category),
                                           "settings": settings})
    (out_dir / "table.md").write_text(markdown_table(per_category), encoding="utf-8")
    for r in results:
        if r.figure_rows:
            inspection_figure(r.figure_rows, out_dir / "figures" / f"{r.category}.png",
                              suptitle=f"{r.category}: {settings['figure_method']} reconstruction, R = {r.resolution}")


# ----------------------------------------------------------------------------- folders


def resolve_model_dir(model: Path, category: str, num_categories: int) -> Path:
    """The pipeline folder for ``category``: ``model/<category>`` if it holds a model, else ``model`` itself
    when it is a pipeline folder and only one category is evaluated.

    Raises:
        FileNotFoundError: neither exists.
    """
    if (model / category / MODEL_INDEX).is_file():
        return model / category
    if (model / MODEL_INDEX).is_file():
        if num_categories == 1:
            return model
        raise FileNotFoundError(f"{model} is one model but {num_categories} categories are evaluated: put one model "
                                f"per category in {model}/<category>/ (missing: {model / category})")
    raise FileNotFoundError(f"no model for category {category!r}: expected {model / category}/model_index.json "
                            f"or {model}/model_index.json (train one with `diffad train`)")


def evaluate_folder(
    model: str | os.PathLike,
    data: str | os.PathLike,
    category: str = "all",
    out_dir: str | os.PathLike = "evaluation",
    *,
    methods: Optional[Sequence[str]] = None,
    anomaly_maps: Optional[Sequence[str]] = None,
    config: Optional[str] = None,
    batch_size: int = 8,
    seed: int = 0,
    num_figure_rows: int = 4,
    accelerator=None,
    precision: Optional[str] = None,
) -> list[CategoryEvaluation]:
    """Evaluate saved model folder(s) on an MVTec AD-layout folder and write the outputs (main process).

    Args:
        model: a pipeline folder, or a folder of pipeline folders named after the categories.
        data: a dataset folder in MVTec AD layout (root of categories, or one category folder).
        category: a category name or ``"all"`` (every category found under ``data``).
        out_dir: where the CSV, JSON, Markdown and PNG files go.
        config: None, or the sampling preset (``"fast"``, ``"thesis"``) every model must be calibrated with.
        precision: None, or the precision (``"auto"``, ``"fp32"``, ``"bf16"``) every model must be calibrated in.
        Others: see :func:`evaluate_pipeline`.

    Returns:
        One :class:`CategoryEvaluation` per category.
    """
    methods = list(METHODS if methods is None else methods)
    model, data, out_dir = Path(model), Path(data), Path(out_dir)
    if not model.is_dir():
        raise FileNotFoundError(f"model folder not found: {model}")
    categories = list_categories(data) if category == "all" else [category]
    if not categories:
        raise FileNotFoundError(f"no MVTec AD category folders under {data} (expected <category>/test/...)")
    model_dirs = {c: resolve_model_dir(model, c, len(categories)) for c in categories}
    if accelerator is not None:
        device = accelerator.device
    else:
        device = inference_device()
    results, calibrations = [], {}
    for c in categories:
        pipe = from_pretrained_quietly(model_dirs[c], device=device)
        calibrations[c] = calibration_hash(pipe) if pipe.is_calibrated else None  # who made the results (diffad card)
        check_config(pipe, config, where=str(model_dirs[c]))
        check_precision(pipe, precision, str(model_dirs[c]))
        check_network_precision(pipe, str(model_dirs[c]))  # another export's networks swapped in (case 13)
        split = load_mvtec(data, c, resolution=int(pipe.resolution))["test"]
        logger.info("evaluating %s on %d test images of %r", model_dirs[c], len(split), c)
        results.append(evaluate_pipeline(pipe, split, methods=methods, anomaly_maps=anomaly_maps, config=config,
                                         batch_size=batch_size, seed=seed, accelerator=accelerator, category=c,
                                         num_figure_rows=num_figure_rows))
    if accelerator is None or accelerator.is_main_process:
        settings = {"model": str(model), "data": str(data), "methods": list(methods),
                    "anomaly_maps": sorted({k.split("/")[1] for r in results for k in r.metrics}),
                    "batch_size": batch_size, "seed": seed, "config": config,
                    "sampling": {r.category: r.sampling for r in results},
                    "num_processes": 1 if accelerator is None else accelerator.num_processes,
                    "figure_method": "self_aware" if "self_aware" in methods else list(methods)[0],
                    "model_dirs": {c: str(p) for c, p in model_dirs.items()}, "calibrations": calibrations}
        write_outputs(results, out_dir, settings)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return results


# ----------------------------------------------------------------------------- the command


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a pipeline folder, or a folder holding one pipeline folder per category (<model>/<category>)")
    parser.add_argument("--data", required=True, help="dataset folder in MVTec AD layout")
    parser.add_argument("--category", default="all", help="a category name, or 'all' (default) for every category found")
    parser.add_argument("--methods", default="self_aware,denoise",
                        help="comma-separated: self_aware, denoise (default: both); each runs once per batch")
    parser.add_argument("--anomaly-maps", default=None,
                        help="comma-separated maps to evaluate: multiscale, learned, noise_error, combined (default: "
                             "every map the model returns for each method: multiscale, learned when it has a "
                             "segmenter, and noise_error and combined for self_aware). All come from the same "
                             "reconstruction.")
    parser.add_argument("--config", default=None,
                        help="sampling preset the model must be calibrated with: fast or thesis (default: whatever "
                             "it was calibrated with; another one is an error: recalibrate with "
                             "`diffad calibrate --config ...`)")
    add_precision_assertion(parser, "evaluate")
    parser.add_argument("--out", required=True, help="output folder (CSV, JSON, table.md, figures/)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image diffusion noise (default: 0)")
    parser.add_argument("--figure-rows", type=int, default=4, help="defective images in each figure (default: 4)")


def register(subparsers) -> None:
    """Add ``diffad evaluate`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "evaluate", help="metrics, Table 4.1 and Fig. 4.4 on the test split of one or all categories",
        description="Run a trained, calibrated model over the test split: per_image.csv, metrics.json, table.md "
                    "and figures/<category>.png in --out. Several processes: accelerate launch -m "
                    "diffad.evaluation <same arguments>.")
    _add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad evaluate``; returns the exit code. User errors raise ValueError / FileNotFoundError."""
    methods = _csv_list(args.methods)
    maps = None if args.anomaly_maps is None else _csv_list(args.anomaly_maps)
    if not methods:
        raise ValueError(f"--methods: give at least one of {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    if maps is not None and not maps:
        raise ValueError(f"--anomaly-maps: give at least one of {', '.join(MAP_NAMES)}")
    for a in maps or []:
        if a not in MAP_NAMES:
            raise ValueError(f"--anomaly-maps: unknown map {a!r}; choose from {', '.join(MAP_NAMES)}")
    if args.config is not None and args.config not in SAMPLING_PRESETS:
        raise ValueError(f"--config: unknown sampling preset {args.config!r}; choose from "
                         f"{', '.join(SAMPLING_PRESETS)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    from diffad.launch import launched_accelerator

    with launched_accelerator() as accelerator:  # several processes under `accelerate launch`, else None
        results = evaluate_folder(args.model, args.data, args.category, args.out, methods=methods,
                                  anomaly_maps=maps, config=args.config, batch_size=args.batch_size, seed=args.seed,
                                  num_figure_rows=args.figure_rows, accelerator=accelerator,
                                  precision=args.precision)
    if accelerator is None or accelerator.is_main_process:
        per_category = {r.category: r.metrics for r in results}
        sys.stdout.write(markdown_table(per_category))
        sys.stdout.write(f"results in {args.out}\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m diffad.evaluation ...`` (and ``accelerate launch -m diffad.evaluation ...``)."""
    parser = argparse.ArgumentParser(prog="diffad evaluate", description=register.__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        return report_error("diffad evaluate", exc, 2)


if __name__ == "__main__":
    sys.exit(main())
