"""Model cards: the Hub README.md of a trained diffad model, with machine-readable results.

``make_model_card(model_dir, results)`` renders ``model_cards/template.md`` (installed as the package
``diffad.model_cards``) through ``huggingface_hub.ModelCard.from_template``. The YAML metadata
carries a ``model-index`` built from ``EvalResult`` objects (dataset, category, metric name and
value for every method and anomaly map), so the Hub and ``huggingface_hub`` parse the results;
the hyper-parameters come from ``training_log.json`` in the model folder, and what the calibration fixed (the
false-positive rate its thresholds were set for, the sampler, the precision, the number of normal images) from
the calibration component.

``diffad card --model DIR --results results.json`` writes ``DIR/README.md`` atomically.

Results format (what ``diffad evaluate`` writes, or any of these shapes):

* a list of rows ``{"category": ..., "method": ..., "anomaly_map": ..., "image_auroc": ..., ...}``;
* ``{"results": [rows]}`` or ``{"rows": [rows]}``;
* nested mappings ``{category: {method_label: {metric: value}}}`` (optionally under ``"metrics"``),
  where ``method_label`` is e.g. ``"self_aware/multiscale"``.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from diffad import __version__
from diffad.model_folder import (CALIBRATION_COMPONENT, CARD_FILE, CONFIG_FILE, MODEL_INDEX, SEGMENTER_LOG,
                                 TRAINING_LOG, calibration_config, components, require_model_folder)
from diffad.pipelines.self_aware_inpaint import SamplingConfig, threshold_key
from diffad.files import atomic_write_text

__all__ = [
    "METRICS",
    "ResultRow",
    "check_results_model",
    "normalize_results",
    "read_training_log",
    "template_path",
    "make_model_card",
    "write_model_card",
    "register",
    "run",
]

logger = logging.getLogger(__name__)

# metric key -> human name, in the order the table shows them.
METRICS: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "pixel_auroc": "Pixel AUROC",
    "aupro": "AUPRO",
    "image_f1_max": "Image F1-max",
}
TASK_TYPE = "anomaly-detection"
TASK_NAME = "Visual anomaly detection"


@dataclass(frozen=True)
class ResultRow:
    """The metrics of one (category, method, anomaly map) evaluation."""

    category: str
    method: str
    metrics: dict[str, float]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def _row_from_flat(row: Mapping[str, Any], category: Optional[str] = None) -> Optional[ResultRow]:
    metrics = {k: float(row[k]) for k in METRICS if _is_number(row.get(k))}
    if not metrics:
        return None
    method = str(row.get("method", "self_aware"))
    amap = row.get("anomaly_map")
    if amap and "/" not in method and method != "denoise":
        method = threshold_key(method, amap)
    elif amap and method == "denoise" and amap != "multiscale":
        method = threshold_key(method, amap)
    return ResultRow(str(row.get("category", category or "unknown")), method, metrics)


def normalize_results(results: Any) -> list[ResultRow]:
    """Turn any supported results shape (module docstring) into a list of :class:`ResultRow`.

    Raises:
        ValueError: no metric (``image_auroc``, ``pixel_auroc``, ``aupro``, ``image_f1_max``) found.
    """
    rows: list[ResultRow] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item, path)
            return
        if not isinstance(node, Mapping):
            return
        if any(_is_number(node.get(k)) for k in METRICS):
            if "category" in node or "method" in node:
                row = _row_from_flat(node, path[0] if path else None)
            else:
                row = ResultRow(path[0] if path else "unknown",
                                "/".join(path[1:]) or "self_aware",
                                {k: float(node[k]) for k in METRICS if _is_number(node.get(k))})
            if row is not None:
                rows.append(row)
            return
        for key, value in node.items():
            if key in ("results", "rows", "metrics", "per_category", "categories") and not path:
                walk(value, path)
            elif isinstance(value, (Mapping, list)):
                walk(value, path + (str(key),))

    if isinstance(results, Mapping) and isinstance(results.get("category"), str) and "metrics" in results:
        walk(results["metrics"], (results["category"],))  # diffad evaluate's metrics/<category>.json
    else:
        walk(results, ())
    # "mean"/"average" rows are summaries, not a category of their own
    rows = [r for r in rows if r.category.lower() not in ("mean", "average", "avg")]
    if not rows:
        raise ValueError(f"no metrics ({', '.join(METRICS)}) found in the results")
    return rows


def read_training_log(model_dir: str | os.PathLike) -> dict[str, Any]:
    """``training_log.json`` of the model folder as a dict (empty when absent or unreadable)."""
    path = Path(model_dir) / TRAINING_LOG
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s (%s)", path, exc)
        return {}


def template_path() -> Path:
    """The installed model-card template (``diffad.model_cards/template.md``)."""
    return Path(str(importlib.resources.files("diffad.model_cards").joinpath("template.md")))


def _config(log: Mapping[str, Any]) -> dict[str, Any]:
    for key in ("config", "args", "configuration", "hyperparameters"):
        if isinstance(log.get(key), Mapping):
            return dict(log[key])
    return {}


_HYPERPARAMETERS = (
    "data_dir", "category", "preset", "resolution", "block_out_channels", "layers_per_block",
    "attention_resolutions", "num_epochs", "optimizer", "max_train_steps",
    "max_train_minutes", "train_batch_size", "learning_rate", "lr_scheduler", "lr_warmup_steps",
    "adam_weight_decay", "gradient_accumulation_steps", "self_condition_prob", "use_ema", "ema_decay",
    "mixed_precision", "validation_fraction", "seed",
)


def _hyperparameters(config: Mapping[str, Any], log: Mapping[str, Any]) -> list[tuple[str, str]]:
    items = [(k, config[k]) for k in _HYPERPARAMETERS if k in config and config[k] is not None]
    summary = log.get("summary") if isinstance(log.get("summary"), Mapping) else log
    for key in ("total_optimizer_steps", "best_epoch", "best_val_loss", "saved_weights", "stopped_by",
                "train_seconds", "images_per_second", "num_parameters", "world_size"):
        if _is_number(summary.get(key)) or isinstance(summary.get(key), str):
            items.append((key, summary[key]))
    out = []
    for key, value in items:
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        out.append((key, str(value)))
    return out


_SEGMENTER_KEYS = ("num_synthetic", "normal_probability", "textures_dir", "sampling_preset", "train_batch_size",
                   "learning_rate", "focal_gamma", "focal_alpha", "bce_weight", "max_train_minutes", "seed")
_SEGMENTER_SUMMARY_KEYS = ("total_optimizer_steps", "stopped_by", "final_train_loss", "train_seconds",
                           "learned_threshold", "num_parameters")


def _segmenter_hyperparameters(model_dir: Path) -> list[tuple[str, str]]:
    """Rows of the segmenter table from ``segmenter_log.json`` (written by ``training/train_segmenter.py``)."""
    log = _read_json(model_dir / SEGMENTER_LOG)
    config = log.get("config") if isinstance(log.get("config"), Mapping) else {}
    summary = log.get("summary") if isinstance(log.get("summary"), Mapping) else {}
    items = [(k, config[k]) for k in _SEGMENTER_KEYS if config.get(k) is not None]
    items += [(k, summary[k]) for k in _SEGMENTER_SUMMARY_KEYS if summary.get(k) is not None]
    return [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in items]


def _eval_table(rows: list[ResultRow]) -> str:
    present = [k for k in METRICS if any(k in r.metrics for r in rows)]
    lines = ["| method / map | " + " | ".join(METRICS[k] for k in present) + " |",
             "|---|" + "---|" * len(present)]
    for row in rows:
        cells = [f"{row.metrics[k]:.3f}" if k in row.metrics else "-" for k in present]
        lines.append(f"| {row.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num_parameters(model_dir: Path) -> str:
    config_path = model_dir / "unet" / CONFIG_FILE
    weights = sorted((model_dir / "unet").glob("*.safetensors")) if (model_dir / "unet").is_dir() else []
    if weights:
        try:
            total = 0
            with safe_open(str(weights[0]), framework="np") as handle:
                for key in handle.keys():
                    total += int(math.prod(handle.get_slice(key).get_shape()))
            return f"{total / 1e6:.2f}M"
        except Exception:  # noqa: BLE001 - the count is informative only
            logger.debug("could not count parameters in %s", weights[0], exc_info=True)
    return "an unknown number of" if not config_path.is_file() else "(see unet/config.json)"


#: The template's fields about the calibration (:func:`_calibration_facts`).
_CALIBRATION_FACTS = ("target_fpr_percent", "calibration_images", "sampling_preset", "calibration_precision")


def _calibration_facts(model_dir: Path) -> dict[str, Any]:
    """What the card says about the calibration, read from the calibration component (the one owner of what runs):
    ``target_fpr_percent`` (the false-positive rate its thresholds were set for), ``calibration_images``,
    ``sampling_preset`` (``"fast"``, ``"thesis"``, ``"custom"``) and ``calibration_precision``; each None when the
    model is not calibrated (or, for the sampler, was calibrated by diffad 0.1, which did not record it)."""
    facts: dict[str, Any] = dict.fromkeys(_CALIBRATION_FACTS)
    try:
        calibration = calibration_config(model_dir) or {}
    except ValueError:
        logger.warning("ignoring the unreadable calibration of %s", model_dir)
        return facts
    fpr = calibration.get("target_false_positive_rate")
    if _is_number(fpr):
        facts["target_fpr_percent"] = f"{100 * float(fpr):g}%"
    if _is_number(calibration.get("num_images")):
        facts["calibration_images"] = int(calibration["num_images"])
    values = calibration.get("sampling_config")
    if isinstance(values, Mapping):
        try:
            sampling = SamplingConfig.from_dict(values)
        except (TypeError, ValueError):
            facts["sampling_preset"] = "custom"
        else:
            facts["sampling_preset"] = sampling.preset_name or "custom"
            facts["calibration_precision"] = sampling.precision
    return facts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def check_results_model(results: Any, model_dir: Path, category: str, where: str = "the results") -> None:
    """Refuse (``ValueError``, one line) results that ``diffad evaluate`` recorded as made by another model: its
    ``settings.calibrations[<category>]`` (the calibration's hash, :func:`diffad.results.calibration_hash`) must be
    ``model_dir``'s. Results that record no model (another tool's, or an older diffad's) are taken with a warning."""
    from diffad.results import folder_calibration_hash

    settings = results.get("settings") if isinstance(results, Mapping) else None
    recorded = settings.get("calibrations") if isinstance(settings, Mapping) else None
    if not isinstance(recorded, Mapping) or category not in recorded:
        logger.warning("%s do not say which model made them (no settings.calibrations, as `diffad evaluate` writes): "
                       "make sure they are %s's", where, model_dir)
        return
    mine = folder_calibration_hash(model_dir)
    if recorded[category] != mine:
        made_by = (settings.get("model_dirs") or {}).get(category) or settings.get("model") or "another model"
        raise ValueError(f"{where} were made by another model ({made_by}, calibration {recorded[category]}), not by "
                         f"{model_dir} (calibration {mine or 'none: not calibrated'}): evaluate this model (`diffad "
                         f"evaluate --model {model_dir} ...`) and pass its metrics.json")


def _data_source(config: Mapping[str, Any], category: str) -> dict[str, Any]:
    """What the training data says about itself (:func:`diffad.data.data_source`): as ``training_log.json`` recorded
    it at training, else read from the data folder now (a model trained by an older diffad), else nothing known."""
    from diffad.data import data_source

    recorded = config.get("data_source")
    if isinstance(recorded, Mapping):
        return {"license": None, "license_file": None, "dataset": None, **recorded}
    folder = config.get("resolved_data_dir") or config.get("data_dir")
    if folder and Path(str(folder)).is_dir():
        return data_source(str(folder), category)
    return {"license": None, "license_file": None, "dataset": None}


def _unknown_license(source: Mapping[str, Any], data_dir: str) -> str:
    """Raise the one-line error for a card whose licence no flag, log or licence file gives."""
    if source.get("license_file"):
        raise ValueError(f"{source['license_file']}: diffad does not recognise the licence of the training data; pass "
                         "--license with its Hub id (e.g. cc-by-nc-sa-4.0, apache-2.0, other)")
    raise ValueError(f"the training data ({data_dir or 'unknown'}) has no licence file (license.txt, LICENSE) and "
                     "training_log.json records none: pass --license with the licence the data allows (e.g. "
                     "cc-by-nc-sa-4.0 for MVTec AD, whose weights inherit it)")


def make_model_card(
    model_dir: str | os.PathLike,
    results: Any,
    *,
    repo_id: Optional[str] = None,
    category: Optional[str] = None,
    dataset_name: Optional[str] = None,
    dataset_type: Optional[str] = None,
    license: Optional[str] = None,
    seconds_per_image: Optional[Mapping[str, float]] = None,
    extra_tags: Iterable[str] = (),
):
    """Render the model card of ``model_dir`` with the evaluation ``results``.

    Args:
        model_dir: a diffad model folder (``model_index.json``, ``unet/``, ``training_log.json``).
        results: evaluation results in any shape :func:`normalize_results` accepts, or a path to a
            JSON file holding them. Only rows of ``category`` are kept.
        repo_id: the Hub id used in the "how to use" snippets (default ``<user>/diffad-<category>``).
        category: the model's category (default: ``training_log.json``'s, else the results' only one).
        dataset_name: a readable dataset name (default: from the training data folder).
        dataset_type: the dataset id in the metadata (default ``mvtec_ad`` or ``diffad-synthetic``).
        license: the model's licence (default: the training data's, as its licence file states it, recorded in
            ``training_log.json`` at training or read from the data folder: MVTec AD's ``cc-by-nc-sa-4.0`` is
            inherited by the weights; ``apache-2.0`` for diffad's synthetic data; none known is an error).
        seconds_per_image: ``{method: seconds}`` shown under the table (one reconstruction gives every map of a
            method, so seconds are per method; ``"<method>/<map>"`` labels are shown as given).
        extra_tags: added to the card's tags.

    Returns:
        A ``huggingface_hub.ModelCard``; ``card.data.eval_results`` holds one ``EvalResult`` per
        (method, metric).

    Raises:
        FileNotFoundError: ``model_dir`` is not a model folder.
        ValueError: no results for the category, or the category is ambiguous; results made by another model
            (:func:`check_results_model`); no ``license`` given and none known for the training data.
    """
    model_dir = require_model_folder(model_dir)
    results, where = _read_results(results)
    log = read_training_log(model_dir)
    config = _config(log)
    category, rows = _category_rows(normalize_results(results), category or config.get("category"))
    check_results_model(results, model_dir, str(category), where)
    data = _dataset_facts(config, str(category), dataset_type, dataset_name, license)
    card_data = _card_data(category, rows, data, extra_tags)
    present = components(_read_json(model_dir / MODEL_INDEX))
    has_segmenter, is_calibrated = "segmenter" in present, CALIBRATION_COMPONENT in present
    unet_config = _read_json(model_dir / "unet" / CONFIG_FILE)
    seconds = ", ".join(f"{m} {s:.2f} s/image" for m, s in (seconds_per_image or {}).items())
    calibration = _calibration_facts(model_dir) if is_calibrated else dict.fromkeys(_CALIBRATION_FACTS)
    return ModelCard.from_template(
        card_data, template_path=str(template_path()),
        model_name=f"diffad-{category}", category=category, repo_id=repo_id or f"your-username/diffad-{category}",
        dataset_name=data["dataset_name"], diffad_version=__version__, num_parameters=_num_parameters(model_dir),
        resolution=config.get("resolution") or unet_config.get("sample_size", "?"),
        tile_size=config.get("crop_size") or unet_config.get("sample_size"),
        has_segmenter=has_segmenter, is_calibrated=is_calibrated, **calibration,
        num_train_images=config.get("num_train_images"),
        data_license_note=data["data_license_note"], dataset_description=data["dataset_description"],
        hyperparameters=_hyperparameters(config, log), segmenter_hyperparameters=_segmenter_hyperparameters(model_dir),
        training_summary=_training_summary(log), eval_table=_eval_table(rows), seconds_per_image=seconds,
        default_map="combined")  # the self_aware default (SelfAwareInpaintPipeline.default_map)


def _card_data(category: str, rows: list[ResultRow], data: Mapping[str, Any], extra_tags: Iterable[str]):
    """The card's metadata (``ModelCardData``): licence, tags and one ``EvalResult`` per (method, metric) of
    ``rows``, on the dataset :func:`_dataset_facts` describes in ``data``."""
    eval_results = [
        EvalResult(task_type=TASK_TYPE, task_name=TASK_NAME, dataset_type=data["dataset_type"],
                   dataset_name=data["dataset_name"], dataset_config=str(category), dataset_split="test",
                   metric_type=key, metric_name=f"{METRICS[key]} ({row.method})", metric_value=round(value, 4),
                   metric_config=row.method)
        for row in rows for key, value in row.metrics.items()
    ]
    tags = ["anomaly-detection", "visual-inspection", "diffusion", "ddpm", "self-aware-inpainting",
            "diffad", "diffusers", *extra_tags]
    if data["is_mvtec"]:
        tags.append("mvtec-ad")
    return ModelCardData(
        model_name=f"diffad-{category}", library_name="diffusers", license=data["license"],
        tags=list(dict.fromkeys(tags)), metrics=[k for k in METRICS if any(k in r.metrics for r in rows)],
        eval_results=eval_results)


def _read_results(results: Any) -> tuple[Any, str]:
    """``results`` as given, or read from the JSON file when it is a path; and how errors name them (``"the
    results"``, or ``"--results <path>"``)."""
    if not isinstance(results, (str, os.PathLike)):
        return results, "the results"
    results_path = Path(results)
    if not results_path.is_file():
        raise FileNotFoundError(f"results file {results_path} does not exist: run `diffad evaluate` first")
    try:
        return json.loads(results_path.read_text(encoding="utf-8")), f"--results {results_path}"
    except json.JSONDecodeError as exc:
        raise ValueError(f"results file {results_path} is not valid JSON ({exc})") from exc


def _category_rows(rows: list[ResultRow], category: Optional[str]) -> tuple[str, list[ResultRow]]:
    """The card's category (None: the results' only one) and its rows, self_aware before denoise and multiscale
    before learned."""
    categories = sorted({r.category for r in rows})
    if category is None:
        if len(categories) != 1:
            raise ValueError(f"results hold several categories {categories}: pass --category")
        category = categories[0]
    order = {"self_aware": 0, "denoise": 1, "multiscale": 0, "learned": 1}
    rows = sorted((r for r in rows if r.category == category),
                  key=lambda r: tuple(order.get(part, 9) for part in r.method.split("/")) + (r.method,))
    if not rows:
        raise ValueError(f"no results for category {category!r} (the results hold {categories})")
    return category, rows


def _dataset_facts(config: Mapping[str, Any], category: str, dataset_type: Optional[str],
                   dataset_name: Optional[str], license: Optional[str]) -> dict[str, Any]:
    """What the card says of the training data (``is_mvtec``, ``dataset_type``, ``dataset_name``, ``license``,
    ``dataset_description``, ``data_license_note``): the given values, else what the data says of itself
    (:func:`_data_source`); no licence given or known is an error (:func:`_unknown_license`)."""
    data_dir = str(config.get("data_dir") or "")
    source = _data_source(config, category)
    if dataset_type is None:
        dataset_type = source["dataset"] or "custom"
    is_mvtec, is_synthetic = dataset_type == "mvtec_ad", dataset_type == "diffad-synthetic"
    if dataset_name is None:
        dataset_name = ("MVTec AD" if is_mvtec else "diffad synthetic default" if is_synthetic
                        else (Path(data_dir).name or "custom dataset"))
    license = license or source["license"] or _unknown_license(source, data_dir)
    if is_mvtec:
        dataset_description = (f"Normal (`train/good`) images of the category `{category}` of MVTec AD "
                               f"(Bergmann et al., CVPR 2019), from `{data_dir}`; 20% held out (seeded) for "
                               "validation and calibration.")
        data_license_note = ("Trained on MVTec AD, licensed CC BY-NC-SA 4.0: these weights are for "
                             "non-commercial use and inherit that license.")
    elif is_synthetic:
        dataset_description = (f"The diffad embedded default: procedurally generated normal images of the "
                               f"category `{category}` (`diffad.make_synthetic_dataset`), no download; defects "
                               "with exact masks for testing only. A demonstration model, not a production one.")
        data_license_note = ("A demonstration model trained on synthetic images: it says nothing about how "
                             "the method does on real parts.")
    else:
        dataset_description = (f"Normal (`train/good`) images of `{category}` from `{data_dir or 'a local folder'}`, "
                               "in MVTec AD layout; a seeded fraction held out for validation and calibration.")
        data_license_note = ""
    return {"is_mvtec": is_mvtec, "dataset_type": dataset_type, "dataset_name": dataset_name, "license": license,
            "dataset_description": dataset_description, "data_license_note": data_license_note}


def _training_summary(log: Mapping[str, Any]) -> str:
    """One sentence on the training curve: the last training and validation losses (from the log's ``history``
    series, else its epoch records)."""
    summary_bits = []
    history = log.get("history") if isinstance(log.get("history"), Mapping) else {}
    epochs = log.get("epochs") if isinstance(log.get("epochs"), list) else []
    for key, text in (("train_loss", "final training loss"), ("val_loss", "final validation loss")):
        series = log.get(key, history.get(key))
        if not isinstance(series, list):
            series = [e.get(key) for e in epochs if isinstance(e, Mapping) and _is_number(e.get(key))]
        if isinstance(series, list) and series and _is_number(series[-1]):
            summary_bits.append(f"{text} {float(series[-1]):.4g} after {len(series)} epochs")
    return ("Training curve: " + "; ".join(summary_bits) + ".") if summary_bits else ""


def write_model_card(card, model_dir: str | os.PathLike) -> Path:
    """Write ``card`` as ``model_dir/README.md`` atomically (temporary file, then rename)."""
    return atomic_write_text(Path(model_dir) / CARD_FILE, str(card))


def register(subparsers) -> None:
    """Add ``diffad card`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "card", help="write the model card (README.md with model-index metadata) into a model folder",
        description="Render the Hub model card of a trained model from its training_log.json and the "
                    "evaluation results, and write it as MODEL/README.md.")
    parser.add_argument("--model", required=True, help="the model folder")
    parser.add_argument("--results", required=True, help="results JSON written by `diffad evaluate`")
    parser.add_argument("--category", default=None, help="the model's category (default: from the training log)")
    parser.add_argument("--repo-id", default=None, help="Hub id shown in the usage snippets (ORG/NAME)")
    parser.add_argument("--license", default=None,
                        help="the model's licence, a Hub licence id (default: the training data's, from its licence "
                             "file, e.g. cc-by-nc-sa-4.0 for MVTec AD; required when the data has none)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad card``: exit 0, or 2 for a bad model folder or results file."""
    card = make_model_card(args.model, args.results, repo_id=args.repo_id, category=args.category,
                           license=args.license)
    path = write_model_card(card, args.model)
    print(f"model card written to {path}")
    return 0
