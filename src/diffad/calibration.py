"""``diffad calibrate``: fit a trained model's threshold map and pass/fail thresholds on held-out normal images.

:func:`calibrate_model` is the library call (the command, the demo and the benchmarks run it): it takes the
validation split the training run held out (:func:`training_split`, from ``training_log.json``), runs
``pipe.calibrate`` with a sampling config and a precision, and writes the folder back crash-safely. The calibration
it stores is the one owner of what every later call runs (sampler, precision, thresholds, target false-positive
rate); :func:`calibration_summary` says what it holds.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

from diffad.data import load_mvtec, split_fingerprint
from diffad.detect import from_pretrained_quietly
from diffad.errors import EXIT_OK
from diffad.files import save_pipeline
from diffad.model_folder import (CALIBRATION_COMPONENT, TRAINING_LOG, calibration_config, read_json,
                                 require_model_folder)
from diffad.networks import ExportedNetwork
from diffad.pipelines.self_aware_inpaint import SAMPLING_PRESETS, SamplingConfig, image_generator
from diffad.precision import DEFAULT_PRECISION, PRECISION_CHOICES, resolve_precision

__all__ = ["calibrate_model", "calibration_summary", "training_split", "register", "run"]

logger = logging.getLogger(__name__)


def calibrate_model(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    category: str,
    *,
    config: str | SamplingConfig = "fast",
    percentile: Optional[float] = None,
    precision: str = "auto",
    target_false_positive_rate: float = 0.05,
    seed: Optional[int] = None,
    validation_fraction: Optional[float] = None,
    batch_size: Optional[int] = None,
    allow_other_data: bool = False,
) -> Path:
    """Calibrate a saved pipeline on the validation split of its category and save it back.

    Loads ``SelfAwareInpaintPipeline.from_pretrained(model_dir)``, reads the normal validation
    images (the seeded ``validation_fraction`` of ``train/good``, as ``diffad.load_mvtec``
    splits them; use the same ``seed`` as training so they were never trained on), calls
    ``pipe.calibrate`` (threshold map ``Q_p`` and a pass/fail threshold for every method and map, with
    the sampling config every later call will run) and writes the folder back atomically
    (:func:`diffad.files.save_pipeline`, checkpoints and logs kept beside it). Each image's noise comes from ``seed`` and its pixels
    (:func:`diffad.pipelines.self_aware_inpaint.image_generator`), as in ``diffad detect``.

    Args:
        model_dir: a pipeline folder written by ``training/train_ddpm.py``.
        data: a folder in MVTec AD layout (root of categories or one category folder).
        category: the category the model was trained on.
        config: the sampling preset, one of ``SAMPLING_PRESETS`` (``"fast"``, ``"thesis"``), or a
            ``SamplingConfig``; ``diffad detect`` and ``diffad evaluate`` then run exactly it.
        percentile: overrides the preset's ``mask_percentile`` ``p`` in (0, 1) (None: the preset's).
        precision: the networks' arithmetic, ``"auto"`` (bf16 where the hardware has it natively, else fp32),
            ``"fp32"`` or ``"bf16"``; recorded in the calibration and run by every later call.
        target_false_positive_rate: fraction of normal images the image thresholds flag.
        seed: seeds the validation split and the calibration noise; None: the training run's (its
            ``training_log.json``), another value than the training run's is refused.
        validation_fraction: None: the training run's; another value is refused (the split would hold images the
            model was trained on). Without a training log: 0.2 and seed 0, with a warning.
        batch_size: images per UNet call (``None``: all at once).
        allow_other_data: calibrate even on validation images other than those the model was trained beside (by
            content, as ``training_log.json`` records them); without it they are refused.

    Returns:
        The model folder.

    Raises:
        FileNotFoundError: ``model_dir`` holds no ``model_index.json``.
        ValueError: a validation split of fewer than 4 images, an unknown preset or an invalid percentile / rate,
            a seed, validation fraction or category other than the training run's, validation images other than
            the training run's (unless ``allow_other_data``).
    """
    model_dir = require_model_folder(model_dir, fix="; train one with `diffad train` first")
    validation_fraction, seed = training_split(model_dir, category, validation_fraction, seed)
    sampling = _sampling_config(config, percentile, target_false_positive_rate)
    pipe = from_pretrained_quietly(model_dir)
    resolved = resolve_precision(precision, pipe.device)
    # `diffad export`'s networks run the precision they were built at
    exported = pipe.unet.precision if isinstance(pipe.unet, ExportedNetwork) else None
    if exported is not None and resolved != exported:
        if precision != "auto":
            raise ValueError(f"--precision {precision}: {model_dir} holds networks exported in {exported}; calibrate "
                             f"it with --precision {exported}, or export the torch model again at {precision}")
        resolved = exported
    sampling = dataclasses.replace(sampling, precision=resolved)
    pipe.set_progress_bar_config(disable=True)
    images = _validation_images(model_dir, data, category, pipe.resolution, validation_fraction, seed,
                                allow_other_data)
    logger.info("calibrating %s on %d validation images of %r (sampling config %s, %s)", model_dir, len(images),
                category, sampling.preset_name or sampling, sampling.precision)
    pipe.calibrate(images, config=sampling, target_false_positive_rate=target_false_positive_rate,
                   generator=[image_generator(seed, image) for image in images], batch_size=batch_size)
    save_pipeline(pipe, model_dir)
    return model_dir


def _sampling_config(config: str | SamplingConfig, percentile: Optional[float],
                     target_false_positive_rate: float) -> SamplingConfig:
    """The sampling config ``config`` names, with ``percentile`` as its ``mask_percentile`` when given; refuses a
    percentile or a target false-positive rate outside (0, 1)."""
    sampling = SamplingConfig.from_preset(config)
    if percentile is not None:
        if isinstance(percentile, bool) or not (isinstance(percentile, (int, float)) and 0.0 < percentile < 1.0):
            raise ValueError(f"--percentile must be in (0, 1), got {percentile}")
        sampling = dataclasses.replace(sampling, mask_percentile=float(percentile))
    if not 0.0 < target_false_positive_rate < 1.0:
        raise ValueError(f"--target-fpr must be in (0, 1), got {target_false_positive_rate}")
    return sampling


def _validation_images(model_dir: Path, data: str | os.PathLike, category: str, resolution: int,
                       validation_fraction: float, seed: int, allow_other_data: bool) -> list:
    """The normal validation images of ``category`` in ``data`` (the seeded split :func:`diffad.load_mvtec` makes).
    Refuses fewer than 4, and images other than those ``model_dir`` was trained beside (by content, as
    ``training_log.json`` records them) unless ``allow_other_data``, which only warns."""
    splits = load_mvtec(data, category, resolution=resolution,
                        validation_fraction=validation_fraction, seed=seed)
    validation = splits["validation"]
    if len(validation) < 4:
        raise ValueError(f"the validation split of {category!r} in {data} has {len(validation)} images and "
                         "calibration needs at least 4: raise --validation-fraction or add train/good images")
    trained_on = (_training_config(model_dir).get("data_fingerprint") or {}).get("validation")
    if trained_on is not None and split_fingerprint(validation) != trained_on:
        if not allow_other_data:
            raise ValueError(f"--data {data}: the validation images of {category!r} there are not the ones {model_dir} "
                             "was trained beside (their content differs from training_log.json's), and thresholds "
                             "calibrated on other data do not hold for the model: pass the training run's --data, "
                             "or --allow-other-data to calibrate on these anyway")
        logger.warning("WARNING: the validation images of %r in %s are not the ones %s was trained beside (their "
                       "content differs): calibrating on other data than the model's (--allow-other-data) gives "
                       "thresholds that may not hold for it", category, data, model_dir)
    return [row["image"] for row in validation]


def _training_config(model_dir: Path) -> dict:
    """The ``config`` of ``model_dir/training_log.json`` ({} when there is none)."""
    log = model_dir / TRAINING_LOG
    if not log.is_file():
        return {}
    try:
        return read_json(log).get("config") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{log} is unreadable ({exc}): restore it from the training run, or delete it and pass "
                         "--validation-fraction and --seed as in training") from None


#: What calibration uses when a model folder has no training log (a model trained elsewhere).
_SPLIT_DEFAULTS = {"validation_fraction": 0.2, "seed": 0}


def training_split(model_dir: Path, category: str, validation_fraction: Optional[float],
                   seed: Optional[int]) -> tuple[float, int]:
    """The validation split calibration must use: the training run's ``validation_fraction`` and ``seed`` (from
    ``training_log.json``), so it holds only images the model never trained on. A given value that differs from
    the training run's, or another category than it was trained on, is refused in one line (``ValueError``)."""
    trained = _training_config(model_dir)
    if trained.get("category") not in (None, category):
        raise ValueError(f"--category {category}: {model_dir} was trained on {trained['category']!r} "
                         f"(training_log.json); calibrate it on {trained['category']!r} images")
    chosen = {"validation_fraction": validation_fraction, "seed": seed}
    for key, flag in (("validation_fraction", "--validation-fraction"), ("seed", "--seed")):
        if trained.get(key) is None:
            if chosen[key] is None:
                chosen[key] = _SPLIT_DEFAULTS[key]
                logger.warning("%s has no training log: calibrating with %s %s; pass the training run's value if "
                               "it differs", model_dir, flag, chosen[key])
        elif chosen[key] is None:
            chosen[key] = trained[key]
        elif chosen[key] != trained[key]:
            raise ValueError(f"{flag} {chosen[key]}: {model_dir} was trained with {flag} {trained[key]} "
                             f"(training_log.json), and another split would calibrate on training images; drop "
                             f"{flag} to use the training run's")
    return float(chosen["validation_fraction"]), int(chosen["seed"])


