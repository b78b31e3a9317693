#!/usr/bin/env python
"""Train diffad's learned anomaly map: a DRAEM-style segmenter added to a trained, calibrated pipeline.

The method (DESIGN.md §1, "Anomaly map, learned"; Zavrtanik et al., "DRAEM", ICCV 2021,
https://arxiv.org/abs/2108.07610): synthetic anomalies (a thresholded Perlin-noise mask filled
with an augmented foreign texture, :mod:`diffad.anomalies`) are pasted into the category's
normal *training* images; the frozen DDPM reconstructs each of them by self-aware inpainting
(the pipeline's own ``__call__``, exactly as at inference); a stock ``UNet2DModel`` (6 in, 1 out,
called at timestep 0 through the pipeline's :func:`segmenter_logits`) learns to predict the
synthetic mask from ``cat[image, reconstruction]`` with focal loss (Lin et al. 2017,
https://arxiv.org/abs/1708.02002) plus binary cross-entropy. Thesis defaults: batch 32, lr 1e-3,
50 epochs.

The reconstructions are the expensive part (one full self-aware pass per synthetic image), so
they are computed once and cached on disk as a ``datasets`` dataset (``save_to_disk``). The
cache key hashes everything the reconstructions depend on: the UNet weight files, the
scheduler config, the calibration's threshold map ``Q_p`` and its sampling config (every lever
of the sampler: the pipeline runs exactly the config it was calibrated with), the synthesis
settings (textures, probabilities, seed, number of samples) and the normal training images
themselves. A rerun with the same inputs reuses the cache (and logs so); any change gives a new
key. The cache is written in shards, each renamed into place when complete, so an interrupted
build resumes where it stopped; with several processes each rank reconstructs its share of the
shards.

Run it (see ``--help`` for every flag)::

    python training/train_segmenter.py --model_dir ddpm-bottle \\
        --data_dir ../shared/data/mvtec_subset --category bottle --textures_dir ../shared/data/textures

    # or through accelerate (same flags), e.g. 2 CPU threads:
    accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --num_cpu_threads_per_process 2 training/train_segmenter.py --model_dir ddpm-bottle

``--data_dir``, ``--category`` and the validation split default to what ``train_ddpm.py``
recorded in ``<model_dir>/training_log.json``, so the segmenter sees the same training images
and its threshold is calibrated on the same held-out normal images. The segmenter is saved
INTO ``--model_dir`` as the pipeline component ``segmenter`` (each saved entry written under a
temporary name and renamed), and the pipeline is recalibrated with it in place: the same
sampling config, methods and validation images, each image's noise from
:func:`diffad.pipelines.self_aware_inpaint.image_generator` of the split seed and its pixels (what
``diffad calibrate`` does), so ``Q_p`` comes out as before and every threshold, the learned
map's included, is fitted with the segmenter. ``segmenter_log.json`` records the run
(``q_threshold_unchanged`` says whether ``Q_p`` was reproduced). Afterwards::

    pipe = SelfAwareInpaintPipeline.from_pretrained("ddpm-bottle")
    out = pipe(images)
    out.anomaly_maps["learned"], out.scores["learned"], out.is_anomalous["learned"]   # maps (B, R, R) in [0, 1]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from diffad.defects import (ALL_DEFECT_KINDS, DEFECT_KINDS, VALIDATION_SCALE_RANGE, DefectSynthesizer, check_kinds,
                            check_scale_range)
from diffad.pipelines.self_aware_inpaint.pipeline import (
    METHODS,
    SamplingConfig,
    SelfAwareInpaintPipeline,
    segmenter_logits,
    split_tiles,
)
from diffad.presets import count_parameters, make_segmenter
from diffad.errors import OneLineArgumentParser, run_with_clear_errors
from diffad.files import commit_directory, file_lock, incomplete_path, remove_incomplete, save_pipeline
from diffad.pipelines.self_aware_inpaint import image_generator, seeded_generator
from diffad.training_utils import (
    CHECKPOINT_MARKER,
    TrainingLog,
    TrainingProgress,
    holds_output_folder,
    parse_int_list,
    split_list,
    resolve_resume,
    resolve_training_args,
    save_checkpoint,
    time_budget_spent,
)

PROG = "train_segmenter.py"
logger = get_logger(__name__, log_level="INFO")

#: Bump when the cached dataset's layout or the way it is computed changes (part of the cache key).
CACHE_FORMAT_VERSION = 3
#: Environment variable that sets the default ``--cache_dir``.
CACHE_ENV = "DIFFAD_CACHE_DIR"
#: The run's log, written into ``--model_dir``.
LOG_NAME = "segmenter_log.json"
#: Default folder (inside ``--model_dir``) for resumable segmenter checkpoints.
CHECKPOINT_SUBDIR = "segmenter_checkpoints"
_STREAM_SYNTHESIS, _STREAM_RECONSTRUCTION, _STREAM_CROPS = 1, 2, 3
#: ``SelfAwareInpaintPipeline.calibrate`` needs at least 4 normal images (two folds of 2).
MIN_CALIBRATION_IMAGES = 4


# --------------------------------------------------------------------------- arguments


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse the command line (``argv``, default ``sys.argv[1:]``).

    Raises:
        SystemExit(2): a malformed flag (one line on stderr).
        ValueError: flags that are well-formed but out of range (see :func:`check_args`).
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def _parse_kinds(text: Union[str, Sequence[str]]) -> tuple:
    """``"scratch,pit"`` -> ``("scratch", "pit")`` (:func:`diffad.defects.check_kinds`)."""
    try:
        return check_kinds(tuple(split_list(text)))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (from {text!r})") from None


def _parse_scale_range(text: Union[str, Sequence[float]]) -> tuple:
    """``"1,8"`` -> ``(1.0, 8.0)`` (:func:`diffad.defects.check_scale_range`)."""
    try:
        return check_scale_range(tuple(float(v) for v in split_list(text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 < LOW <= HIGH, got {text!r}") from None


def build_parser() -> OneLineArgumentParser:
    """The script's flags, in groups: model and data, synthetic anomalies, the cache and the segmenter, optimisation,
    checkpoints and calibration."""
    p = OneLineArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_flags(p)
    _add_cache_and_segmenter_flags(p)
    _add_optimisation_flags(p)
    _add_checkpoint_flags(p)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    """The model folder, its data and the synthetic anomalies."""
    g = p.add_argument_group("model and data")
    g.add_argument("--model_dir", type=str, required=True,
                   help="A trained AND calibrated SelfAwareInpaintPipeline folder (train_ddpm.py, then "
                        "`diffad calibrate`); the segmenter is saved into it.")
    g.add_argument("--data_dir", type=str, default=None,
                   help="MVTec-AD-layout root or Hub dataset id. Default: the data train_ddpm.py recorded in "
                        "<model_dir>/training_log.json.")
    g.add_argument("--category", type=str, default=None,
                   help="Category under --data_dir. Default: the one recorded in training_log.json.")
    g.add_argument("--validation_fraction", type=float, default=None,
                   help="Share of train/good held out for calibration. Default: the DDPM's (training_log.json), "
                        "else 0.2. Keep the DDPM's value, so the threshold is fitted on images the DDPM never saw.")
    g.add_argument("--split_seed", type=int, default=None,
                   help="Seed of the train/validation split and of the recalibration's noise (as `diffad calibrate "
                        "--seed`). Default: the DDPM's --seed (training_log.json), else 0.")

    g = p.add_argument_group("synthetic anomalies (part of the cache key)")
    g.add_argument("--textures_dir", type=str, default=None,
                   help="Folder of texture photos (e.g. DTD) for the DRAEM blobs among the defects. Default: "
                        "diffad's built-in procedural textures (no download).")
    g.add_argument("--defect_kinds", type=_parse_kinds, default=DEFECT_KINDS,
                   help=f"Comma-separated defect kinds drawn in turn, from {','.join(ALL_DEFECT_KINDS)}.")
    g.add_argument("--defect_scale_range", type=_parse_scale_range, default=(1.0, 1.0),
                   help="LOW,HIGH: each defect's widths and radii times a log-uniform factor in it (diffad.defects; "
                        f"validation sets draw {','.join(str(int(v)) for v in VALIDATION_SCALE_RANGE)}).")
    g.add_argument("--num_synthetic", type=int, default=120,
                   help="Synthetic samples: training image i mod N with one defect (diffad.defects: the "
                        "--defect_kinds in turn), each reconstructed once at the working resolution.")
    g.add_argument("--validation_share", type=float, default=0.15,
                   help="Share of the synthetic samples held back: their validation loss picks the weights kept.")


def _add_cache_and_segmenter_flags(p: argparse.ArgumentParser) -> None:
    """The reconstruction cache and the segmenter's shape."""
    g = p.add_argument_group("reconstructions and their cache")
    g.add_argument("--cache_dir", type=str, default=None,
                   help=f"Where reconstructed training sets are cached (datasets.save_to_disk). Default: "
                        f"${CACHE_ENV} when set, else <parent of model_dir>/.diffad_cache.")
    g.add_argument("--overwrite_cache", action="store_true", help="Recompute the reconstructions even if cached.")
    g.add_argument("--reconstruction_batch_size", type=int, default=16, help="Images per DDPM reconstruction batch.")
    g.add_argument("--cache_shard_size", type=int, default=64,
                   help="Samples per cache shard (the unit of resumption when the reconstruction is interrupted).")

    g = p.add_argument_group("segmenter (make_segmenter defaults unless given)")
    g.add_argument("--segmenter_block_out_channels", type=parse_int_list, default=None,
                   help="Segmenter UNet widths per level, e.g. 32,64,128.")
    g.add_argument("--segmenter_layers_per_block", type=int, default=None, help="ResNet blocks per level.")
    g.add_argument("--segmenter_norm_num_groups", type=int, default=None, help="GroupNorm groups.")
    g.add_argument("--segmenter_attention_resolutions", type=parse_int_list, default=None,
                   help="Feature-map sizes (px) whose level gets self-attention (default: none).")


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    """Optimisation (thesis defaults)."""
    g = p.add_argument_group("optimisation (thesis defaults)")
    g.add_argument("--train_batch_size", type=int, default=16,
                   help="Crops per process per step (one crop of the segmenter's tile size per synthetic sample).")
    g.add_argument("--num_epochs", type=int, default=50, help="Epochs over the synthetic set, without --max_train_steps.")
    g.add_argument("--max_train_steps", type=int, default=600, help="Total optimiser steps; overrides --num_epochs.")
    g.add_argument("--validation_steps", type=int, default=100,
                   help="Measure the held-back validation loss every N steps (and at the end); the best weights are "
                        "kept.")
    g.add_argument("--max_train_minutes", type=float, default=None,
                   help="Stop training after this many minutes (summed over resumed runs; the cache build and the "
                        "threshold calibration are not counted).")
    g.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate (thesis: 1e-3).")
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   help='diffusers.optimization.get_scheduler name: "constant", "cosine", "linear", ...')
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up optimiser steps.")
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--focal_gamma", type=float, default=2.0, help="Focal-loss focusing parameter (DRAEM: 2).")
    g.add_argument("--focal_alpha", type=float, default=None,
                   help="Focal-loss weight of the defect class in (0, 1) (default: none, as DRAEM).")
    g.add_argument("--bce_weight", type=float, default=1.0,
                   help="Weight of the binary cross-entropy added to the focal loss (0 = focal only).")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g.add_argument("--seed", type=int, default=0,
                   help="Seeds the synthesis, the reconstruction noise, initialisation and shuffling.")


