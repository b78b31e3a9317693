# Self-aware inpainting pipeline (Semchyshyn, 2023), community-pipeline format.
# This file ships inside every Hub repo: it imports only torch, diffusers and numpy.
"""SelfAwareInpaintPipeline: DDPM reconstruction by self-aware inpainting for anomaly detection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput


def predict_noise(
    unet: UNet2DModel,
    x_t: torch.Tensor,
    timesteps: torch.Tensor,
    x0_prev: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Self-conditioned noise prediction ``eps_theta(x_t, t | x0_prev)`` (Chen et al., "Analog Bits", 2022).

    Args:
        unet: a ``UNet2DModel`` with ``in_channels = 2 * out_channels`` (6 in, 3 out).
        x_t: noisy images, ``(B, 3, R, R)``.
        timesteps: ``(B,)`` or scalar integer timesteps.
        x0_prev: the model's previous estimate of the clean image, ``(B, 3, R, R)`` in [-1, 1];
            zeros when there is none.

    Returns:
        The predicted noise, ``(B, 3, R, R)``.
    """
    if x0_prev is None:
        x0_prev = torch.zeros_like(x_t)
    return unet(torch.cat([x_t, x0_prev], dim=1), timesteps).sample


@dataclass
class SelfAwareInpaintPipelineOutput(BaseOutput):
    """Output of :class:`SelfAwareInpaintPipeline` (filled in by the pipeline issue)."""

    anomaly_maps: np.ndarray
    scores: np.ndarray
    is_anomalous: np.ndarray
    masks: np.ndarray
    reconstructions: np.ndarray


class SelfAwareInpaintPipeline(DiffusionPipeline):
    """Anomaly detection by self-aware DDPM inpainting (placeholder until the pipeline issue lands)."""

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, segmenter: Optional[UNet2DModel] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, segmenter=segmenter)
