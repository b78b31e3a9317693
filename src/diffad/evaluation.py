"""``diffad evaluate``: run a pipeline over test splits; per-image scores, metrics, Table 4.1, Fig. 4.4.

Library entry point: :func:`evaluate_pipeline` (one category, one loaded pipeline). The command
``diffad evaluate`` (also ``python -m diffad.evaluation``, so ``accelerate launch -m
diffad.evaluation ...`` runs it on several processes) writes, under ``--out``:

* ``per_image.csv``: ``file, category, defect_type, label, method, map, score, decision``
  (decision ``defect`` / ``ok``, or ``unknown`` where no threshold was calibrated);
* ``metrics.json``: per category and ``<method>/<map>``: image AUROC, image F1-max and its
  threshold, pixel AUROC, AUPRO, seconds per image (pipeline compute time summed over all
  processes, divided by the number of images: the cost of one image on one worker), UNet
  passes per image; plus the unweighted mean over categories;
  and ``metrics/<category>.json`` with one category each;
* ``table.md``: the thesis's Table 4.1 form (rows: categories and the mean; columns: methods;
  each cell ``image AUROC (pixel AUROC / AUPRO)``) and a seconds-per-image table;
* ``figures/<category>.png``: Fig. 4.4-style rows of defective test images (original,
  reconstruction, inpainting mask, multi-scale map, learned map, ground truth).

Model folders (``--model``): either one pipeline folder (holding ``model_index.json``), used
for the single category evaluated, or a folder with one pipeline folder per category named
after it: ``<model>/<category>/model_index.json`` (what ``--category all`` needs).

Distribution: the test images are cut into fixed batches (``--batch-size``) in dataset order;
the batches are split across processes (``Accelerator.split_between_processes``) and the
per-image results gathered (``gather_object``) and re-sorted. The noise of image ``i`` comes
from its own generator seeded by ``(seed, i)`` only, so any number of processes gives exactly
the metrics of one.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from diffad.metrics import compute_anomaly_metrics

__all__ = [
    "CategoryEvaluation",
    "METHODS",
    "MAP_KINDS",
    "evaluate_pipeline",
    "evaluate_folder",
    "image_seed",
    "markdown_table",
    "register",
    "resolve_model_dir",
    "run",
    "main",
]

logger = logging.getLogger(__name__)

METHODS = ("self_aware", "denoise")
MAP_KINDS = ("multiscale", "learned")
CSV_FIELDS = ("file", "category", "defect_type", "label", "method", "map", "score", "decision")
METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold")


def image_seed(seed: int, index: int) -> int:
    """The noise seed of test image ``index``: a function of ``(seed, index)`` only (never of the rank)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class CategoryEvaluation:
    """What :func:`evaluate_pipeline` returns for one category (identical on every process).

    Attributes:
        category: the category name.
        records: one dict per image and ``<method>/<map>`` (the CSV's columns), in dataset order.
        metrics: ``{"<method>/<map>": {image_auroc, image_f1_max, image_f1_threshold, pixel_auroc,
            aupro, seconds_per_image, unet_passes_per_image, num_images}}``.
        figure_rows: :class:`diffad.figures.FigureRow` list for the Fig. 4.4-style panel.
        resolution: the model's resolution ``R`` (maps and masks are ``R x R``).
    """

    category: str
    records: list[dict[str, Any]]
    metrics: dict[str, dict[str, float]]
    figure_rows: list[Any] = field(default_factory=list)
    resolution: int = 0


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