def _add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """Checkpoints and the recalibration."""
    g = p.add_argument_group("checkpoints, calibration, logging")
    g.add_argument("--checkpoint_dir", type=str, default=None,
                   help=f"Resumable checkpoints (checkpoint-<step>/). Default: <model_dir>/{CHECKPOINT_SUBDIR}.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest" (a fresh start when there is none) or a checkpoint folder.')
    g.add_argument("--target_false_positive_rate", type=float, default=None,
                   help="Share of normal validation images the recalibrated thresholds (the learned map's and "
                        "the others) flag. Default: the calibration's.")
    g.add_argument("--calibration_batch_size", type=int, default=None,
                   help="Images per UNet batch when recalibrating (default: all at once, as `diffad calibrate`). Give "
                        "the `diffad calibrate --batch-size` the model was calibrated with: batched arithmetic "
                        "rounds differently, and only the same batches reproduce Q_p bit for bit.")


def check_args(args: argparse.Namespace) -> None:
    """Reject out-of-range flag values with a ``ValueError`` naming the flag and the rule."""
    for key in ("train_batch_size", "num_epochs", "checkpointing_steps", "reconstruction_batch_size",
                "cache_shard_size"):
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    for key in ("max_train_steps", "max_train_minutes", "checkpoints_total_limit", "num_synthetic",
                "segmenter_layers_per_block", "segmenter_norm_num_groups", "calibration_batch_size"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key} must be positive, got {value}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    if not 0.0 < args.validation_share < 0.5:
        raise ValueError(f"--validation_share must be in (0, 0.5), got {args.validation_share}")
    if args.validation_steps <= 0:
        raise ValueError(f"--validation_steps must be positive, got {args.validation_steps}")
    if args.validation_fraction is not None and not 0.0 < args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in (0, 1) (the threshold needs validation images), "
                         f"got {args.validation_fraction}")
    if args.focal_gamma < 0:
        raise ValueError(f"--focal_gamma must be >= 0, got {args.focal_gamma}")
    if args.focal_alpha is not None and not 0.0 < args.focal_alpha < 1.0:
        raise ValueError(f"--focal_alpha must be in (0, 1), got {args.focal_alpha}")
    if args.bce_weight < 0:
        raise ValueError(f"--bce_weight must be >= 0, got {args.bce_weight}")
    if args.target_false_positive_rate is not None and not 0.0 < args.target_false_positive_rate < 1.0:
        raise ValueError(f"--target_false_positive_rate must be in (0, 1), got {args.target_false_positive_rate}")
    if args.textures_dir is not None and not Path(args.textures_dir).is_dir():
        raise FileNotFoundError(f"--textures_dir {args.textures_dir} is not a folder: pass a folder of texture "
                                "images (e.g. DTD) or omit it for the built-in procedural textures")


