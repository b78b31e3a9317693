"""Tiny seeded diffusers components for fast tests (as diffusers' own fast pipeline tests build them)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from diffusers import DDPMScheduler, UNet2DModel

from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline

RESOLUTION = 32


def tiny_unet(out_channels: int = 3, *, seed: int = 0, block_out_channels=(16, 32)) -> UNet2DModel:
    """A seeded random-weight ``UNet2DModel`` at 32 px: 6 -> 3 (denoiser) or 6 -> 1 (segmenter)."""
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=RESOLUTION, in_channels=6, out_channels=out_channels,
                       block_out_channels=block_out_channels, layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def tiny_pipeline(*, segmenter: bool = False, seed: int = 0) -> SelfAwareInpaintPipeline:
    """An uncalibrated random-weight pipeline (progress bars off), optionally with a tiny segmenter."""
    pipe = SelfAwareInpaintPipeline(
        unet=tiny_unet(seed=seed), scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid"),
        segmenter=tiny_unet(1, seed=seed + 1, block_out_channels=(8, 16)) if segmenter else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_images(n: int, *, seed: int = 0) -> torch.Tensor:
    """``(n, 3, 32, 32)`` uniform images in [-1, 1]."""
    return torch.rand(n, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed)) * 2 - 1


#: A cheap sampler for mechanics tests: 1 mask pass + 2 x 1 inpainting passes, 2 denoising steps.
CHEAP_CONFIG = SamplingConfig(mask_timesteps=(300,), mask_noise_draws=1, reconstruction_steps=2, resample_steps=1,
                              denoise_steps=2)


def calibrate_cheaply(pipe: SelfAwareInpaintPipeline, images: Optional[torch.Tensor] = None) -> SelfAwareInpaintPipeline:
    """Calibrate both methods with :data:`CHEAP_CONFIG` on 4 random images (cheap, for mechanics only)."""
    pipe.calibrate(random_images(4) if images is None else images, config=CHEAP_CONFIG,
                   generator=torch.Generator().manual_seed(0))
    return pipe


def saved_tiny_pipeline(folder: Path, *, calibrated: bool = True) -> Path:
    """Save a tiny pipeline (calibrated cheaply unless told otherwise) to ``folder``."""
    pipe = tiny_pipeline()
    if calibrated:
        calibrate_cheaply(pipe)
    pipe.save_pretrained(folder)
    return folder