def evaluate_pipeline(
    pipe,
    dataset_split,
    *,
    methods: Sequence[str] = METHODS,
    anomaly_maps: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    seed: int = 0,
    accelerator=None,
    category: Optional[str] = None,
    num_figure_rows: int = 4,
    pipeline_kwargs: Optional[dict[str, Any]] = None,
    progress: bool = True,
) -> CategoryEvaluation:
    """Run ``pipe`` over a test split and compute the metrics for every method and map.

    Args:
        pipe: a ``SelfAwareInpaintPipeline`` (calibrated for ``"self_aware"``).
        dataset_split: the ``test`` split of :func:`diffad.load_mvtec` (columns ``image``,
            ``mask``, ``label``, ``category``, ``defect_type``, ``file_name``).
        methods: any of ``"self_aware"``, ``"denoise"``.
        anomaly_maps: any of ``"multiscale"``, ``"learned"``; None: the thesis's columns, i.e.
            multiscale for every method plus ``self_aware/learned`` when the pipeline has a segmenter
            (the segmenter is trained on self-aware reconstructions, so ``denoise/learned`` is only
            run when asked for explicitly).
        batch_size: images per pipeline call; batches are formed in dataset order.
        seed: image ``i`` uses ``torch.Generator().manual_seed(image_seed(seed, i))`` for every method
            and map (paired comparisons; independent of batching and of the number of processes).
        accelerator: an ``accelerate.Accelerator`` to split the batches across processes; None = one.
        category: name for the records (default: the split's ``category`` column).
        num_figure_rows: defective images kept for the Fig. 4.4 panel.
        pipeline_kwargs: extra keyword arguments for ``pipe(...)`` (e.g. ``mode="reference"``).
        progress: show a tqdm bar (main process only).

    Returns:
        A :class:`CategoryEvaluation`, the same on every process.

    Raises:
        ValueError: unknown method or map, ``learned`` without a segmenter, a batch size < 1, or a
            test split on which a metric is undefined (e.g. no defective image).
    """
    from diffad.figures import FigureRow

    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    has_segmenter = getattr(pipe, "segmenter", None) is not None
    thesis_columns = anomaly_maps is None
    if anomaly_maps is None:
        anomaly_maps = ["multiscale"] + (["learned"] if has_segmenter else [])
    anomaly_maps = list(anomaly_maps)
    for a in anomaly_maps:
        if a not in MAP_KINDS:
            raise ValueError(f"unknown anomaly map {a!r}; choose from {', '.join(MAP_KINDS)}")
    if "learned" in anomaly_maps and not has_segmenter:
        raise ValueError("anomaly map 'learned' needs a segmenter in the model folder: train one with "
                         "training/train_segmenter.py, or use --anomaly-maps multiscale")
    if not methods or not anomaly_maps:
        raise ValueError("need at least one method and one anomaly map")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if "self_aware" in methods and not getattr(pipe, "is_calibrated", False):
        raise ValueError("method 'self_aware' needs a calibrated model: run `diffad calibrate` on it first "
                         "(or evaluate --methods denoise)")
    n = len(dataset_split)
    if n == 0:
        raise ValueError("the test split is empty: nothing to evaluate")
    combos = [(m, a) for m in methods for a in anomaly_maps
              if not (thesis_columns and (m, a) == ("denoise", "learned"))]
    resolution = int(pipe.resolution)
    labels = [int(v) for v in dataset_split["label"]]
    defect_types = list(dataset_split["defect_type"])
    files = list(dataset_split["file_name"]) if "file_name" in dataset_split.column_names else [str(i) for i in range(n)]
    if category is None:
        category = str(dataset_split["category"][0]) if "category" in dataset_split.column_names else ""
    figure_set = set(_figure_indices(labels, defect_types, num_figure_rows))
    figure_method = "self_aware" if "self_aware" in methods else methods[0]

    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    is_main = accelerator is None or accelerator.is_main_process
    pipeline_kwargs = dict(pipeline_kwargs or {})
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    def process(my_batches: list[list[int]]) -> tuple[list[dict[str, Any]], dict[str, float]]:
        local: list[dict[str, Any]] = []
        seconds = {f"{m}/{a}": 0.0 for m, a in combos}
        bar = tqdm(total=sum(map(len, my_batches)), desc=f"evaluate {category}", disable=not (progress and is_main),
                   unit="img")
        for batch in my_batches:
            rows = [dataset_split[i] for i in batch]
            images = [row["image"].convert("RGB") for row in rows]
            results = [{"index": i, "gt": _mask_array(row.get("mask"), resolution), "out": {}} for i, row in zip(batch, rows)]
            for method, kind in combos:
                generators = [torch.Generator().manual_seed(image_seed(seed, i)) for i in batch]
                start = time.perf_counter()
                out = pipe(images, method=method, anomaly_map=kind, generator=generators, batch_size=len(batch),
                           output_type="np", **pipeline_kwargs)
                seconds[f"{method}/{kind}"] += time.perf_counter() - start
                passes = getattr(out, "unet_passes_per_image", None)
                for j, res in enumerate(results):
                    decision = None if out.is_anomalous is None else bool(out.is_anomalous[j])
                    res["out"][f"{method}/{kind}"] = {
                        "score": float(out.scores[j]),
                        "decision": decision,
                        "map": np.asarray(out.anomaly_maps[j], dtype=np.float32),
                        "passes": int(passes[j]) if passes is not None else int(out.num_unet_passes),
                    }
                    if res["index"] in figure_set and method == figure_method:
                        res.setdefault("figure", {})[kind] = res["out"][f"{method}/{kind}"]["map"]
                        res["figure"]["reconstruction"] = np.asarray(out.reconstructions[j])
                        res["figure"]["inpainting_mask"] = np.asarray(out.masks[j], dtype=bool)
                        res["figure"]["image"] = np.asarray(images[j].resize((resolution, resolution),
                                                                             Image.Resampling.BICUBIC))
            local.extend(results)
            bar.update(len(batch))
        bar.close()
        return local, seconds

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
    if [r["index"] for r in gathered] != list(range(n)):
        raise RuntimeError(f"gathered {len(gathered)} results for {n} images: a process lost or repeated images")

    gt = np.stack([r["gt"] for r in gathered])
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {}
    for method, kind in combos:
        key = f"{method}/{kind}"
        scores = np.array([r["out"][key]["score"] for r in gathered], dtype=np.float64)
        maps = np.stack([r["out"][key]["map"] for r in gathered])
        has_pixels = gt.any() and not gt.all()
        values = compute_anomaly_metrics(scores, labels, maps if has_pixels else None, gt if has_pixels else None)
        values["seconds_per_image"] = sum(s[key] for s in seconds_all) / n
        values["unet_passes_per_image"] = float(np.mean([r["out"][key]["passes"] for r in gathered]))
        values["num_images"] = n
        metrics[key] = values
        for r in gathered:
            o = r["out"][key]
            decision = "unknown" if o["decision"] is None else ("defect" if o["decision"] else "ok")
            records.append({"file": files[r["index"]], "category": category, "defect_type": defect_types[r["index"]],
                            "label": labels[r["index"]], "method": method, "map": kind,
                            "score": f"{o['score']:.8g}", "decision": decision})

    figure_rows = []
    for r in gathered:
        fig = r.get("figure")
        if fig is None:
            continue
        i = r["index"]
        title = f"{files[i]}"
        figure_rows.append(FigureRow(image=fig["image"], reconstruction=fig["reconstruction"],
                                     inpainting_mask=fig["inpainting_mask"], multiscale_map=fig.get("multiscale"),
                                     learned_map=fig.get("learned"), ground_truth=r["gt"], title=title))
    return CategoryEvaluation(category=category, records=records, metrics=metrics, figure_rows=figure_rows,
                              resolution=resolution)