# --------------------------------------------------------------------------- the loss


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0,
               alpha: Optional[float] = None) -> torch.Tensor:
    """Binary focal loss (Lin et al. 2017), mean over all pixels.

    ``FL = -alpha_t (1 - p_t)^gamma log(p_t)`` with ``p_t`` the predicted probability of the true
    class; ``gamma = 0`` and no ``alpha`` is plain binary cross-entropy. Computed from logits
    (``log p_t = -BCE-with-logits``), so it is stable for confident predictions.

    Args:
        logits: ``(B, 1, R, R)`` (any shape) raw segmenter outputs.
        targets: same shape, in {0, 1} (1 = defect pixel).
        gamma: focusing parameter >= 0 (DRAEM: 2).
        alpha: optional weight in (0, 1) of the defect class (``1 - alpha`` for normal pixels).

    Returns:
        A scalar tensor.
    """
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = torch.exp(-bce)
    loss = (1.0 - p_t).pow(gamma) * bce
    if alpha is not None:
        loss = (alpha * targets + (1.0 - alpha) * (1.0 - targets)) * loss
    return loss.mean()


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, *, gamma: float = 2.0,
                      alpha: Optional[float] = None, bce_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """Focal loss plus ``bce_weight`` x binary cross-entropy (the thesis: focal + cross-entropy).

    Args:
        logits: ``(B, 1, R, R)`` segmenter logits; targets: ``(B, 1, R, R)`` in {0, 1}.

    Returns:
        ``{"loss": total, "focal": ..., "bce": ...}``, scalar tensors (``loss`` carries the gradient).
    """
    focal = focal_loss(logits, targets, gamma=gamma, alpha=alpha)
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return {"loss": focal + bce_weight * bce, "focal": focal, "bce": bce}


# --------------------------------------------------------------------------- model folder and data


def read_ddpm_config(model_dir: Path) -> Dict[str, Any]:
    """The configuration train_ddpm.py recorded in ``<model_dir>/training_log.json`` ({} when absent)."""
    path = model_dir / "training_log.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("config", {}))
    except (json.JSONDecodeError, AttributeError):
        logger.warning(f"could not read {path}; pass --data_dir, --category and the split flags explicitly")
        return {}


def load_calibrated_pipeline(model_dir: Path) -> SelfAwareInpaintPipeline:
    """Load the pipeline folder and check that it is calibrated (``Q_p`` stored).

    Raises:
        FileNotFoundError: no pipeline folder (no ``model_index.json``) at ``model_dir``.
        ValueError: the pipeline is not calibrated.
    """
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"--model_dir {model_dir} is not a pipeline folder (no model_index.json): pass the "
                                "output folder of train_ddpm.py")
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # a bar for loading two small components is noise
    try:
        pipe = SelfAwareInpaintPipeline.from_pretrained(str(model_dir))
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()
    if not pipe.is_calibrated:
        raise ValueError(f"the pipeline in {model_dir} is not calibrated: calibrate it on normal validation images "
                         "first (`diffad calibrate` or pipe.calibrate(images) + save_pretrained), then train the "
                         "segmenter")
    return pipe


def resolve_data(args: argparse.Namespace, model_dir: Path) -> Dict[str, Any]:
    """Fill ``data_dir``, ``category``, ``validation_fraction`` and ``split_seed`` from the flags, else from the
    DDPM's ``training_log.json``, else defaults. Returns the resolved values."""
    ddpm = read_ddpm_config(model_dir)
    if args.data_dir:
        data_dir, category = args.data_dir, args.category
    else:
        data_dir = ddpm.get("resolved_data_dir") or ddpm.get("data_dir")
        category = args.category or ddpm.get("category")
        if data_dir is None:
            raise ValueError(f"--data_dir is required: {model_dir}/training_log.json does not record the DDPM's data")
    fraction = args.validation_fraction if args.validation_fraction is not None else ddpm.get("validation_fraction", 0.2)
    split_seed = args.split_seed if args.split_seed is not None else ddpm.get("seed", 0)
    if not fraction or fraction <= 0:
        raise ValueError(f"the DDPM was trained without a validation split (validation_fraction={fraction}); pass "
                         "--validation_fraction > 0 to hold out normal images for the learned map's threshold")
    return {"data_dir": str(data_dir), "category": category, "validation_fraction": float(fraction),
            "split_seed": int(split_seed)}


def load_normal_images(data: Dict[str, Any], resolution: int) -> Tuple[torch.Tensor, List[Any], List[str], str]:
    """Normal training and validation images of the category.

    Returns:
        ``train`` ``(N, 3, R, R)`` float32 in [-1, 1]; the validation images as ``diffad.load_mvtec`` gives them
        (PIL, what ``diffad calibrate`` calibrates on); the training images' file names; the category's name.

    Raises:
        ValueError: no training images, or fewer than 4 validation images (the calibration needs them).
    """
    from diffad.data import images_to_tensor, list_categories, load_mvtec

    category = data["category"]
    if category is None and Path(data["data_dir"]).is_dir():
        categories = list_categories(data["data_dir"])
        if len(categories) != 1:
            raise ValueError(f"--category is required: {data['data_dir']} holds {len(categories)} categories "
                             f"({', '.join(categories) or 'none'})")
        category = categories[0]
    splits = load_mvtec(data["data_dir"], category, resolution=resolution,
                        validation_fraction=data["validation_fraction"], seed=data["split_seed"])
    train, val = splits["train"], splits["validation"]
    if len(train) == 0:
        raise ValueError(f"no normal training images in {data['data_dir']} (category {category})")
    if len(val) < MIN_CALIBRATION_IMAGES:
        raise ValueError(f"the validation split of {data['data_dir']} (category {category}) has {len(val)} image(s); "
                         f"recalibrating with the segmenter needs at least {MIN_CALIBRATION_IMAGES}: raise "
                         "--validation_fraction")
    names = list(train["file_name"]) if "file_name" in train.column_names else [str(i) for i in range(len(train))]
    name = train[0]["category"] if "category" in train.column_names else str(category)
    return images_to_tensor(train["image"], resolution), list(val["image"]), names, name


# --------------------------------------------------------------------------- the reconstruction cache


