#!/usr/bin/env python
"""Train diffad's self-conditioned DDPM on photos of good parts, with Hugging Face Accelerate.

The method (Semchyshyn 2023, "Automated visual inspection in the industrial setup via deep
learning"): a stock ``UNet2DModel`` with 6 input channels predicts the noise
of ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (Ho et al. 2020, epsilon loss) under
diffusers' ``DDPMScheduler(1000, beta_schedule="sigmoid")``. Self-conditioning (Chen et al.,
"Analog Bits", 2022, https://arxiv.org/abs/2208.04202): half of the batches first estimate
``x0_hat`` with a no-grad pass and feed it back as the extra 3 input channels; the other half
get zeros. Validation: the held-out 20% of ``train/good``, with the same timesteps and noise
every epoch; the weights with the lowest validation loss are what is saved.

Run it (see ``--help`` for every flag)::

    # one process (2 CPU threads here), or plain `python training/train_ddpm.py ...`
    accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --num_cpu_threads_per_process 2 training/train_ddpm.py \\
        --data_dir ../shared/data/mvtec_subset --category bottle --preset small --output_dir ddpm-bottle

    # two ranks on CPU (gloo): the same code path as 8 GPUs or several nodes
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no --num_cpu_threads_per_process 1 training/train_ddpm.py ... --expect_world_size 2

The output folder is a ``SelfAwareInpaintPipeline`` in diffusers' layout (``unet/``,
``scheduler/``, ``model_index.json``) plus ``training_log.json``; stock diffusers loads
``UNet2DModel.from_pretrained(out, subfolder="unet")``. Checkpoints (``checkpoint-<step>/``)
are written to a temporary name and renamed, so ``--resume_from_checkpoint latest`` never picks
a half-written one after a crash.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from diffad.errors import OneLineArgumentParser, run_with_clear_errors
from diffad.files import remove_incomplete, save_pipeline
from diffad.pipelines.self_aware_inpaint import seeded_generator
from diffad.pipelines.self_aware_inpaint.pipeline import NoiseSchedule, SelfAwareInpaintPipeline, predict_noise
from diffad.presets import PRESET_NAMES, count_parameters, make_scheduler, make_unet, preset_defaults
from diffad.training_utils import (  # save_checkpoint, resolve_resume: shared with train_segmenter.py
    BEST_WEIGHTS,
    CHECKPOINT_MARKER,
    TrainingLog,
    TrainingProgress,
    augment_batch,
    check_resume_config,
    check_training_memory,
    clear_checkpoints,
    ema_state,
    estimate_training_memory,
    holds_output_folder,
    load_ema_state,
    parse_int_list,
    resolve_resume,
    resolve_training_args,
    save_checkpoint,
    time_budget_spent,
)

PROG = "train_ddpm.py"
logger = get_logger(__name__, log_level="INFO")

# Flags whose default comes from the preset (None on the command line = "use the preset's").
_PRESET_FLAGS = (
    "resolution", "train_batch_size", "learning_rate", "num_epochs", "optimizer", "lr_warmup_steps",
    "block_out_channels", "layers_per_block", "attention_resolutions", "norm_num_groups",
)


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


#: The settings a resumed run must share with the checkpoint's run (anything else may change, e.g. logging).
RESUME_KEYS = ("preset", "resolution", "crop_size", "data_fingerprint", "category", "validation_fraction", "seed",
               "learning_rate", "optimizer", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
               "lr_scheduler",
               "lr_warmup_steps", "train_batch_size", "gradient_accumulation_steps", "block_out_channels",
               "layers_per_block", "attention_resolutions", "norm_num_groups", "num_train_timesteps", "use_ema",
               "random_flip", "unet_config")


def parse_args(argv: Optional[Sequence[str]] = None, prog: str = PROG) -> argparse.Namespace:
    """Parse the command line (``argv``, default ``sys.argv[1:]``) and fill preset defaults.

    Raises:
        SystemExit(2): a malformed flag (one line on stderr).
        ValueError: flags that are well-formed but inconsistent (see :func:`check_args`).
    """
    return finish_args(build_parser(prog).parse_args(argv))


def build_parser(prog: str = PROG) -> OneLineArgumentParser:
    """The script's flags, in four groups (data, model, optimisation, output); preset-dependent ones default to
    None, which :func:`finish_args` fills."""
    p = OneLineArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_flags(p)
    _add_model_flags(p)
    _add_optimisation_flags(p)
    _add_output_flags(p)
    return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, default=None,
                   help="MVTec-AD-layout root (<data_dir>/<category>/train/good/...) or a Hub dataset id. "
                        "Default: the embedded synthetic dataset, written to <output_dir>/synthetic_data.")
    g.add_argument("--category", type=str, default=None,
                   help="Category folder under --data_dir (default: the only one there, or the first synthetic one).")
    g.add_argument("--validation_fraction", type=float, default=0.2,
                   help="Share of train/good held out (seeded) for the per-epoch validation loss.")
    g.add_argument("--random_flip", action="store_true",
                   help="Random horizontal/vertical flips (off by default: many parts are not symmetric).")
    g.add_argument("--random_rot90", action="store_true", help="Random 90-degree rotations (off by default).")
    g.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (preset values unless given)")
    g.add_argument("--preset", choices=PRESET_NAMES, default="cpu",
                   help="UNet size and training defaults: cpu (the default: 0.64M params on 64 px crops of 256 px "
                        "images, 1500 steps, ~20 CPU-minutes), thesis (~275M params, 256 px, needs a GPU), "
                        "small (6.3M, 64 px), tiny (0.69M, 32 px, tests and demos).")
    g.add_argument("--resolution", type=int, default=None,
                   help="The working resolution S: images are resized to S x S, and inspected at it.")
    g.add_argument("--crop_size", type=int, default=None,
                   help="The UNet's input size R: it trains on random R x R crops of the S x S images and inspects "
                        "them in overlapping R x R tiles (default: the preset's, or S: whole images).")
    g.add_argument("--block_out_channels", type=parse_int_list, default=None,
                   help="UNet widths per level, e.g. 16,32,64.")
    g.add_argument("--layers_per_block", type=int, default=None, help="ResNet blocks per UNet level.")
    g.add_argument("--attention_resolutions", type=parse_int_list, default=None,
                   help="Feature-map sizes (px) whose UNet level gets self-attention, e.g. 32,16.")
    g.add_argument("--norm_num_groups", type=int, default=None, help="GroupNorm groups (widths must divide by it).")
    g.add_argument("--num_train_timesteps", type=int, default=1000, help="DDPM diffusion steps.")
    g.add_argument("--self_condition_prob", type=float, default=0.5,
                   help="Probability that a batch is self-conditioned (no-grad x0 estimate fed back).")


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (preset values unless given)")
    g.add_argument("--train_batch_size", type=int, default=None, help="Images per process per step.")
    g.add_argument("--eval_batch_size", type=int, default=16, help="Images per validation forward pass.")
    g.add_argument("--num_epochs", type=int, default=None, help="Epochs (the thesis: 500).")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="Total optimiser steps; overrides --num_epochs when given.")
    g.add_argument("--max_train_minutes", type=float, default=None,
                   help="Stop after this many minutes of training (summed over resumed runs); the best "
                        "weights so far are saved.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimiser step.")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default=None, help="Adam (the thesis) or AdamW.")
    g.add_argument("--learning_rate", type=float, default=None, help="Peak learning rate (the thesis: 2e-5).")
    g.add_argument("--lr_scheduler", type=str, default="constant_with_warmup",
                   help='diffusers.optimization.get_scheduler name: "constant_with_warmup", "cosine", "linear", ...')
    g.add_argument("--lr_warmup_steps", type=int, default=None, help="Warm-up optimiser steps.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm (0 disables).")
    g.add_argument("--use_ema", action="store_true", default=None,
                   help="Keep an exponential moving average of the weights; it is what gets validated and saved "
                        "(the cpu preset's default).")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0, help="EMA warm-up inverse multiplicative factor.")
    g.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up power.")
    g.add_argument("--ema_max_decay", type=float, default=0.9999, help="EMA maximum decay.")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Overrides accelerate's config; bf16 on recent GPUs (fp16 needs a GPU).")
    g.add_argument("--seed", type=int, default=0, help="Seeds initialisation, split, noise, timesteps, augmentations.")
    g.add_argument("--skip_memory_check", action="store_true",
                   help="Start even when the estimated peak memory (UNet activations at --crop_size x "
                        "--train_batch_size, weights, optimiser, EMA) exceeds the memory available now; without it "
                        "such a run is refused before anything is written.")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output, checkpoints, logging")
    g.add_argument("--output_dir", type=str, default="ddpm-model", help="Pipeline folder, checkpoints and logs.")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="Start a new run in a folder that already holds a trained pipeline or checkpoints: the old "
                        "run's checkpoints are deleted (never anything outside the folder).")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N steps.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help='"latest" (a fresh start when there is none) or a checkpoint folder.')
    g.add_argument("--report_to", type=str, default="tensorboard" if _tensorboard_available() else "none",
                   help='Accelerate trackers: "tensorboard", "wandb", "all" or "none".')
    g.add_argument("--logging_dir", type=str, default="logs", help="Tracker folder, relative to --output_dir.")
    g.add_argument("--expect_world_size", type=int,
                   default=int(os.environ["DIFFAD_EXPECT_WORLD_SIZE"]) if os.environ.get("DIFFAD_EXPECT_WORLD_SIZE") else None,
                   help="Fail unless the run has exactly this many processes (env DIFFAD_EXPECT_WORLD_SIZE).")


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left None with ``args.preset``'s defaults, then :func:`check_args`; return ``args``."""
    defaults = preset_defaults(args.preset)
    for key in _PRESET_FLAGS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.crop_size is None:  # the preset's crop when it trains at its own resolution, else whole images
        crop = defaults.get("crop_size")
        args.crop_size = crop if crop and args.resolution == defaults["resolution"] else args.resolution
    if args.max_train_steps is None and args.num_epochs == defaults["num_epochs"]:
        args.max_train_steps = defaults["max_train_steps"]
    args.use_ema = bool(args.use_ema or defaults["use_ema"])
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    """Reject inconsistent flag values with a ``ValueError`` naming the flag and the rule."""
    positive = ("resolution", "train_batch_size", "eval_batch_size", "num_epochs", "gradient_accumulation_steps",
                "checkpointing_steps", "num_train_timesteps", "layers_per_block", "norm_num_groups")
    for key in positive:
        if getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    if not 0 < args.crop_size <= args.resolution:
        raise ValueError(f"--crop_size must be in [1, --resolution={args.resolution}], got {args.crop_size}")
    for key in ("max_train_steps", "max_train_minutes", "checkpoints_total_limit", "expect_world_size"):
        value = getattr(args, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key} must be positive, got {value}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}")
    if not 0.0 <= args.self_condition_prob <= 1.0:
        raise ValueError(f"--self_condition_prob must be in [0, 1], got {args.self_condition_prob}")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}")
    # Fails early, with the rule, on widths/resolution that do not fit together.
    from diffad.presets import unet_kwargs

    unet_kwargs(args.preset, **unet_args(args))