# ----------------------------------------------------------------------------- tables and files


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def mean_metrics(per_category: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """The unweighted mean over categories of every metric, per ``<method>/<map>`` (the table's last row)."""
    keys = sorted({k for cat in per_category.values() for k in cat})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        cats = [cat[key] for cat in per_category.values() if key in cat]
        names = sorted({m for c in cats for m in c if m not in ("num_images", "image_f1_threshold")})
        out[key] = {m: float(np.mean([c[m] for c in cats if m in c])) for m in names}
        out[key]["num_categories"] = len(cats)
    return out


def markdown_table(per_category: dict[str, dict[str, dict[str, float]]]) -> str:
    """Table 4.1 form: rows = categories + mean, columns = ``<method>/<map>``; cells
    ``image AUROC (pixel AUROC / AUPRO)``; then a seconds-per-image table."""
    keys = sorted({k for cat in per_category.values() for k in cat},
                  key=lambda k: (METHODS.index(k.split("/")[0]), MAP_KINDS.index(k.split("/")[1])))
    mean = mean_metrics(per_category)
    header = "| category | " + " | ".join(keys) + " |"
    rule = "|---|" + "---|" * len(keys)

    def cell(values: Optional[dict[str, float]]) -> str:
        if values is None:
            return "-"
        return f"{_fmt(values.get('image_auroc'))} ({_fmt(values.get('pixel_auroc'))} / {_fmt(values.get('aupro'))})"

    lines = ["Image AUROC (pixel AUROC / AUPRO), per category and method/map.", "", header, rule]
    for category in sorted(per_category):
        lines.append(f"| {category} | " + " | ".join(cell(per_category[category].get(k)) for k in keys) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{cell(mean.get(k))}**" for k in keys) + " |")
    lines += ["", "Seconds per image (UNet passes per image).", "", header, rule]
    for category in sorted(per_category):
        cells = []
        for k in keys:
            v = per_category[category].get(k)
            cells.append("-" if v is None else f"{v['seconds_per_image']:.3f} ({v['unet_passes_per_image']:.0f})")
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_json(path: Path, payload: Any) -> None:
    from diffad.training_utils import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_outputs(results: Sequence[CategoryEvaluation], out_dir: Path, settings: dict[str, Any]) -> None:
    """Write ``per_image.csv``, ``metrics.json``, ``metrics/<category>.json``, ``table.md`` and the figures."""
    from diffad.figures import inspection_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "per_image.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for result in results:
            writer.writerows(result.records)
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
    if (model / category / "model_index.json").is_file():
        return model / category
    if (model / "model_index.json").is_file():
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
    methods: Sequence[str] = METHODS,
    anomaly_maps: Optional[Sequence[str]] = None,
    batch_size: int = 8,
    seed: int = 0,
    num_figure_rows: int = 4,
    pipeline_kwargs: Optional[dict[str, Any]] = None,
    accelerator=None,
) -> list[CategoryEvaluation]:
    """Evaluate saved model folder(s) on an MVTec AD-layout folder and write the outputs (main process).

    Args:
        model: a pipeline folder, or a folder of pipeline folders named after the categories.
        data: a dataset folder in MVTec AD layout (root of categories, or one category folder).
        category: a category name or ``"all"`` (every category found under ``data``).
        out_dir: where the CSV, JSON, Markdown and PNG files go.
        Others: see :func:`evaluate_pipeline`.

    Returns:
        One :class:`CategoryEvaluation` per category.
    """
    from diffad.data import list_categories, load_mvtec
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

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
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for c in categories:
        pipe = SelfAwareInpaintPipeline.from_pretrained(model_dirs[c]).to(device)
        split = load_mvtec(data, c, resolution=int(pipe.resolution))["test"]
        logger.info("evaluating %s on %d test images of %r", model_dirs[c], len(split), c)
        results.append(evaluate_pipeline(pipe, split, methods=methods, anomaly_maps=anomaly_maps, batch_size=batch_size,
                                         seed=seed, accelerator=accelerator, category=c, num_figure_rows=num_figure_rows,
                                         pipeline_kwargs=pipeline_kwargs))
    if accelerator is None or accelerator.is_main_process:
        settings = {"model": str(model), "data": str(data), "methods": list(methods),
                    "anomaly_maps": sorted({k.split("/")[1] for r in results for k in r.metrics}),
                    "batch_size": batch_size, "seed": seed, "pipeline_kwargs": pipeline_kwargs or {},
                    "num_processes": 1 if accelerator is None else accelerator.num_processes,
                    "figure_method": "self_aware" if "self_aware" in methods else list(methods)[0],
                    "model_dirs": {c: str(p) for c, p in model_dirs.items()}}
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
                        help="comma-separated: self_aware, denoise (default: both)")
    parser.add_argument("--anomaly-maps", default=None,
                        help="comma-separated: multiscale, learned (default: the thesis's columns: multiscale for "
                             "every method, plus self_aware/learned when the model has a segmenter)")
    parser.add_argument("--out", required=True, help="output folder (CSV, JSON, table.md, figures/)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per pipeline call (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-image diffusion noise (default: 0)")
    parser.add_argument("--mode", choices=("fast", "reference"), default=None,
                        help="the pipeline's mode (default: the pipeline's default, 'fast')")
    parser.add_argument("--figure-rows", type=int, default=4, help="defective images in each figure (default: 4)")
    cost = parser.add_argument_group("pipeline levers (default: the mode's values; fewer steps = faster, cruder)")
    cost.add_argument("--inpaint-timesteps", type=int, default=None,
                      help="noise level T that inpainting and denoising start from (pipeline default: 50)")
    cost.add_argument("--num-inpaint-steps", type=int, default=None, help="strided inpainting steps")
    cost.add_argument("--resample-steps", type=int, default=None, help="UNet passes per inpainting step")
    cost.add_argument("--num-mask-timesteps", type=int, default=None, help="timesteps of the mask stage")
    cost.add_argument("--denoise-steps", type=int, default=None, help="strided steps of method 'denoise'")


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
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    for a in maps or []:
        if a not in MAP_KINDS:
            raise ValueError(f"--anomaly-maps: unknown map {a!r}; choose from {', '.join(MAP_KINDS)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by `accelerate launch` (or torchrun) on several processes
        from accelerate import Accelerator

        # CPU processes need cpu=True to form one gloo group (see STACK_NOTES.md).
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    levers = ("mode", "inpaint_timesteps", "num_inpaint_steps", "resample_steps", "num_mask_timesteps", "denoise_steps")
    kwargs = {k: getattr(args, k) for k in levers if getattr(args, k) is not None}
    results = evaluate_folder(args.model, args.data, args.category, args.out, methods=methods, anomaly_maps=maps,
                              batch_size=args.batch_size, seed=args.seed, num_figure_rows=args.figure_rows,
                              pipeline_kwargs=kwargs, accelerator=accelerator)
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
        from diffad.cli import report_error

        return report_error("evaluate", exc, 2)


if __name__ == "__main__":
    sys.exit(main())