def _sha256_weights(folder: Path) -> str:
    """sha256 over the names and bytes of the weight files (``*.safetensors``, ``*.bin``) under ``folder``.

    Configs are hashed separately, as parsed values: diffusers writes the folder a model was loaded from into
    ``config.json`` (``_name_or_path``) when it re-saves it, which must not change a key.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin")):
        h.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _sha256_tensor(tensor: torch.Tensor) -> str:
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def inference_settings(sampling: SamplingConfig) -> Dict[str, Any]:
    """What the reconstructions depend on besides the weights and the inputs: the method, the sampling config
    (every lever of the sampler, :meth:`SamplingConfig.to_dict`) and the output range."""
    return {"method": "self_aware", "sampling": sampling.to_dict(), "reconstructions": "pt, [-1, 1]"}


def reconstruction_cache_key(
    pipe: SelfAwareInpaintPipeline,
    model_dir: Path,
    *,
    synthesis: Dict[str, Any],
    inference: Dict[str, Any],
    train_images: torch.Tensor,
    train_file_names: Sequence[str],
) -> Tuple[str, Dict[str, Any]]:
    """The cache key of a reconstructed synthetic training set.

    It hashes: the UNet's weight files (``<model_dir>/unet``) and config, the scheduler's config, the
    calibration parts that shape the reconstructions (``Q_p``, the resolution and the calibration's sampling
    config dict, which holds every lever of the mask and of the inpainting; not the image thresholds, which adding
    a segmenter changes), ``inference`` (:func:`inference_settings`), ``synthesis`` (synthesiser config, seed,
    number of samples) and the normal training images (file names and pixel values as loaded, so a resized or
    edited image changes it).

    Returns:
        ``(key, payload)``: a 20-hex-digit key and the JSON-able description it was hashed from.
    """
    cal = pipe.calibration
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "unet_weights_sha256": _sha256_weights(model_dir / "unet"),
        "unet_config": {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")},
        "scheduler": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "calibration": {
            "q_threshold_sha256": _sha256_tensor(cal.q_threshold),
            "resolution": cal.config.get("resolution"),
            "sampling_config": cal.config.get("sampling_config"),
        },
        "inference": inference,
        "synthesis": synthesis,
        "data": {"file_names_sha256": hashlib.sha256("\n".join(train_file_names).encode()).hexdigest(),
                 "pixels_sha256": _sha256_tensor(train_images), "num_images": int(train_images.shape[0])},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], payload


def default_cache_dir(model_dir: Path) -> Path:
    """``$DIFFAD_CACHE_DIR`` when set, else ``<parent of model_dir>/.diffad_cache``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else model_dir.resolve().parent / ".diffad_cache"


def cache_features(resolution: int) -> datasets.Features:
    """Columns of the cached set: ``image`` (3, R, R) float32 in [-1, 1] (the synthetic anomalous image),
    ``reconstruction`` (3, R, R) float32 in [-1, 1] (its self-aware reconstruction), ``noise_ratio`` (1, R, R)
    float32 (its ``Q / Q_p``), ``mask`` (1, R, R) uint8 in {0, 1}, ``index`` (the sample's number) and
    ``source_index`` (the normal training image it was made from)."""
    r = int(resolution)
    return datasets.Features({
        "index": datasets.Value("int64"),
        "source_index": datasets.Value("int64"),
        "image": datasets.Array3D(shape=(3, r, r), dtype="float32"),
        "reconstruction": datasets.Array3D(shape=(3, r, r), dtype="float32"),
        "noise_ratio": datasets.Array3D(shape=(1, r, r), dtype="float32"),
        "mask": datasets.Array3D(shape=(1, r, r), dtype="uint8"),
    })


def synthesize(synthesizer: DefectSynthesizer, train_images: torch.Tensor, indices: Sequence[int],
               seed: int) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Synthetic samples ``indices``: sample ``i`` draws one defect of kind ``i mod K`` (the synthesiser's kinds
    in turn) on training image ``i mod N`` with a generator derived from ``(seed, i)``, so every sample is the
    same however the work is split.

    Returns:
        ``(images (n, 3, R, R) in [-1, 1], masks (n, 1, R, R) in {0, 1}, source indices)``.
    """
    n = train_images.shape[0]
    images, masks, sources = [], [], []
    for i in indices:
        src = int(i) % n
        image, mask = synthesizer(train_images[src], kind=synthesizer.kinds[int(i) % len(synthesizer.kinds)],
                                  generator=seeded_generator(seed, _STREAM_SYNTHESIS, int(i)))
        images.append(image)
        masks.append(mask)
        sources.append(src)
    return torch.stack(images), torch.stack(masks), sources


def reconstruct(pipe: SelfAwareInpaintPipeline, images: torch.Tensor, generators: List[torch.Generator], *,
                batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Self-aware reconstructions with the frozen DDPM: the pipeline's own ``__call__``, as at inference (with
    the sampling config it was calibrated with).

    Args:
        images: ``(B, 3, R, R)`` in [-1, 1]; generators: one per image.

    Returns:
        ``(B, 3, R, R)`` float32 in [-1, 1] (the range of ``output_type="pt"``) and the noise error ``Q / Q_p``
        ``(B, 1, R, R)``, on the CPU.
    """
    out = pipe(images, method="self_aware", generator=generators, batch_size=batch_size, output_type="pt")
    return out.reconstructions.float().cpu().clamp(-1.0, 1.0), out.noise_ratios.float().cpu().unsqueeze(1)


def recalibrate(pipe: SelfAwareInpaintPipeline, images: Sequence[Any], *, seed: int,
                target_false_positive_rate: float, batch_size: Optional[int]) -> bool:
    """Recalibrate ``pipe`` with its segmenter in place, so that every threshold (the learned map's included)
    is fitted on the same reconstructions.

    Runs ``pipe.calibrate`` with the calibration's own sampling config and methods, on ``images`` (the normal
    validation images), each image's noise from ``image_generator(seed, image)``: what ``diffad calibrate
    --seed <seed>`` does on the same split, so ``Q_p`` comes out unchanged, bit for bit, when the model was
    calibrated that way with the same ``batch_size`` (batched UNet arithmetic rounds differently).

    Returns:
        Whether ``Q_p`` is unchanged (when not, the segmenter was trained on reconstructions masked with the
        previous ``Q_p``, and a rerun finds no cached reconstructions for the new one).
    """
    cal = pipe.calibration
    names = list(cal.config.threshold_names)
    methods = tuple(m for m in METHODS if any(n.startswith(f"{m}/") for n in names)) or METHODS
    previous = cal.q_threshold.detach().cpu().clone()
    pipe.calibrate(images, config=cal.sampling, target_false_positive_rate=target_false_positive_rate,
                   methods=methods, generator=[image_generator(seed, image) for image in images],
                   batch_size=batch_size)
    return bool(torch.equal(previous, pipe.calibration.q_threshold.detach().cpu()))