def calibration_summary(model_dir: str | os.PathLike) -> str:
    """One line on a saved calibration: its sampling config, and what it measured on held-out normal images
    (the share of pixels masked, and each image threshold's false-positive rate against the target)."""
    try:
        cal = calibration_config(model_dir)
    except (OSError, ValueError):
        cal = None
    if cal is None:
        raise FileNotFoundError(f"{Path(model_dir) / CALIBRATION_COMPONENT}: no readable calibration; run "
                                "`diffad calibrate`")
    sampling = SamplingConfig.from_dict(cal["sampling_config"])
    share = cal.get("heldout_mask_share")
    share_text = "n/a" if share is None else f"{share:.3f} (expected about {1 - sampling.mask_percentile:.2f})"
    rates = ", ".join(f"{name} {rate:.3f}" for name, rate in zip(cal["threshold_names"],
                                                                  cal["heldout_false_positive_rates"]))
    return (f"sampling config {sampling.preset_name or 'custom'} (mask_percentile {sampling.mask_percentile:g}, "
            f"{sampling.precision}), "
            f"{cal['num_images']} normal images; held-out mask share {share_text}; held-out false-positive rate "
            f"(target {cal['target_false_positive_rate']:g}): {rates}")


def register(subparsers) -> None:
    """Add ``diffad calibrate`` to ``subparsers``."""
    passes = ", ".join(f"{name}: {SamplingConfig.from_preset(name).unet_passes('self_aware')}"
                       for name in SAMPLING_PRESETS)
    parser = subparsers.add_parser(
        "calibrate", help="fit the noise-error threshold map and pass/fail thresholds on normal images",
        description="Calibrate a trained model on the validation split (held-out train/good images) of "
                    "its category with a sampling config, and save the calibration into the model folder "
                    "(atomically). `diffad detect` and `diffad evaluate` then run exactly that config.")
    parser.add_argument("--model", required=True, help="the model folder written by `diffad train`")
    parser.add_argument("--data", required=True, help="dataset folder in MVTec AD layout")
    parser.add_argument("--category", required=True, help="the category the model was trained on")
    parser.add_argument("--config", choices=SAMPLING_PRESETS, default="fast",
                        help=f"sampling preset, the sampler every later call runs (UNet passes per image, "
                             f"{passes}; thesis is the thesis's sampler) (default: fast)")
    parser.add_argument("--percentile", type=float, default=None,
                        help="override the preset's per-pixel percentile p (mask_percentile) of the threshold "
                             "map Q_p, in (0, 1); lower gives larger inpainting masks (both presets: 0.8, the "
                             "thesis's)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="fraction of normal images the pass/fail thresholds may flag (default: 0.05)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=DEFAULT_PRECISION,
                        help="the networks' arithmetic, recorded in the calibration: auto (bf16 where the CPU has "
                             "AVX512-BF16/AMX or the GPU has bf16, else fp32), fp32 or bf16 (default: "
                             f"{DEFAULT_PRECISION})")
    parser.add_argument("--validation-fraction", type=float, default=None,
                        help="held-out fraction of train/good (default: the training run's, from its "
                             "training_log.json; another value is refused)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per UNet call (default: all)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seeds the validation split and the noise (default: the training run's, from its "
                             "training_log.json; another value is refused)")
    parser.add_argument("--allow-other-data", action="store_true",
                        help="calibrate even when the validation images differ (by content) from those the model "
                             "was trained beside; without it such a calibration is refused")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``diffad calibrate``: calibrate, save, and print what the calibration measured."""
    path = calibrate_model(args.model, args.data, args.category, config=args.config, percentile=args.percentile,
                           precision=args.precision, target_false_positive_rate=args.target_fpr, seed=args.seed,
                           validation_fraction=args.validation_fraction, batch_size=args.batch_size,
                           allow_other_data=args.allow_other_data)
    print(f"calibrated {path}: {calibration_summary(path)}")
    return EXIT_OK