def check_memory(args: argparse.Namespace) -> None:
    """Refuse, in one line (``ValueError``), a run whose estimated peak memory exceeds what is available now
    (:func:`diffad.training_utils.estimate_training_memory`; the kernel would kill it with no message). The
    processes of one launch share the host's memory on CPU."""
    from diffad.presets import unet_kwargs

    needed = estimate_training_memory(unet_kwargs(args.preset, **unet_args(args)), crop_size=args.crop_size, resolution=args.resolution,
                                      batch_size=args.train_batch_size, eval_batch_size=args.eval_batch_size,
                                      use_ema=args.use_ema, mixed_precision=args.mixed_precision)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE") or args.expect_world_size or 1)
    crops = f"{args.crop_size} px crops of " if args.crop_size < args.resolution else ""
    check_training_memory(
        needed, processes=processes,
        what=f"{args.train_batch_size} x {crops}{args.resolution} px images ({args.preset} preset"
             + (f", {processes} processes)" if processes > 1 else ")"),
        fix="lower --resolution, --crop_size or --train_batch_size (or --eval_batch_size), or pass "
            "--skip_memory_check to try anyway")


def unet_args(args: argparse.Namespace) -> Dict[str, Any]:
    """``make_unet`` overrides from the flags: the UNet's ``sample_size`` is the crop (tile) size."""
    return dict(resolution=args.crop_size, block_out_channels=args.block_out_channels,
                layers_per_block=args.layers_per_block, attention_resolutions=args.attention_resolutions,
                norm_num_groups=args.norm_num_groups)


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random ``size x size`` crop of each ``(B, 3, S, S)`` image (positions from ``generator``); the images
    themselves when ``size == S`` (no draw)."""
    full = images.shape[-1]
    if size >= full:
        return images
    tops = torch.randint(0, full - size + 1, (images.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, full - size + 1, (images.shape[0],), generator=generator).tolist()
    return torch.stack([im[:, t:t + size, l:l + size] for im, t, l in zip(images, tops, lefts)])


# --------------------------------------------------------------------------- diffusion maths


def self_conditioned_eps(unet: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor,
                         alphas_cumprod: torch.Tensor, self_condition: bool) -> torch.Tensor:
    """The training-time noise prediction: with ``self_condition``, a first no-grad pass gives
    ``x0_hat`` (the estimate is a fixed input, as in Chen et al. 2022: no gradient flows through it),
    and the second pass conditions on it; otherwise one pass conditioned on zeros."""
    x0_prev = None
    if self_condition:
        with torch.no_grad():
            eps = predict_noise(unet, x_t, timesteps)
            x0_prev = NoiseSchedule(alphas_cumprod).estimate_x0(x_t, eps, timesteps).to(x_t.dtype)
    return predict_noise(unet, x_t, timesteps, x0_prev)


# --------------------------------------------------------------------------- data


def _stack_pixels(batch: Dict[str, Any]) -> torch.Tensor:
    pixels = batch["pixel_values"]
    return torch.stack(list(pixels)) if not isinstance(pixels, torch.Tensor) else pixels


def load_data(args: argparse.Namespace, accelerator: Accelerator):
    """The train split (a transformed ``datasets.Dataset``) and the validation images
    ``(V, 3, R, R)`` in [-1, 1] (V may be 0)."""
    from diffad.data import data_source, load_mvtec, make_transform, split_fingerprint

    data_dir, category = args.data_dir, args.category
    if data_dir is None:  # the embedded default: procedural parts in MVTec layout
        from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset

        data_dir = os.path.join(args.output_dir, "synthetic_data")
        category = category or SYNTHETIC_CATEGORIES[0]
        if accelerator.is_main_process and not (Path(data_dir) / category / "train").is_dir():
            make_synthetic_dataset(data_dir, seed=args.seed, resolution=max(64, args.resolution))
        accelerator.wait_for_everyone()
    splits = load_mvtec(data_dir, category, resolution=args.resolution,
                        validation_fraction=args.validation_fraction, seed=args.seed)
    train = splits["train"]
    if category is None and len(train) and "category" in train.column_names:
        category = train[0]["category"]  # load_mvtec resolved the only category there
    args.category, args.resolved_data_dir = category, str(Path(data_dir).resolve())
    args.data_fingerprint = {name: split_fingerprint(splits[name]) for name in ("train", "validation")}  # by content
    args.data_source = data_source(data_dir, category)  # its licence and name, from its own files (diffad card)
    transform = make_transform(args.resolution)
    if len(train) == 0:
        raise ValueError(f"no training images in {data_dir}/{category}/train/good")
    if "validation" in splits and len(splits["validation"]) > 0:
        validation = _stack_pixels(splits["validation"].with_transform(transform)[:]).float()
    else:
        validation = torch.zeros(0, 3, args.resolution, args.resolution)
    return train.with_transform(transform), validation


# --------------------------------------------------------------------------- validation


@torch.no_grad()
def validation_losses(unet: torch.nn.Module, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                      alphas_cumprod: torch.Tensor, accelerator: Accelerator, batch_size: int) -> Tuple[float, float]:
    """Mean epsilon-MSE over the validation images with their fixed noise and timesteps.

    Each process evaluates every ``world_size``-th image, and the sums are reduced, so the
    figure does not depend on the number of processes.

    Returns:
        ``(self_conditioned, unconditioned)``: the loss with the two-pass self-conditioned
        prediction (as in sampling; the model is selected on it) and with zeros as ``x0_prev``.
    """
    device = accelerator.device
    idx = torch.arange(accelerator.process_index, images.shape[0], accelerator.num_processes)
    sums = torch.zeros(3, device=device)
    acp = alphas_cumprod.to(device)
    for chunk in idx.split(batch_size):
        x0, eps, t = images[chunk].to(device), noise[chunk].to(device), timesteps[chunk].to(device)
        x_t = (acp[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - acp[t]).sqrt().view(-1, 1, 1, 1) * eps)
        with accelerator.autocast():
            plain = predict_noise(unet, x_t, t)
            x0_hat = NoiseSchedule(acp).estimate_x0(x_t, plain, t).to(x_t.dtype)
            cond = predict_noise(unet, x_t, t, x0_hat)
        sums[0] += F.mse_loss(cond.float(), eps, reduction="none").mean(dim=(1, 2, 3)).sum()
        sums[1] += F.mse_loss(plain.float(), eps, reduction="none").mean(dim=(1, 2, 3)).sum()
        sums[2] += len(chunk)
    sums = accelerator.reduce(sums, reduction="sum")
    n = max(float(sums[2]), 1.0)
    return float(sums[0]) / n, float(sums[1]) / n


# --------------------------------------------------------------------------- checkpoints


def main(args: Union[argparse.Namespace, Sequence[str], Mapping[str, Any], Any, None] = None) -> Path:
    """Train, save the pipeline and ``training_log.json`` into ``args.output_dir``; return that folder.

    Args:
        args: the run's settings: what :func:`parse_args` returns, a command line (``["--preset", "tiny", ...]``;
            None: ``sys.argv[1:]``), or a config object (a dataclass instance or a mapping) whose fields are flag
            names (``{"preset": "tiny", "max_train_steps": 100}``); see :func:`resolve_args`.

    A run whose estimated peak memory exceeds what is available is refused first (:func:`check_memory`, unless
    ``--skip_memory_check``), before the output folder is created or locked.
    """
    args = resolve_args(args)
    if not args.skip_memory_check:
        check_memory(args)
    return _train(args)


def resolve_args(config: Union[argparse.Namespace, Sequence[str], Mapping[str, Any], Any, None]) -> argparse.Namespace:
    """The parsed flags of ``config``: a ``Namespace`` as it is (what :func:`parse_args` returned), a command line
    through :func:`parse_args`, a dataclass instance or mapping of flag names to values through
    :func:`diffad.training_utils.namespace_from_config` and then the preset defaults and checks of
    :func:`finish_args` (:func:`diffad.training_utils.resolve_training_args`)."""
    return resolve_training_args(config, parse_args=parse_args, parser=build_parser, finish=finish_args)


@dataclass
class _Run:
    """What the stages of one training run share (built by :func:`_setup_run`)."""

    args: argparse.Namespace
    accelerator: Accelerator
    output_dir: Path
    start_time: float
    unet: torch.nn.Module
    ema: Optional[EMAModel]
    num_params: int
    noise_scheduler: Any  # DDPMScheduler
    alphas_cumprod: torch.Tensor
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_dataloader: Any
    num_batches: int  # per process and epoch
    steps_per_epoch: int
    max_train_steps: int
    num_epochs: int
    val_images: torch.Tensor  # (V, 3, crop, crop) in [-1, 1]: the fixed validation crops
    val_noise: torch.Tensor
    val_timesteps: torch.Tensor
    log: TrainingLog
    state: Dict[str, Any] = field(default_factory=lambda: {
        "global_step": 0, "epoch": 0, "batches_in_epoch": 0, "epoch_loss_sum": 0.0, "epoch_batches": 0,
        "epoch_samples": 0, "epoch_seconds": 0.0, "train_seconds": 0.0, "best_val_loss": None, "best_epoch": None,
        "step_losses": [], "resumed_from": []})
    best_weights: Optional[Dict[str, torch.Tensor]] = None


@holds_output_folder("output_dir", "--output_dir")  # one run at a time writes the folder
def _train(args: argparse.Namespace) -> Path:
    """:func:`main` once the run is known to fit: the output folder is locked, then written."""
    start_time = time.time()
    output_dir = Path(args.output_dir)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO)
    accelerator = _make_accelerator(args, output_dir)
    resume_path = _prepare_output_dir(args, output_dir, accelerator)
    # 1. data, 2. model, scheduler, optimiser (same initial weights on every rank)
    run = _setup_run(args, accelerator, output_dir, start_time)
    # 3. resume
    if resume_path is not None:
        _resume(run, resume_path)
    # 4. train, 5. validating once per epoch
    stop_reason = _train_epochs(run)
    accelerator.wait_for_everyone()
    # 6. save the pipeline: the best-by-validation weights (EMA ones with --use_ema), else the last
    if accelerator.is_main_process:
        _save_pipeline_and_log(run, stop_reason)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir


def _make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    """The run's ``Accelerator`` (CPU when no GPU), checked against ``--expect_world_size``."""
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # a real multi-rank gloo run on CPU needs cpu=True
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir),
                                            logging_dir=str(output_dir / args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    world = accelerator.num_processes
    if args.expect_world_size is not None and world != args.expect_world_size:
        raise ValueError(
            f"expected world size {args.expect_world_size} but this run has {world} process(es); on CPU launch "
            f"`accelerate launch --multi_gpu --num_processes {args.expect_world_size} --num_cpu_threads_per_process 1 ...`")
    logger.info(f"world size {world} ({accelerator.distributed_type}), device {accelerator.device}")
    return accelerator


def _prepare_output_dir(args: argparse.Namespace, output_dir: Path, accelerator: Accelerator) -> Optional[Path]:
    """Refuse to overwrite a trained pipeline unasked, create the folder, clear what a new run replaces; return the
    checkpoint to resume from (None: a fresh start)."""
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ValueError("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: "
                         "pass only one of them")
    resume_path = resolve_resume(args, output_dir)
    # Checked on every rank (an error on one rank only would leave the others waiting).
    if resume_path is None and (output_dir / "model_index.json").exists() and not args.overwrite_output_dir:
        raise ValueError(f"{output_dir} already holds a trained pipeline; pass --overwrite_output_dir, "
                         f"--resume_from_checkpoint latest, or another --output_dir")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_incomplete(output_dir)
        if args.overwrite_output_dir:  # a new run: a later `--resume_from_checkpoint latest` must find only its own
            clear_checkpoints(output_dir)
    accelerator.wait_for_everyone()
    return resume_path


def _new_unet(args: argparse.Namespace) -> Tuple[UNet2DModel, int]:
    """The seeded initial UNet (the same weights on every rank) and its parameter count."""
    set_seed(args.seed)
    unet = make_unet(args.preset, **unet_args(args))
    num_params = count_parameters(unet)
    logger.info(f"UNet2DModel ({args.preset} preset): {num_params:,} parameters ({num_params / 1e6:.2f}M) "
                f"on {args.crop_size} px crops of {args.resolution} px images")
    return unet, num_params


def _new_ema(args: argparse.Namespace, unet: UNet2DModel) -> Optional[EMAModel]:
    """The moving average of ``unet``'s weights with ``--use_ema``, else None."""
    if not args.use_ema:
        return None
    return EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, inv_gamma=args.ema_inv_gamma,
                    power=args.ema_power, model_cls=UNet2DModel, model_config=unet.config)