def build_reconstruction_cache(
    pipe: SelfAwareInpaintPipeline,
    accelerator: Accelerator,
    cache_path: Path,
    *,
    synthesizer: DefectSynthesizer,
    train_images: torch.Tensor,
    num_synthetic: int,
    seed: int,
    batch_size: int,
    shard_size: int,
    key_payload: Dict[str, Any],
) -> None:
    """Synthesise ``num_synthetic`` samples, reconstruct them and save them at ``cache_path`` (``save_to_disk``).

    Shards of ``shard_size`` samples are written to ``<cache_path>.partial/shard-<k>`` (each under a temporary
    name, then renamed) and skipped when a rerun finds them complete, so an interrupted build resumes. Rank ``r``
    of ``W`` processes computes shards ``r, r + W, ...``; the main process then joins the shards into the final
    dataset (again written under a temporary name and renamed) and removes the partial folder.
    """
    partial = cache_path.parent / f"{cache_path.name}.partial"
    num_shards = math.ceil(num_synthetic / shard_size)
    features = cache_features(train_images.shape[-1])
    if accelerator.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        remove_incomplete(partial)
        (partial / "key.json").write_text(json.dumps(key_payload, indent=2, sort_keys=True, default=str))
    accelerator.wait_for_everyone()
    mine = [k for k in range(num_shards) if k % accelerator.num_processes == accelerator.process_index]
    todo = [k for k in mine if not (partial / f"shard-{k:05d}").is_dir()]
    if len(todo) < len(mine):
        logger.info(f"resuming the reconstruction cache: {len(mine) - len(todo)} of {len(mine)} shard(s) done",
                    main_process_only=False)
    n_todo = sum(min(shard_size, num_synthetic - k * shard_size) for k in todo)
    progress = tqdm(total=n_todo, desc="reconstructing synthetic anomalies", unit="img",
                    disable=not accelerator.is_local_main_process)
    pipe.set_progress_bar_config(disable=True)
    for k in todo:
        indices = list(range(k * shard_size, min((k + 1) * shard_size, num_synthetic)))
        columns: Dict[str, List[Any]] = {name: [] for name in features}
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images, masks, sources = synthesize(synthesizer, train_images, chunk, seed)
            gens = [seeded_generator(seed, _STREAM_RECONSTRUCTION, i) for i in chunk]
            recs, ratios = reconstruct(pipe, images.to(pipe.device), gens, batch_size=batch_size)
            columns["index"] += chunk
            columns["source_index"] += sources
            columns["image"] += list(images.float().cpu().numpy())
            columns["reconstruction"] += list(recs.numpy())
            columns["noise_ratio"] += list(ratios.numpy())
            columns["mask"] += list(masks.cpu().numpy().astype(np.uint8))
            progress.update(len(chunk))
        shard = datasets.Dataset.from_dict(columns, features=features)
        dest = partial / f"shard-{k:05d}"
        tmp = incomplete_path(dest)
        shutil.rmtree(tmp, ignore_errors=True)
        shard.save_to_disk(str(tmp))
        commit_directory(tmp, dest)
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = [datasets.load_from_disk(str(partial / f"shard-{k:05d}")) for k in range(num_shards)]
        full = datasets.concatenate_datasets(shards)
        tmp = incomplete_path(cache_path)
        shutil.rmtree(tmp, ignore_errors=True)
        full.save_to_disk(str(tmp))
        (tmp / "diffad_cache_key.json").write_text(json.dumps(key_payload, indent=2, sort_keys=True, default=str))
        commit_directory(tmp, cache_path)
        del shards, full
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- crops and the held-back loss


