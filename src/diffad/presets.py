"""Model presets: the denoising UNet (``thesis``, ``small``, ``tiny``), the DDPM scheduler and the segmenter.

Every model here is a stock diffusers :class:`~diffusers.UNet2DModel`, so any diffusers
install loads what diffad saves. The denoiser takes 6 input channels (the noisy image ``x_t``
concatenated with the self-conditioning estimate ``x0_hat``, Chen et al. 2022) and predicts
the 3-channel noise; the segmenter takes an image concatenated with its reconstruction
(6 channels) and predicts one channel of defect logits (DRAEM-style, Zavrtanik et al. 2021).

Parameter counts (6 in, 3 out; run ``python -m diffad.presets`` to recompute them):

========  =====================================  ===================  ==========  ==========
preset    ``block_out_channels``                 layers / attention   params      resolution
========  =====================================  ===================  ==========  ==========
thesis    (128, 256, 384, 512, 1024)             2 / at 32 and 16 px  274.9M      256
cpu       (16, 32, 64)                           1 / none             0.64M       64 crops of 256
small     (32, 64, 128, 128)                     2 / at 8 px          6.3M        64 (or 128)
tiny      (16, 32, 64)                           1 / at 8 px          0.69M       32 (or 64)
========  =====================================  ===================  ==========  ==========

The thesis reports "~271M parameters" for its 4-down/4-up UNet (five widths, four
down-samplings); the diffusers re-creation above has 274.9M, within 1.5%.

The scheduler is diffusers' ``DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid")``.
Mind that diffusers' "sigmoid" betas (GeoDiff, 1.5e-4 .. 2e-2) are *not* lucidrains'
``sigmoid_beta_schedule`` (which defines alphas-cumprod directly); diffad uses diffusers'.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any, Dict, Sequence, Tuple

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffad.pipelines.self_aware_inpaint.pipeline import SEGMENTER_INPUTS

__all__ = [
    "UNET_PRESETS",
    "PRESET_NAMES",
    "make_unet",
    "make_scheduler",
    "make_segmenter",
    "unet_kwargs",
    "preset_defaults",
    "preset_table",
    "count_parameters",
    "block_types",
]

# Each preset: the UNet's shape plus the training defaults that suit it. Any value can be
# overridden (``make_unet(preset, **overrides)``, or the training script's flags).
UNET_PRESETS: Dict[str, Dict[str, Any]] = {
    # Semchyshyn (2023): 4 down / 4 up levels, two ResNet blocks each, self-attention at the
    # 32 and 16 px levels, Adam 2e-5, batch 16, 500 epochs, 256 px. Needs a GPU.
    "thesis": {
        "block_out_channels": (128, 256, 384, 512, 1024),
        "layers_per_block": 2,
        "attention_resolutions": (32, 16),
        "norm_num_groups": 32,
        "resolution": 256,
        "train_batch_size": 16,
        "learning_rate": 2e-5,
        "num_epochs": 500,
        "optimizer": "adam",
        "lr_warmup_steps": 0,
    },
    # What this 2-core CPU trains in an hour or two at 64 px; attention at the 8 px level
    # (the lowest at 64 px; at 128 px pass attention_resolutions=(16,) for the same shape).
    "small": {
        "block_out_channels": (32, 64, 128, 128),
        "layers_per_block": 2,
        "attention_resolutions": (8,),
        "norm_num_groups": 32,
        "resolution": 64,
        "train_batch_size": 16,
        "learning_rate": 2e-4,
        "num_epochs": 100,
        "optimizer": "adam",
        "lr_warmup_steps": 100,
    },
    # The CPU default (`diffad train` with no flags): the tiny UNet's shape on 64 px crops of 256 px images, inspected
    # in overlapping 64 px tiles: a defect of a few pixels at 256 px stays a few pixels. No attention (fully
    # convolutional, so a crop and a tile look alike); a budget in optimiser steps, EMA weights.
    "cpu": {
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "attention_resolutions": (),
        "norm_num_groups": 8,
        "resolution": 256,
        "crop_size": 64,
        "train_batch_size": 16,
        "learning_rate": 1e-3,
        "num_epochs": 100,
        "max_train_steps": 1500,
        "use_ema": True,
        "optimizer": "adam",
        "lr_warmup_steps": 50,
        # `diffad train` then calibrates and trains the learned head (training/train_segmenter.py defaults): the
        # default detector's combined map reads it
        "head": True,
    },
    # For tests and the demo: trains in seconds at 32 px. Groups of 8 channels fit width 16.
    "tiny": {
        "block_out_channels": (16, 32, 64),
        "layers_per_block": 1,
        "attention_resolutions": (8,),
        "norm_num_groups": 8,
        "resolution": 32,
        "train_batch_size": 8,
        "learning_rate": 1e-3,
        "num_epochs": 20,
        "optimizer": "adam",
        "lr_warmup_steps": 10,
    },
}
PRESET_NAMES: Tuple[str, ...] = tuple(UNET_PRESETS)

# Keys of a preset that shape the UNet (the rest are training defaults).
_ARCH_KEYS = ("block_out_channels", "layers_per_block", "attention_resolutions", "norm_num_groups", "resolution")
#: Training defaults only some presets set (None elsewhere): the crop, a step budget, EMA.
_OPTIONAL_KEYS = ("crop_size", "max_train_steps", "use_ema", "head")


def _check_preset(preset: str) -> Dict[str, Any]:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESET_NAMES)}")
    return deepcopy(UNET_PRESETS[preset])


def block_types(
    block_out_channels: Sequence[int], resolution: int, attention_resolutions: Sequence[int]
) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """The UNet's down and up block types: attention blocks at the levels whose feature maps
    are ``attention_resolutions`` pixels wide (level ``i`` works at ``resolution / 2**i``).

    Returns:
        ``(down_block_types, up_block_types)``, each of length ``len(block_out_channels)``.
    """
    levels = len(block_out_channels)
    sizes = [resolution // 2**i for i in range(levels)]
    attn = [size in set(attention_resolutions) for size in sizes]
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return down, up


def unet_kwargs(preset: str, **overrides: Any) -> Dict[str, Any]:
    """The ``UNet2DModel`` constructor arguments of a preset, with ``overrides`` applied.

    Args:
        preset: one of ``PRESET_NAMES``.
        **overrides: any of ``block_out_channels``, ``layers_per_block``,
            ``attention_resolutions``, ``norm_num_groups``, ``resolution`` (the UNet's
            ``sample_size``), or any other ``UNet2DModel`` argument (passed through).
            ``None`` values are ignored, so argparse defaults can be passed as they are.

    Raises:
        ValueError: unknown preset, or a resolution the UNet cannot down-sample evenly, or
            widths not divisible by ``norm_num_groups``.
    """
    config = _check_preset(preset)
    config["resolution"] = config.get("crop_size") or config["resolution"]  # the UNet's input: the crop
    overrides = {k: v for k, v in overrides.items() if v is not None}
    arch = {k: overrides.pop(k, config[k]) for k in _ARCH_KEYS}
    # Training defaults may be passed along with a preset's dict: they do not shape the UNet.
    for key in set(config) - set(_ARCH_KEYS):
        overrides.pop(key, None)
    widths = tuple(int(c) for c in arch["block_out_channels"])
    resolution = int(arch["resolution"])
    groups = int(arch["norm_num_groups"])
    if len(widths) < 2:
        raise ValueError(f"block_out_channels={widths} needs at least 2 levels")
    factor = 2 ** (len(widths) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(
            f"resolution {resolution} must be a positive multiple of {factor} for {len(widths)} UNet levels "
            f"(block_out_channels={widths}); pick e.g. {-(-resolution // factor) * factor}"
        )
    bad = [c for c in widths if c % groups]
    if bad:
        raise ValueError(f"block_out_channels {widths} must all be divisible by norm_num_groups={groups} (not {bad})")
    if int(arch["layers_per_block"]) < 1:
        raise ValueError(f"layers_per_block must be >= 1, got {arch['layers_per_block']}")
    down, up = block_types(widths, resolution, arch["attention_resolutions"])
    kwargs: Dict[str, Any] = {
        "sample_size": resolution,
        "in_channels": 6,
        "out_channels": 3,
        "block_out_channels": widths,
        "layers_per_block": int(arch["layers_per_block"]),
        "down_block_types": down,
        "up_block_types": up,
        "norm_num_groups": groups,
    }
    kwargs.update(overrides)
    return kwargs


def make_unet(preset: str = "tiny", **overrides: Any) -> UNet2DModel:
    """A freshly initialised self-conditioned denoiser: ``UNet2DModel`` with 6 inputs, 3 outputs.

    Call it as ``unet(torch.cat([x_t, x0_hat], 1), t).sample`` (or through
    ``diffad.pipelines.self_aware_inpaint.pipeline.predict_noise``) with ``x_t`` and ``x0_hat``
    of shape ``(B, 3, R, R)`` in [-1, 1] (``R = unet.config.sample_size``); returns the predicted
    noise ``(B, 3, R, R)``. Weights are drawn from torch's global RNG: seed it (e.g.
    ``torch.manual_seed``) before the call for reproducible initialisation.

    Args:
        preset: ``"thesis"``, ``"small"`` or ``"tiny"``.
        **overrides: see :func:`unet_kwargs`.
    """
    return UNet2DModel(**unet_kwargs(preset, **overrides))


def make_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The thesis's noise schedule: ``DDPMScheduler(num_train_timesteps, beta_schedule="sigmoid")``,
    epsilon prediction (diffusers' GeoDiff sigmoid betas, not lucidrains' sigmoid schedule)."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="sigmoid", prediction_type="epsilon")


def make_segmenter(
    resolution: int = 64,
    *,
    block_out_channels: Sequence[int] = (16, 32, 64),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_resolutions: Sequence[int] = (),
    in_channels: int = 7,
) -> UNet2DModel:
    """A DRAEM-style discriminative segmenter as a stock ``UNet2DModel`` (7 in, 1 out) on tiles of ``resolution``.

    Input (the pipeline's ``segmenter_logits``): the image, its reconstruction (``[-1, 1]``) and the clipped
    ``log(Q / Q_p)``, ``(B, 7, R, R)`` (``in_channels=6``: the image and reconstruction only, the thesis's),
    called at timestep 0; output ``.sample``: defect logits ``(B, 1, R, R)`` (sigmoid gives the probability that
    a pixel is defective). ~0.64M parameters with the defaults.

    Raises:
        ValueError: a resolution not divisible by ``2 ** (len(block_out_channels) - 1)`` or
            widths not divisible by ``norm_num_groups``.
    """
    widths = tuple(int(c) for c in block_out_channels)
    factor = 2 ** (len(widths) - 1)
    if resolution < factor or resolution % factor:
        raise ValueError(f"segmenter resolution {resolution} must be a positive multiple of {factor}")
    if in_channels not in SEGMENTER_INPUTS:
        raise ValueError(f"segmenter in_channels must be 6 (image, reconstruction) or 7 (+ noise error); got {in_channels}")
    if any(c % norm_num_groups for c in widths):
        raise ValueError(f"segmenter block_out_channels {widths} must be divisible by norm_num_groups={norm_num_groups}")
    down, up = block_types(widths, resolution, attention_resolutions)
    return UNet2DModel(
        sample_size=resolution,
        in_channels=in_channels,
        out_channels=1,
        block_out_channels=widths,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=norm_num_groups,
    )


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (all, or only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def preset_table() -> str:
    """A markdown table of every preset's shape, parameter count and training defaults."""
    rows = ["| preset | block_out_channels | layers | attention at (px) | params | resolution | batch | lr | epochs |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, cfg in UNET_PRESETS.items():
        with torch.device("meta"):
            n = count_parameters(make_unet(name))
        rows.append(
            f"| {name} | {cfg['block_out_channels']} | {cfg['layers_per_block']} | "
            f"{[r for r in cfg['attention_resolutions'] if r <= cfg['resolution']]} | {n / 1e6:.2f}M | "
            f"{cfg['resolution']} | {cfg['train_batch_size']} | {cfg['learning_rate']:g} | {cfg['num_epochs']} |"
        )
    return "\n".join(rows)


def preset_defaults(preset: str) -> Dict[str, Any]:
    """A copy of a preset's full entry: UNet shape and training defaults (batch, lr, epochs, ...).

    Raises:
        ValueError: unknown preset.
    """
    return {**dict.fromkeys(_OPTIONAL_KEYS), **_check_preset(preset)}


if __name__ == "__main__":  # python -m diffad.presets
    print(preset_table())