def _new_optimizer(args: argparse.Namespace, unet: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam (the thesis) or AdamW over ``unet``'s parameters, with the flags' settings."""
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    return opt_cls(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                   weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def step_plan(args: argparse.Namespace, num_images: int, world: int) -> Tuple[int, int, int, int]:
    """``(num_batches, steps_per_epoch, max_train_steps, num_epochs)`` of a run over ``num_images`` training images
    with ``world`` processes: the prepared dataloader yields this process's share of the batches."""
    num_batches = math.ceil(num_images / (args.train_batch_size * world))
    steps_per_epoch = math.ceil(num_batches / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    return num_batches, steps_per_epoch, max_train_steps, num_epochs


def fixed_validation_draws(args: argparse.Namespace,
                           val_images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed validation crops (2 per image, when training on crops), noise and timesteps: the same draw every epoch,
    so the curve is comparable. Returns ``(images (V, 3, C, C), noise (V, 3, C, C), timesteps (V,))``."""
    if args.crop_size < args.resolution and val_images.shape[0]:
        gcrop = torch.Generator().manual_seed(args.seed + 20_011)
        val_images = torch.cat([random_crops(val_images, args.crop_size, gcrop) for _ in range(2)])
    gval = torch.Generator().manual_seed(args.seed + 10_007)
    val_noise = torch.randn(val_images.shape, generator=gval)
    val_timesteps = torch.randint(0, args.num_train_timesteps, (val_images.shape[0],), generator=gval)
    return val_images, val_noise, val_timesteps


def _setup_run(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path, start_time: float) -> _Run:
    """Load the data, build the model, scheduler, optimiser and dataloader, prepare them with ``accelerator``, draw
    the fixed validation set and start the training log (and the trackers)."""
    world = accelerator.num_processes
    train_dataset, val_images = load_data(args, accelerator)
    unet, num_params = _new_unet(args)
    noise_scheduler = make_scheduler(args.num_train_timesteps)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(accelerator.device)
    ema = _new_ema(args, unet)
    optimizer = _new_optimizer(args, unet)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed))
    num_batches, steps_per_epoch, max_train_steps, num_epochs = step_plan(args, len(train_dataset), world)
    # The prepared lr scheduler steps once per process per optimiser step (accelerate's convention).
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * world,
                                 num_training_steps=max_train_steps * world)
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader, lr_scheduler)
    if ema is not None:  # its state goes into diffad's own safetensors, never accelerate's pickle
        ema.to(accelerator.device)
    if len(train_dataloader) != num_batches:  # internal invariant: our step arithmetic matches accelerate's
        raise RuntimeError(f"expected {num_batches} batches per process, accelerate gives {len(train_dataloader)}")
    val_images, val_noise, val_timesteps = fixed_validation_draws(args, val_images)

    config = {k: v for k, v in vars(args).items()}
    config.update(num_parameters=num_params, world_size=world, unet_config=dict(unet_unwrapped_config(accelerator, unet)),
                  num_train_images=len(train_dataset), num_validation_images=int(val_images.shape[0]),
                  steps_per_epoch=steps_per_epoch, max_train_steps=max_train_steps, num_epochs_planned=num_epochs,
                  total_batch_size=args.train_batch_size * world * args.gradient_accumulation_steps,
                  distributed_type=str(accelerator.distributed_type), mixed_precision=accelerator.mixed_precision)
    log = TrainingLog(config)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers("train_ddpm", config={k: v for k, v in config.items()
                                                        if isinstance(v, (int, float, str, bool))})
    return _Run(args=args, accelerator=accelerator, output_dir=output_dir, start_time=start_time, unet=unet, ema=ema,
                num_params=num_params, noise_scheduler=noise_scheduler, alphas_cumprod=alphas_cumprod,
                optimizer=optimizer, lr_scheduler=lr_scheduler, train_dataloader=train_dataloader,
                num_batches=num_batches, steps_per_epoch=steps_per_epoch, max_train_steps=max_train_steps,
                num_epochs=num_epochs, val_images=val_images, val_noise=val_noise, val_timesteps=val_timesteps,
                log=log)


def _resume(run: _Run, resume_path: Path) -> None:
    """Continue ``run`` from the checkpoint ``resume_path``: the model, optimiser, scheduler and EMA states, the
    counters, the log and the best weights so far. A checkpoint of another run is refused in one line."""
    accelerator, state = run.accelerator, run.state
    saved = json.loads((resume_path / CHECKPOINT_MARKER).read_text())
    # before loading any tensor: a checkpoint of another run is refused in one line (no size-mismatch dump)
    check_resume_config(resume_path, saved, run.log.config, RESUME_KEYS)
    logger.info(f"resuming from {resume_path}")
    accelerator.load_state(str(resume_path))
    if run.ema is not None:
        load_ema_state(run.ema, saved.get("ema") or {}, resume_path)
    state.update(saved["state"])
    run.log.load_state_dict(saved["log"])
    state["resumed_from"] = list(state["resumed_from"]) + [{"checkpoint": str(resume_path),
                                                            "global_step": state["global_step"]}]
    if (resume_path / BEST_WEIGHTS).is_file():
        run.best_weights = load_file(str(resume_path / BEST_WEIGHTS))
    if saved.get("steps_per_epoch") != run.steps_per_epoch:
        raise ValueError(f"{resume_path} was written with {saved.get('steps_per_epoch')} steps per epoch, this run "
                         f"has {run.steps_per_epoch}: resume with the same batch size, data and number of processes")


def _train_epochs(run: _Run) -> str:
    """Train until the step, epoch or time budget is spent, validating after every epoch (also a partial last
    one); return what stopped the run (``"max_train_steps"``, ``"num_epochs"`` or ``"max_train_minutes"``)."""
    args, state = run.args, run.state
    stop_reason = "max_train_steps" if args.max_train_steps else "num_epochs"
    # With a time budget and no step limit the bar counts seconds of the budget (the step total is unknown).
    time_budget = args.max_train_minutes * 60 if args.max_train_minutes else None
    progress = TrainingProgress(max_steps=None if (time_budget and not args.max_train_steps) else run.max_train_steps,
                                time_budget=time_budget, initial_steps=state["global_step"],
                                initial_seconds=state["train_seconds"], desc="steps",
                                disable=not run.accelerator.is_local_main_process)
    first_epoch = state["epoch"]
    stopped = False
    for epoch in range(first_epoch, run.num_epochs):
        if stopped or (epoch != first_epoch and state["global_step"] >= run.max_train_steps):
            break
        stopped, out_of_time = _train_epoch(run, epoch, progress, time_budget)
        if out_of_time:
            stop_reason = "max_train_minutes"
        _validate_epoch(run, epoch)
    progress.close()
    return stop_reason


def _train_epoch(run: _Run, epoch: int, progress: TrainingProgress,
                 time_budget: Optional[float]) -> Tuple[bool, bool]:
    """One epoch (or the rest of the one a resume continues), checkpointing every ``--checkpointing_steps``.
    Returns ``(stopped, out_of_time)``: whether a budget ended the run, and whether it was the time budget."""
    args, accelerator, state = run.args, run.accelerator, run.state
    run.unet.train()
    if epoch != state["epoch"]:  # a new epoch (not the one a resume continues)
        state.update(epoch=epoch, batches_in_epoch=0, epoch_loss_sum=0.0, epoch_batches=0, epoch_samples=0,
                     epoch_seconds=0.0)
    run.train_dataloader.set_epoch(epoch)
    loader = run.train_dataloader
    if state["batches_in_epoch"]:
        loader = accelerator.skip_first_batches(run.train_dataloader, state["batches_in_epoch"])
        loader.set_epoch(epoch)
    stopped = out_of_time = False
    tick = time.time()
    for batch_index, batch in enumerate(loader, start=state["batches_in_epoch"]):
        if state["global_step"] >= run.max_train_steps:  # e.g. resumed from the very last checkpoint
            return True, False
        loss, num_images = _training_step(run, batch, epoch, batch_index)
        state["batches_in_epoch"] = batch_index + 1
        state["epoch_loss_sum"] += float(loss.detach())
        state["epoch_batches"] += 1
        state["epoch_samples"] += num_images
        if not accelerator.sync_gradients:
            continue
        if run.ema is not None:
            run.ema.step(run.unet.parameters())
        state["global_step"] += 1
        step_loss = float(loss.detach())
        state["step_losses"].append(step_loss)
        if args.report_to != "none":
            accelerator.log({"train_loss": step_loss, "lr": run.lr_scheduler.get_last_lr()[0]}, step=state["global_step"])

        now = time.time()
        state["epoch_seconds"] += now - tick
        state["train_seconds"] += now - tick
        tick = now
        progress.step(state["global_step"], state["train_seconds"], loss=f"{step_loss:.4f}",
                      lr=f"{run.lr_scheduler.get_last_lr()[0]:.2e}")
        if state["global_step"] >= run.max_train_steps:
            stopped = True
        elif time_budget_spent(accelerator, state["train_seconds"], time_budget):
            stopped = out_of_time = True
        if state["global_step"] % args.checkpointing_steps == 0:
            _save_checkpoint(run)
            tick = time.time()  # checkpoint I/O is not training time
        if stopped:
            break
    return stopped, out_of_time


def _training_step(run: _Run, batch: Dict[str, Any], epoch: int, batch_index: int) -> Tuple[torch.Tensor, int]:
    """One batch's draws (crops, augmentations, noise, timesteps, the self-conditioning coin: from
    :func:`seeded_generator` of the batch's position, so a resume draws the same), its forward and backward pass
    and (once the gradients are accumulated) the optimiser step. Returns ``(loss, number of images)``."""
    args, accelerator, unet = run.args, run.accelerator, run.unet
    g = seeded_generator(args.seed, epoch, batch_index, accelerator.process_index)  # the same draws after a resume
    clean = random_crops(batch["pixel_values"].float(), args.crop_size, g)
    if args.random_flip or args.random_rot90:
        clean = augment_batch(clean.cpu(), g, flip=args.random_flip, rot90=args.random_rot90).to(accelerator.device)
    noise = torch.randn(clean.shape, generator=g).to(accelerator.device)
    timesteps = torch.randint(0, args.num_train_timesteps, (clean.shape[0],), generator=g).to(accelerator.device)
    self_condition = bool(torch.rand((), generator=g) < args.self_condition_prob)
    noisy = run.noise_scheduler.add_noise(clean, noise, timesteps)

    with accelerator.accumulate(unet):
        # 1. predict noise (self-conditioned on a no-grad x0 estimate half of the time)
        eps = self_conditioned_eps(unet, noisy, timesteps, run.alphas_cumprod, self_condition)
        # 2. epsilon loss (Ho et al. 2020, eq. 14)
        loss = F.mse_loss(eps.float(), noise.float())
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return loss, int(clean.shape[0])


def _save_checkpoint(run: _Run) -> None:
    """A resumable checkpoint of ``run`` at its current step (with the EMA's state and the best weights so far)."""
    state = run.state
    ema_scalars, ema_tensors = ema_state(run.ema) if run.ema is not None else (None, None)
    save_checkpoint(run.accelerator, run.output_dir, state["global_step"],
                    {"state": state, "log": run.log.state_dict(), "steps_per_epoch": run.steps_per_epoch,
                     "ema": ema_scalars},
                    run.best_weights, run.args.checkpoints_total_limit, tensors=ema_tensors)


def _validate_epoch(run: _Run, epoch: int) -> None:
    """After an epoch: the validation loss (of the EMA weights with ``--use_ema``), the best weights so far, and
    the epoch's record in the log (and the trackers); the main process saves the log."""
    args, accelerator, state, ema = run.args, run.accelerator, run.state, run.ema
    samples = accelerator.gather(torch.tensor([state["epoch_samples"]], device=accelerator.device)).tolist()
    loss_stats = accelerator.reduce(torch.tensor([state["epoch_loss_sum"], state["epoch_batches"]],
                                                 dtype=torch.float64, device=accelerator.device), reduction="sum")
    train_loss = float(loss_stats[0] / max(float(loss_stats[1]), 1.0))
    model = accelerator.unwrap_model(run.unet)
    model.eval()
    val_loss = val_loss_plain = None
    if run.val_images.shape[0] > 0:
        if ema is not None:
            ema.store(model.parameters())
            ema.copy_to(model.parameters())
        val_loss, val_loss_plain = validation_losses(model, run.val_images, run.val_noise, run.val_timesteps,
                                                     run.alphas_cumprod, accelerator, args.eval_batch_size)
        if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
            state["best_val_loss"], state["best_epoch"] = val_loss, epoch
            run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if ema is not None:
            ema.restore(model.parameters())
    model.train()
    epoch_images = sum(samples)
    record = {"epoch": epoch, "global_step": state["global_step"], "train_loss": train_loss, "val_loss": val_loss,
              "val_loss_no_self_cond": val_loss_plain, "lr": run.lr_scheduler.get_last_lr()[0],
              "epoch_seconds": state["epoch_seconds"], "images": epoch_images,
              "images_per_second": epoch_images / max(state["epoch_seconds"], 1e-9),
              "samples_per_rank": samples, "partial": state["batches_in_epoch"] < run.num_batches}
    run.log.add_epoch(record)
    logger.info(f"epoch {epoch}: step {state['global_step']} train_loss {train_loss:.4f} "
                + (f"val_loss {val_loss:.4f}" if val_loss is not None else "(no validation images)"))
    if args.report_to != "none":
        accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=state["global_step"])
    if accelerator.is_main_process:
        run.log.save(run.output_dir / "training_log.json")


def _save_pipeline_and_log(run: _Run, stop_reason: str) -> None:
    """Save the pipeline (the best-by-validation weights, EMA ones with ``--use_ema``, else the last) and the
    training log with its summary into the output folder (main process)."""
    args, state, ema, log = run.args, run.state, run.ema, run.log
    final = make_unet(args.preset, **unet_args(args))
    if run.best_weights is not None:
        final.load_state_dict(run.best_weights)
        weights = "best validation" + (" (EMA)" if ema is not None else "")
    else:
        final.load_state_dict(run.accelerator.unwrap_model(run.unet).state_dict())
        if ema is not None:
            ema.copy_to(final.parameters())
        weights = "last" + (" (EMA)" if ema is not None else "")
    working = args.resolution if args.crop_size < args.resolution else None
    pipeline = SelfAwareInpaintPipeline(unet=final, scheduler=make_scheduler(args.num_train_timesteps),
                                        working_resolution=working)
    save_pipeline(pipeline, run.output_dir)

    wall = time.time() - run.start_time
    total_images = sum(e["images"] for e in log.epochs)
    total_seconds = sum(e["epoch_seconds"] for e in log.epochs)
    log.summary = {"best_epoch": state["best_epoch"], "best_val_loss": state["best_val_loss"],
                   "saved_weights": weights, "total_optimizer_steps": state["global_step"],
                   "max_train_steps": run.max_train_steps, "stopped_by": stop_reason,
                   "train_seconds": state["train_seconds"], "wall_seconds_this_run": wall,
                   "images_per_second": total_images / max(total_seconds, 1e-9),
                   "num_parameters": run.num_params, "world_size": run.accelerator.num_processes,
                   "resumed_from": state["resumed_from"], "step_losses": state["step_losses"]}
    log.save(run.output_dir / "training_log.json")
    logger.info(f"saved {weights} weights to {run.output_dir} (best epoch {state['best_epoch']}, "
                f"{state['global_step']} optimiser steps, {log.summary['images_per_second']:.1f} images/s)")


def unet_unwrapped_config(accelerator: Accelerator, unet: torch.nn.Module) -> Dict[str, Any]:
    """The UNet's diffusers config as a plain dict (for the training log)."""
    return {k: v for k, v in accelerator.unwrap_model(unet).config.items() if not k.startswith("_")}


if __name__ == "__main__":
    sys.exit(run_with_clear_errors(lambda: main(parse_args()), PROG))