def training_crops(batch: Dict[str, torch.Tensor], size: int,
                   generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ``size`` px crop of every sample of ``batch`` (``image``, ``reconstruction``, ``noise_ratio``, ``mask``
    at the working resolution): at even positions a crop holding a random defect pixel (at least 8 px inside),
    at odd positions a crop anywhere (mostly normal pixels). Returns ``(images, reconstructions, ratios, masks)``."""
    images, masks = batch["image"].float(), batch["mask"].float()
    full = images.shape[-1]
    if size >= full:
        return images, batch["reconstruction"].float(), batch["noise_ratio"].float(), masks
    margin = min(8, size // 4)
    origins = []
    for k in range(images.shape[0]):
        rows, cols = torch.nonzero(masks[k, 0] > 0, as_tuple=True)
        draw = torch.rand(4, generator=generator)
        if k % 2 == 0 and len(rows):
            j = int(draw[0] * len(rows))
            r = int(rows[j]) - margin - int(draw[1] * (size - 2 * margin))
            c = int(cols[j]) - margin - int(draw[2] * (size - 2 * margin))
        else:
            r, c = int(draw[1] * (full - size + 1)), int(draw[2] * (full - size + 1))
        origins.append((min(max(r, 0), full - size), min(max(c, 0), full - size)))
    crop = lambda t: torch.stack([t[k, :, r:r + size, c:c + size] for k, (r, c) in enumerate(origins)])  # noqa: E731
    return crop(images), crop(batch["reconstruction"].float()), crop(batch["noise_ratio"].float()), crop(masks)


@torch.no_grad()
def heldout_loss(segmenter: torch.nn.Module, heldout: Dict[str, torch.Tensor], size: int,
                 args: argparse.Namespace) -> float:
    """The segmentation loss over every tile of the held-back synthetic samples (the pipeline's tiles)."""
    was_training = segmenter.training
    segmenter.eval()
    tiles = {k: split_tiles(heldout[k].float(), size) for k in ("image", "reconstruction", "noise_ratio", "mask")}
    total, n = 0.0, tiles["image"].shape[0]
    for i in range(0, n, 64):
        logits = segmenter_logits(segmenter, tiles["image"][i:i + 64], tiles["reconstruction"][i:i + 64],
                                  tiles["noise_ratio"][i:i + 64, 0])
        loss = segmentation_loss(logits, tiles["mask"][i:i + 64], gamma=args.focal_gamma, alpha=args.focal_alpha,
                                 bce_weight=args.bce_weight)["loss"]
        total += float(loss) * logits.shape[0]
    segmenter.train(was_training)
    return total / n


# --------------------------------------------------------------------------- main


class _Inputs(NamedTuple):
    """The frozen pipeline, the data and the new segmenter (:func:`_load_model_and_data`)."""

    pipe: SelfAwareInpaintPipeline
    sampling: SamplingConfig
    fpr: float
    data: Dict[str, Any]
    train_images: torch.Tensor
    val_images: List[Any]
    file_names: List[str]
    category: str
    num_synthetic: int
    num_heldout: int
    crop: int
    segmenter: torch.nn.Module
    num_params: int


class _SyntheticSet(NamedTuple):
    """The reconstructed synthetic set, split into training and held-back samples (:func:`_reconstructed_set`)."""

    key: str
    cache_path: Path
    cache_hit: bool
    cache_seconds: float
    mask_share: float
    train_set: datasets.Dataset
    heldout: Dict[str, torch.Tensor]


class _Training(NamedTuple):
    """The prepared segmenter, optimiser, dataloader and scheduler, and the step plan (:func:`_prepare_training`)."""

    segmenter: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_dataloader: Any
    lr_scheduler: Any
    num_batches: int
    max_train_steps: int
    num_epochs: int


def _segmenter_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    names = {"segmenter_block_out_channels": "block_out_channels", "segmenter_layers_per_block": "layers_per_block",
             "segmenter_norm_num_groups": "norm_num_groups",
             "segmenter_attention_resolutions": "attention_resolutions"}
    return {v: getattr(args, k) for k, v in names.items() if getattr(args, k) is not None}


def main(args: Union[argparse.Namespace, Sequence[str], Mapping[str, Any], Any, None] = None) -> Path:
    """Build (or reuse) the reconstructed synthetic set, train the segmenter, calibrate its threshold and save it
    into ``args.model_dir``; return that folder.

    Args:
        args: the run's settings: what :func:`parse_args` returns, a command line (None: ``sys.argv[1:]``), or a
            config object (a dataclass instance or a mapping) whose fields are flag names (``{"model_dir": "m",
            "max_train_steps": 100}``); see :func:`resolve_args`.
    """
    return _train(resolve_args(args))


def resolve_args(config: Union[argparse.Namespace, Sequence[str], Mapping[str, Any], Any, None]) -> argparse.Namespace:
    """The parsed flags of ``config``: a ``Namespace`` as it is, a command line through :func:`parse_args`, a
    dataclass instance or mapping of flag names through :func:`diffad.training_utils.namespace_from_config` and
    :func:`check_args` (:func:`diffad.training_utils.resolve_training_args`)."""
    return resolve_training_args(config, parse_args=parse_args, parser=build_parser, finish=_checked)


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` once :func:`check_args` accepts them."""
    check_args(args)
    return args


@holds_output_folder("model_dir", "--model_dir", create=False)  # one run at a time writes the folder
def _train(args: argparse.Namespace) -> Path:
    """:func:`main` on parsed flags, with the model folder locked."""
    start_time = time.time()
    model_dir = Path(args.model_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir else model_dir / CHECKPOINT_SUBDIR
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        project_config=ProjectConfiguration(project_dir=str(model_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    world = accelerator.num_processes

    # 1. the frozen, calibrated pipeline and the normal images, 2. the segmenter
    inputs = _load_model_and_data(args, model_dir, accelerator, world)
    crop = inputs.crop
    # 3. the reconstructed synthetic set, 4. the optimiser and data
    synthetic = _reconstructed_set(args, model_dir, accelerator, inputs)
    training = _prepare_training(args, accelerator, world, inputs.segmenter, synthetic.train_set)
    log = _training_log(args, accelerator, world, inputs, synthetic, training)
    # 5. resume, 6. train (validating every --validation_steps and at the end)
    state, best_path = _resume(args, accelerator, model_dir, checkpoint_dir, log, synthetic.key, training.num_batches)
    validate = _make_validate(args, accelerator, training.segmenter, synthetic.heldout, crop, state, best_path)
    stop_reason, time_budget, progress = _progress(args, accelerator, state, training.max_train_steps)
    stop_reason = _train_loop(args, accelerator, training, state, log, validate, progress, stop_reason, time_budget,
                              crop, synthetic.key, checkpoint_dir, model_dir)
    accelerator.wait_for_everyone()
    # 7. add the segmenter to the pipeline, recalibrate, save into model_dir
    _save_into_pipeline(args, accelerator, inputs, synthetic, training, state, log, stop_reason, best_path,
                        start_time, model_dir)

    accelerator.wait_for_everyone()
    accelerator.end_training()
    return model_dir


def _load_model_and_data(args: argparse.Namespace, model_dir: Path, accelerator: Accelerator,
                         world: int) -> _Inputs:
    """The frozen, calibrated pipeline, the category's normal images, the synthetic-set sizes and the new
    segmenter."""
    # 1. the frozen, calibrated pipeline and the category's normal images
    pipe = load_calibrated_pipeline(model_dir).to(accelerator.device)
    pipe.unet.requires_grad_(False)
    cal = pipe.calibration
    sampling = cal.sampling  # what the pipeline runs (a diffad 0.1 calibration is refused here: recalibrate)
    sampling_name = sampling.preset_name or "custom"
    fpr = args.target_false_positive_rate or float(cal.config.target_false_positive_rate)
    resolution = pipe.resolution
    if pipe.segmenter is not None:
        logger.info(f"{model_dir} already has a segmenter: it will be replaced")
    data = resolve_data(args, model_dir)
    train_images, val_images, file_names, category = load_normal_images(data, resolution)
    num_synthetic = args.num_synthetic
    num_heldout = max(1, int(round(num_synthetic * args.validation_share)))
    if num_synthetic - num_heldout < 1:
        raise ValueError(f"--num_synthetic {num_synthetic} leaves no training sample after holding back "
                         f"{num_heldout} for validation: raise --num_synthetic")
    crop = pipe.tile_size  # the segmenter sees tiles of the DDPM's tile size, as the pipeline feeds it
    logger.info(f"{category}: {train_images.shape[0]} normal training images -> {num_synthetic} synthetic samples, "
                f"{len(val_images)} validation images; resolution {resolution}, sampling config {sampling_name!r}, "
                f"world size {world}")

    # 2. the segmenter (same initial weights on every rank; built now so that bad shape flags fail before the
    # expensive reconstructions)
    set_seed(args.seed)
    segmenter = make_segmenter(crop, **_segmenter_kwargs(args))
    num_params = count_parameters(segmenter)
    return _Inputs(pipe, sampling, fpr, data, train_images, val_images, file_names, category, num_synthetic,
                   num_heldout, crop, segmenter, num_params)


def make_synthesizer(args: argparse.Namespace) -> DefectSynthesizer:
    """The synthetic defects the head trains on: ``--defect_kinds`` in turn, sizes times ``--defect_scale_range``,
    DRAEM blobs from ``--textures_dir`` (its config is part of the reconstruction cache's key)."""
    return DefectSynthesizer(args.defect_kinds, textures=args.textures_dir, scale_range=args.defect_scale_range)


def _reconstructed_set(args: argparse.Namespace, model_dir: Path, accelerator: Accelerator,
                       inputs: _Inputs) -> _SyntheticSet:
    """The reconstructed synthetic set, from the cache or built into it once, split into training and
    held-back samples."""
    pipe, train_images, file_names = inputs.pipe, inputs.train_images, inputs.file_names
    sampling, num_synthetic, num_heldout = inputs.sampling, inputs.num_synthetic, inputs.num_heldout
    # 3. the reconstructed synthetic set: reuse the cache or build it once
    synthesizer = make_synthesizer(args)
    synthesis = {"synthesizer": synthesizer.config, "seed": args.seed, "num_synthetic": num_synthetic,
                 "sample_rule": "image i mod N, kind i mod K, generator seeded_generator(seed, 1, i)"}
    inference = inference_settings(sampling)
    key, payload = reconstruction_cache_key(pipe, model_dir, synthesis=synthesis, inference=inference,
                                            train_images=train_images, train_file_names=file_names)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(model_dir)
    cache_path = cache_dir / f"segmenter-reconstructions-{key}"
    if accelerator.is_main_process and args.overwrite_cache and cache_path.exists():
        shutil.rmtree(cache_path)
    accelerator.wait_for_everyone()
    tick = time.time()
    # Two trainings of the same model (e.g. sibling copies sharing <parent>/.diffad_cache) build one cache: the
    # second waits for the first's lock, then reuses its cache.
    lock = file_lock(cache_dir / f"{cache_path.name}.lock") if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        accelerator.wait_for_everyone()
        cache_hit = cache_path.is_dir() and (cache_path / "diffad_cache_key.json").is_file()
        if cache_hit:
            logger.info(f"reusing cached reconstructions {cache_path} (cache key {key})")
        else:
            logger.info(f"computing {num_synthetic} self-aware reconstructions once (cache key {key}) into "
                        f"{cache_path}")
            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()  # one bar (ours) instead of one per saved shard
            try:
                build_reconstruction_cache(pipe, accelerator, cache_path, synthesizer=synthesizer,
                                           train_images=train_images, num_synthetic=num_synthetic, seed=args.seed,
                                           batch_size=args.reconstruction_batch_size,
                                           shard_size=args.cache_shard_size, key_payload=payload)
            finally:
                if bars:
                    datasets.enable_progress_bars()
    cache_seconds = time.time() - tick
    full_set = datasets.load_from_disk(str(cache_path)).with_format("torch", columns=["image", "reconstruction",
                                                                                        "noise_ratio", "mask"])
    if len(full_set) != num_synthetic:  # internal invariant: the key covers num_synthetic
        raise RuntimeError(f"cache {cache_path} holds {len(full_set)} samples, expected {num_synthetic}")
    mask_share = float(full_set[:]["mask"].float().mean())  # share of defect pixels over the synthetic set
    # the last samples are held back (every kind among them): their loss over all their tiles picks the weights
    train_set = full_set.select(range(num_synthetic - num_heldout))
    heldout = full_set[num_synthetic - num_heldout:]
    return _SyntheticSet(key, cache_path, cache_hit, cache_seconds, mask_share, train_set, heldout)


def _prepare_training(args: argparse.Namespace, accelerator: Accelerator, world: int, segmenter: torch.nn.Module,
                      train_set: datasets.Dataset) -> _Training:
    """The optimiser, dataloader and learning-rate schedule, prepared with the segmenter, and the step plan."""
    # 4. the optimiser and data
    optimizer = torch.optim.Adam(segmenter.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    train_dataloader = torch.utils.data.DataLoader(train_set, batch_size=args.train_batch_size, shuffle=True,
                                                   generator=torch.Generator().manual_seed(args.seed))
    num_batches = math.ceil(len(train_set) / (args.train_batch_size * world))
    max_train_steps = args.max_train_steps or args.num_epochs * num_batches
    num_epochs = math.ceil(max_train_steps / num_batches)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    segmenter, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(segmenter, optimizer, train_dataloader,
                                                                               lr_scheduler)
    if len(train_dataloader) != num_batches:  # internal invariant: our step arithmetic matches accelerate's
        raise RuntimeError(f"expected {num_batches} batches per process, accelerate gives {len(train_dataloader)}")
    return _Training(segmenter, optimizer, train_dataloader, lr_scheduler, num_batches, max_train_steps,
                     num_epochs)


def _training_log(args: argparse.Namespace, accelerator: Accelerator, world: int, inputs: _Inputs,
                  synthetic: _SyntheticSet, training: _Training) -> TrainingLog:
    """The run's log, its config recording the flags, the data, the sampling config and the cache."""
    data, category, train_images, val_images = inputs.data, inputs.category, inputs.train_images, inputs.val_images
    sampling, num_synthetic, num_params = inputs.sampling, inputs.num_synthetic, inputs.num_params
    key, cache_path, mask_share = synthetic.key, synthetic.cache_path, synthetic.mask_share
    segmenter, num_batches, max_train_steps = training.segmenter, training.num_batches, training.max_train_steps
    config = {k: v for k, v in vars(args).items()}
    config.update(resolved_data=data, category=category, sampling_preset=sampling.preset_name,
                  sampling_config=sampling.to_dict(), cache_key=key, cache_path=str(cache_path),
                  num_synthetic=num_synthetic, num_train_images=int(train_images.shape[0]),
                  num_validation_images=len(val_images), synthetic_mask_share=mask_share,
                  num_parameters=num_params, world_size=world, steps_per_epoch=num_batches,
                  max_train_steps=max_train_steps, total_batch_size=args.train_batch_size * world,
                  segmenter_config={k: v for k, v in accelerator.unwrap_model(segmenter).config.items()
                                    if not k.startswith("_")})
    log = TrainingLog(config)
    return log


def _resume(args: argparse.Namespace, accelerator: Accelerator, model_dir: Path, checkpoint_dir: Path,
            log: TrainingLog, key: str, num_batches: int) -> Tuple[Dict[str, Any], Path]:
    """The training state, fresh or from ``--resume_from_checkpoint`` (refused for another training set or batch
    size), and where the best weights are kept; the checkpoint folder is created."""
    # 5. resume
    state: Dict[str, Any] = {"global_step": 0, "epoch": 0, "batches_in_epoch": 0, "epoch_loss_sum": 0.0,
                             "epoch_focal_sum": 0.0, "epoch_bce_sum": 0.0, "epoch_batches": 0, "epoch_seconds": 0.0,
                             "train_seconds": 0.0, "step_losses": [], "resumed_from": [], "validation_losses": [],
                             "best_validation_loss": None, "best_step": None}
    best_path = checkpoint_dir / "best_segmenter.pt"
    resume_path = resolve_resume(args, checkpoint_dir)
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(checkpoint_dir)
        remove_incomplete(model_dir)
    accelerator.wait_for_everyone()
    if resume_path is not None:
        saved = json.loads((resume_path / CHECKPOINT_MARKER).read_text())
        if saved.get("cache_key") != key or saved.get("steps_per_epoch") != num_batches:
            raise ValueError(f"{resume_path} was written for another training set or batch size (cache key "
                             f"{saved.get('cache_key')}, {saved.get('steps_per_epoch')} steps per epoch; this run: "
                             f"{key}, {num_batches}): resume with the same flags or start without --resume_from_checkpoint")
        logger.info(f"resuming from {resume_path}")
        accelerator.load_state(str(resume_path))
        state.update(saved["state"])
        log.load_state_dict(saved["log"])
        state["resumed_from"] = list(state["resumed_from"]) + [{"checkpoint": str(resume_path),
                                                                "global_step": state["global_step"]}]
    return state, best_path


def _make_validate(args: argparse.Namespace, accelerator: Accelerator, segmenter: torch.nn.Module,
                   heldout: Dict[str, torch.Tensor], crop: int, state: Dict[str, Any],
                   best_path: Path) -> Callable[[], None]:
    """The validation of the training loop: the held-back loss, the best weights kept at ``best_path``."""
    def validate() -> None:
        """Measure the held-back loss; keep the weights when it is the best so far (main process)."""
        loss = heldout_loss(accelerator.unwrap_model(segmenter), heldout, crop, args)
        state["validation_losses"].append([state["global_step"], loss])
        if state["best_validation_loss"] is None or loss < state["best_validation_loss"]:
            state.update(best_validation_loss=loss, best_step=state["global_step"])
            if accelerator.is_main_process:
                torch.save(accelerator.unwrap_model(segmenter).state_dict(), best_path)
        logger.info(f"step {state['global_step']}: held-back loss {loss:.4f} (best {state['best_validation_loss']:.4f} "
                    f"at step {state['best_step']})")
    return validate


def _progress(args: argparse.Namespace, accelerator: Accelerator, state: Dict[str, Any],
              max_train_steps: int) -> Tuple[str, Optional[float], TrainingProgress]:
    """``(stop_reason, time_budget, progress)``: what stops the run unless the time budget does, that budget in
    seconds (None: none), and the progress bar."""
    # 6. train: focal + BCE on segmenter_logits(image, reconstruction, Q / Q_p) crops -> synthetic mask
    stop_reason = "max_train_steps" if args.max_train_steps else "num_epochs"
    time_budget = args.max_train_minutes * 60 if args.max_train_minutes else None
    progress = TrainingProgress(max_steps=None if (time_budget and not args.max_train_steps) else max_train_steps,
                                time_budget=time_budget, initial_steps=state["global_step"],
                                initial_seconds=state["train_seconds"], desc="segmenter steps",
                                disable=not accelerator.is_local_main_process)
    return stop_reason, time_budget, progress


def _train_loop(args: argparse.Namespace, accelerator: Accelerator, training: _Training, state: Dict[str, Any],
                log: TrainingLog, validate: Callable[[], None], progress: TrainingProgress, stop_reason: str,
                time_budget: Optional[float], crop: int, key: str, checkpoint_dir: Path, model_dir: Path) -> str:
    """Train on ``crop`` px crops to the budget, validating and checkpointing on the way; return what stopped the
    run."""
    segmenter, optimizer, train_dataloader, lr_scheduler, num_batches, max_train_steps, num_epochs = training
    first_epoch, stopped = state["epoch"], state["global_step"] >= max_train_steps
    for epoch in range(first_epoch, num_epochs):
        if stopped:
            break
        segmenter.train()
        if epoch != state["epoch"]:
            state.update(epoch=epoch, batches_in_epoch=0, epoch_loss_sum=0.0, epoch_focal_sum=0.0, epoch_bce_sum=0.0,
                         epoch_batches=0, epoch_seconds=0.0)
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if state["batches_in_epoch"]:
            loader = accelerator.skip_first_batches(train_dataloader, state["batches_in_epoch"])
            loader.set_epoch(epoch)
        tick = time.time()
        for batch_index, batch in enumerate(loader, start=state["batches_in_epoch"]):
            crops = seeded_generator(args.seed, _STREAM_CROPS, state["global_step"])  # resumes exactly
            images, recs, ratios, targets = training_crops(batch, crop, crops)
            logits = segmenter_logits(segmenter, images, recs, ratios[:, 0])
            losses = segmentation_loss(logits, targets, gamma=args.focal_gamma, alpha=args.focal_alpha,
                                       bce_weight=args.bce_weight)
            accelerator.backward(losses["loss"])
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(segmenter.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            step_loss = float(losses["loss"].detach())
            state["global_step"] += 1
            state["batches_in_epoch"] = batch_index + 1
            state["epoch_loss_sum"] += step_loss
            state["epoch_focal_sum"] += float(losses["focal"].detach())
            state["epoch_bce_sum"] += float(losses["bce"].detach())
            state["epoch_batches"] += 1
            state["step_losses"].append(step_loss)
            now = time.time()
            state["epoch_seconds"] += now - tick
            state["train_seconds"] += now - tick
            tick = now
            progress.step(state["global_step"], state["train_seconds"], loss=f"{step_loss:.4f}")
            if state["global_step"] % args.validation_steps == 0:
                validate()
                tick = time.time()
            if state["global_step"] >= max_train_steps:
                stopped = True
            elif time_budget_spent(accelerator, state["train_seconds"], time_budget):
                stopped, stop_reason = True, "max_train_minutes"
            if state["global_step"] % args.checkpointing_steps == 0:
                save_checkpoint(accelerator, checkpoint_dir, state["global_step"],
                                {"state": state, "log": log.state_dict(), "steps_per_epoch": num_batches,
                                 "cache_key": key}, None, args.checkpoints_total_limit)
                tick = time.time()  # checkpoint I/O is not training time
            if stopped:
                break
        stats = accelerator.reduce(torch.tensor([state["epoch_loss_sum"], state["epoch_focal_sum"],
                                                 state["epoch_bce_sum"], state["epoch_batches"]],
                                                dtype=torch.float64, device=accelerator.device), reduction="sum")
        n = max(float(stats[3]), 1.0)
        record = {"epoch": epoch, "global_step": state["global_step"], "train_loss": float(stats[0]) / n,
                  "focal_loss": float(stats[1]) / n, "bce_loss": float(stats[2]) / n,
                  "lr": lr_scheduler.get_last_lr()[0], "epoch_seconds": state["epoch_seconds"],
                  "partial": state["batches_in_epoch"] < num_batches}
        log.add_epoch(record)
        logger.info(f"epoch {epoch}: step {state['global_step']} loss {record['train_loss']:.4f} "
                    f"(focal {record['focal_loss']:.4f}, bce {record['bce_loss']:.4f})")
        if accelerator.is_main_process:
            log.save(model_dir / LOG_NAME)
    progress.close()
    if not state["validation_losses"] or state["validation_losses"][-1][0] != state["global_step"]:
        validate()
    return stop_reason


def _save_into_pipeline(args: argparse.Namespace, accelerator: Accelerator, inputs: _Inputs,
                        synthetic: _SyntheticSet, training: _Training, state: Dict[str, Any], log: TrainingLog,
                        stop_reason: str, best_path: Path, start_time: float, model_dir: Path) -> None:
    """Add the best segmenter to the pipeline, recalibrate it and save it and the log into ``model_dir``
    (main process)."""
    pipe, val_images, data, fpr, crop = inputs.pipe, inputs.val_images, inputs.data, inputs.fpr, inputs.crop
    num_heldout, num_params, max_train_steps = inputs.num_heldout, inputs.num_params, training.max_train_steps
    cache_hit, cache_seconds = synthetic.cache_hit, synthetic.cache_seconds
    # 7. add the segmenter to the pipeline, recalibrate (every threshold, the learned map's too), save into model_dir
    if accelerator.is_main_process:
        final = make_segmenter(crop, **_segmenter_kwargs(args))
        final.load_state_dict(torch.load(best_path, weights_only=True))  # the best held-back loss's weights
        final.eval().requires_grad_(False)
        pipe.register_modules(segmenter=final.to(pipe.device))
        pipe.set_progress_bar_config(disable=True)
        tick = time.time()
        q_unchanged = recalibrate(pipe, val_images, seed=data["split_seed"], target_false_positive_rate=fpr,
                                  batch_size=args.calibration_batch_size)
        calibration_seconds = time.time() - tick
        if not q_unchanged:
            logger.warning("recalibrating changed Q_p (the model was calibrated on other images or noise than the "
                           f"validation split with seed {data['split_seed']}): the segmenter was trained on "
                           "reconstructions masked with the previous Q_p, and a rerun will rebuild the cache")
        threshold = pipe.calibration.threshold("self_aware/learned")
        pipe.to("cpu")
        save_pipeline(pipe, model_dir)
        log.summary = {"total_optimizer_steps": state["global_step"], "max_train_steps": max_train_steps,
                       "stopped_by": stop_reason, "final_train_loss": (log.epochs[-1]["train_loss"] if log.epochs
                                                                       else None),
                       "train_seconds": state["train_seconds"], "cache_hit": cache_hit,
                       "cache_seconds_this_run": cache_seconds, "calibration_seconds": calibration_seconds,
                       "learned_threshold": threshold, "target_false_positive_rate": fpr,
                       "best_validation_loss": state["best_validation_loss"], "best_step": state["best_step"],
                       "validation_losses": state["validation_losses"], "num_heldout_synthetic": num_heldout,
                       "q_threshold_unchanged": q_unchanged,
                       "wall_seconds_this_run": time.time() - start_time, "num_parameters": num_params,
                       "resumed_from": state["resumed_from"], "step_losses": state["step_losses"]}
        log.save(model_dir / LOG_NAME)
        logger.info(f"saved the segmenter into {model_dir} ({state['global_step']} steps, learned-map threshold "
                    f"{threshold:.4f} at {fpr:.0%} target false positives)")


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(lambda: main(parse_args()), PROG))
