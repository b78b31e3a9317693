# The anomaly maps (diffad, community-pipeline format): ships beside pipeline.py in every Hub repo; torch and numpy.
"""The maps that compare an image with its reconstruction (the thesis's multi-scale error, a DRAEM-style
segmenter's defect probability), their ``combined`` mean, the mean filter every map is smoothed by, and the
per-pixel quantile the calibration fits ``Q_p`` and the image thresholds with."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

#: The multi-scale error, the learned (segmenter) map, the noise error ``Q / Q_p`` and ``combined`` (self_aware
#: only): the mean of the :data:`COMBINED_MAPS` a pipeline has, each over its calibrated image threshold.
MAP_NAMES = ("multiscale", "learned", "noise_error", "combined")
COMBINED_MAPS = ("noise_error", "multiscale", "learned")
#: The segmenter's inputs by its ``in_channels``: the image and its reconstruction (DRAEM, the thesis) and, with 7,
#: the self-aware noise error ``log(Q / Q_p)`` (what the model itself found suspicious).
SEGMENTER_INPUTS = {6: ("image", "reconstruction"), 7: ("image", "reconstruction", "noise_error")}


def mean_filter(maps: torch.Tensor, size: int) -> torch.Tensor:
    """``size x size`` mean filter of ``(B, R, R)`` maps, reflect padding (1 = none)."""
    if size <= 1:
        return maps
    pad = size // 2
    mode = "reflect" if pad < min(maps.shape[-2:]) else "replicate"
    return F.avg_pool2d(F.pad(maps.unsqueeze(1), (pad, pad, pad, pad), mode=mode), size, stride=1)[:, 0]


def multiscale_anomaly_map(images: torch.Tensor, reconstructions: torch.Tensor, *, scales: Sequence[int] = (1, 2, 4, 8),
                           mean_filter_size: int = 9) -> torch.Tensor:
    """The thesis's multi-scale map ``(B, R, R)`` in [0, 2]: at each factor ``s`` both images are average-pooled,
    the absolute error is averaged over channels and upsampled (bilinear) to ``R``; the scales are averaged and
    smoothed by a ``mean_filter_size`` mean filter."""
    size = images.shape[-2:]
    total = torch.zeros(images.shape[0], 1, *size, dtype=images.dtype, device=images.device)
    for s in scales:
        a, b = (images, reconstructions) if s == 1 else (F.avg_pool2d(images, s), F.avg_pool2d(reconstructions, s))
        err = (a - b).abs().mean(dim=1, keepdim=True)
        total = total + (err if s == 1 else F.interpolate(err, size=size, mode="bilinear", align_corners=False))
    return mean_filter(total[:, 0] / len(scales), mean_filter_size)


def segmenter_logits(segmenter: UNet2DModel, images: torch.Tensor, reconstructions: torch.Tensor,
                     noise_ratios: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Defect logits ``(B, 1, R, R)`` of a DRAEM-style segmenter (a stock ``UNet2DModel`` called at timestep 0) fed
    the image and its reconstruction and, for a 7-channel one (:data:`SEGMENTER_INPUTS`), ``log(Q / Q_p)`` clipped
    to [-3, 3] from ``noise_ratios`` ``(B, R, R)`` = ``Q / Q_p``; ``sigmoid`` of them is the learned map."""
    inputs = [images, reconstructions]
    if "noise_error" in SEGMENTER_INPUTS[segmenter.config.in_channels]:
        if noise_ratios is None:
            raise ValueError("this segmenter reads the noise error Q / Q_p: only method='self_aware' has it")
        inputs.append(torch.log(noise_ratios.float().clamp_min(1e-6)).clamp(-3.0, 3.0).unsqueeze(1).to(images.dtype))
    timesteps = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
    return segmenter(torch.cat(inputs, dim=1), timesteps).sample


def per_pixel_quantile(maps: torch.Tensor, p: float) -> torch.Tensor:
    """The ``p``-quantile over images of ``(N, R, R)`` maps, pixel by pixel, at plotting position ``p (N + 1)``
    (numpy's "weibull"): a new image from the same distribution exceeds it with probability ``1 - p`` for any
    ``N`` (a linear quantile of 20 images is exceeded 23% of the time for p = 0.8). numpy: no limit on the size."""
    return torch.from_numpy(np.quantile(maps.cpu().numpy(), p, axis=0, method="weibull")).float()


def combined_map(maps: Dict[str, torch.Tensor], thresholds: Dict[str, float]) -> torch.Tensor:
    """The mean of the :data:`COMBINED_MAPS` in ``maps``, each divided by its calibrated image threshold (1 = a
    normal image's score at the target false-positive rate), so no map's scale dominates."""
    names = [name for name in COMBINED_MAPS if name in maps and thresholds.get(name) is not None]
    return sum(maps[name] / max(thresholds[name], 1e-12) for name in names) / len(names)


def default_mean_filter_size(resolution: int) -> int:
    """The default map filter for a tile of ``R`` px: the odd number nearest ``R / 5``, at least 3 (64 px -> 13).
    Chosen on validation with defects of every size (``R / 8``, the filter before, was preferred by small ones
    alone, which ranked the sizes against the test split's order)."""
    size = max(3, int(round(resolution / 5)))
    return size if size % 2 == 1 else size + 1
