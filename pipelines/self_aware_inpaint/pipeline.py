# Self-aware inpainting pipeline (Semchyshyn, 2023), community-pipeline format.
# This file ships inside every Hub repo: it imports only torch, diffusers and numpy.
"""SelfAwareInpaintPipeline: DDPM reconstruction by self-aware inpainting for anomaly detection.

References: Semchyshyn, "Automated visual inspection in the industrial setup via deep learning" (2023):
Algorithm 2 (the mask from the noise-prediction error), Algorithm 1 (resampled inpainting), the multi-scale map;
Ho et al., DDPM (2020): the posterior, eq. 6-7; Lugmayr et al., RePaint (2022): resampling with fresh noise;
Chen et al., Analog Bits (2022): self-conditioning; Zavrtanik et al., DRAEM (2021): the learned map.

Top to bottom: the stages (:class:`NoiseSchedule`, one function per algorithm, tiles, maps), the sampler's
:class:`SamplingConfig`, the :class:`AnomalyCalibration` component, and the pipeline that wires them.

Conventions: images are ``(B, 3, S, S)`` in [-1, 1] at the working resolution ``S``; the networks run on
``(3, R, R)`` tiles (``R``: the UNet's ``sample_size``) stitched back. ``anomaly_mask`` is 1 where pixels are
redrawn, ``known = 1 - anomaly_mask`` where they are kept. Timesteps are diffusers' 0-based indices into
``alphas_cumprod``: a start of ``T = 50`` noises to index 49 (the thesis's "t = 50").

A folder written by :meth:`SelfAwareInpaintPipeline.save_pretrained` carries this file (``pipeline.py``,
``calibration/pipeline.py``) and a ``model_index.json`` naming it, so ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` needs only diffusers; ``SelfAwareInpaintPipeline.from_pretrained(folder)`` needs no
remote code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

PIPELINE_FILE = "pipeline.py"  # this file's name inside every saved folder (model_index.json names it)
CALIBRATION_COMPONENT = "calibration"
#: ``"self_aware"``: the noise error, then a reconstruction (the thesis); ``"denoise"``: the basic baseline.
METHODS = ("self_aware", "denoise")
#: The multi-scale error, the learned (segmenter) map, the noise error ``Q / Q_p`` and ``combined`` (self_aware
#: only): the mean of the :data:`COMBINED_MAPS` a pipeline has, each over its calibrated image threshold.
MAP_NAMES = ("multiscale", "learned", "noise_error", "combined")
COMBINED_MAPS = ("noise_error", "multiscale", "learned")
#: The segmenter's inputs by its ``in_channels``: the image and its reconstruction (DRAEM, the thesis) and, with 7,
#: the self-aware noise error ``log(Q / Q_p)`` (what the model itself found suspicious).
SEGMENTER_INPUTS = {6: ("image", "reconstruction"), 7: ("image", "reconstruction", "noise_error")}
RENOISE_KINDS = ("fixed", "fresh")
RECONSTRUCTIONS = ("denoise", "inpaint")
PRECISIONS = ("fp32", "bf16")
SAMPLING_PRESETS = ("fast", "thesis")
ImageInput = Union[torch.Tensor, Any, Sequence[Any]]
Generators = List[torch.Generator]
_WARNED: set = set()  # (method, map) pairs already warned about having no threshold: once per process
TILE_BATCH = 32  # at most this many tiles go through a network at once (bounded memory at any resolution)


# =============================================================================== the stages


def predict_noise(unet: UNet2DModel, x_t: torch.Tensor, t: Union[int, torch.Tensor],
                  x0_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Self-conditioned noise prediction ``eps_theta(x_t, t | x0_prev)`` (Analog Bits), float32 ``(B, 3, R, R)``.

    ``x0_prev`` is the previous estimate of the clean image in [-1, 1] (zeros when there is none); ``t`` is one
    integer timestep or a ``(B,)`` tensor.
    """
    if x0_prev is None:
        x0_prev = torch.zeros_like(x_t)
    if not isinstance(t, torch.Tensor):
        t = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
    return unet(torch.cat([x_t, x0_prev.to(x_t.dtype)], dim=1), t).sample.float()


class NoiseSchedule:
    """The diffusion arithmetic over a ``DDPMScheduler``'s ``alphas_cumprod`` (``abar``), in float32: what
    diffusers' ``RePaintScheduler`` holds as ``add_noise``/``step``/``undo_step``, with the clean-image estimate as
    the posterior's input so that inpainting can paste the known pixels into it first."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod

    def _abar(self, t: int, device: torch.device) -> torch.Tensor:
        return self.alphas_cumprod[int(t)].float().to(device)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` (the forward process, as ``DDPMScheduler.add_noise``)."""
        abar = self._abar(t, x0.device)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def estimate_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: Union[int, torch.Tensor]) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` (Ho et al., eq. 15), clipped to [-1, 1];
        ``t``: one timestep or ``(B,)`` of them (the training script's self-conditioning pass)."""
        if isinstance(t, torch.Tensor):
            abar = self.alphas_cumprod.to(t.device)[t].float().view(-1, 1, 1, 1)
        else:
            abar = self._abar(t, x_t.device)
        return ((x_t.float() - (1 - abar).sqrt() * eps.float()) / abar.sqrt()).clamp(-1.0, 1.0)

    def step(self, x_t: torch.Tensor, x0: torch.Tensor, t: int, t_prev: int,
             noise: Optional[torch.Tensor]) -> torch.Tensor:
        """Sample the posterior ``q(x_{t_prev} | x_t, x0)`` (Ho et al., eq. 6-7), strided as ``DDPMScheduler.step``
        with fixed_small variance: with ``beta = 1 - abar_t / abar_prev``, mean ``sqrt(abar_prev) beta / (1 - abar_t)
        x0 + sqrt(1 - beta) (1 - abar_prev) / (1 - abar_t) x_t``, variance ``(1 - abar_prev) / (1 - abar_t) beta``.
        ``t_prev = -1`` is the clean image (``abar = 1``, no noise)."""
        abar_t = self._abar(t, x_t.device)
        abar_prev = self._abar(t_prev, x_t.device) if t_prev >= 0 else torch.ones_like(abar_t)
        beta = 1 - abar_t / abar_prev
        mean = ((abar_prev.sqrt() * beta / (1 - abar_t)) * x0
                + ((1 - beta).sqrt() * (1 - abar_prev) / (1 - abar_t)) * x_t)
        if t_prev < 0:
            return mean
        variance = ((1 - abar_prev) / (1 - abar_t) * beta).clamp(min=1e-20)
        return mean + variance.sqrt() * noise

    @staticmethod
    def timesteps(start: int, num_steps: int) -> List[Tuple[int, int]]:
        """``(t, t_prev)`` pairs of ``num_steps`` timesteps from ``start - 1`` down to 0, evenly spaced (all of them
        when equal; one step noises to ``T`` and jumps to the clean image, ``t_prev = -1``)."""
        if not 1 <= num_steps <= start:
            raise ValueError(f"num_steps must be in [1, {start}] for a start of {start}; got {num_steps}")
        ts = [int(t) for t in np.linspace(start - 1, 0, num_steps).round().astype(int)]
        return list(zip(ts, ts[1:] + [-1]))


def noise_error(unet: UNet2DModel, schedule: NoiseSchedule, x: torch.Tensor, timesteps: Sequence[int],
                noise_draws: int, generators: Generators) -> torch.Tensor:
    """Thesis Algorithm 2: the noise-prediction error ``Q(x)``, ``(B, R, R)`` >= 0.

    For each of ``noise_draws`` draws of ``eps ~ N(0, I)`` (one per image, from its own generator) and each ``t``:
    ``x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps`` and ``|eps_theta(x_t, t) - eps|``, averaged over channels, draws
    and timesteps (``noise_draws * len(timesteps)`` UNet passes). The thesis draws one ``eps`` shared by all ``t``.
    The UNet is not self-conditioned here: no earlier estimate exists.
    """
    q = torch.zeros(x.shape[0], *x.shape[-2:], device=x.device)
    for _ in range(noise_draws):
        eps = randn_tensor(x.shape, generator=generators, device=x.device, dtype=torch.float32)
        for t in timesteps:
            x_t = schedule.add_noise(x, eps, t)
            q += (predict_noise(unet, x_t, t) - eps).abs().mean(dim=1)
    return q / (noise_draws * len(timesteps))


def inpaint(unet: UNet2DModel, schedule: NoiseSchedule, x: torch.Tensor, anomaly_mask: torch.Tensor, *,
            start: int, num_steps: int, resample_steps: int, renoise: str, generators: Generators) -> torch.Tensor:
    """Thesis Algorithm 1: resampled inpainting of ``anomaly_mask`` (``(B, 1, R, R)`` in {0, 1}).

    Start from ``x_T = sqrt(abar_T)(known * x) + sqrt(1 - abar_T) eps``. At each of ``num_steps`` strided timesteps,
    ``resample_steps`` times: predict ``x0_hat``, paste the known pixels, and (except after the last repetition)
    re-noise to ``x_t`` with the start's ``eps`` (``renoise="fixed"``, the thesis) or fresh noise (``"fresh"``,
    RePaint); then take the DDPM posterior step. Self-conditioned on the previous pasted ``x0_hat``.
    ``num_steps * resample_steps`` UNet passes. Returns ``(B, 3, R, R)``, equal to ``x`` where the mask is 0.
    """
    known = 1.0 - anomaly_mask
    steps = schedule.timesteps(start, num_steps)
    eps = randn_tensor(x.shape, generator=generators, device=x.device, dtype=torch.float32)
    x_t = schedule.add_noise(known * x, eps, steps[0][0])
    x0_hat: Optional[torch.Tensor] = None
    for t, t_prev in steps:
        for r in range(resample_steps):
            # 1. predict the clean image and paste the known pixels into it
            x0_hat = known * x + anomaly_mask * schedule.estimate_x0(x_t, predict_noise(unet, x_t, t, x0_hat), t)
            if r < resample_steps - 1:
                # 2. resample: re-noise the harmonised estimate back to t
                noise = eps if renoise == "fixed" else randn_tensor(x.shape, generator=generators, device=x.device)
                x_t = schedule.add_noise(x0_hat, noise, t)
        # 3. step to the next noise level with the DDPM posterior
        noise = randn_tensor(x.shape, generator=generators, device=x.device) if t_prev >= 0 else None
        x_t = schedule.step(x_t, x0_hat, t, t_prev, noise)
    return known * x + anomaly_mask * x_t.clamp(-1.0, 1.0)


def denoise(unet: UNet2DModel, schedule: NoiseSchedule, x: torch.Tensor, *, start: int, num_steps: int,
            generators: Generators) -> torch.Tensor:
    """The thesis's basic baseline: noise ``x`` to ``T = start`` and run the DDPM reverse process over
    ``num_steps`` strided timesteps, no mask, self-conditioned (``num_steps`` UNet passes). ``(B, 3, R, R)``."""
    steps = schedule.timesteps(start, num_steps)
    eps = randn_tensor(x.shape, generator=generators, device=x.device, dtype=torch.float32)
    x_t = schedule.add_noise(x, eps, steps[0][0])
    x0_hat: Optional[torch.Tensor] = None
    for t, t_prev in steps:
        # 1. predict the clean image (self-conditioned on the last estimate)
        x0_hat = schedule.estimate_x0(x_t, predict_noise(unet, x_t, t, x0_hat), t)
        # 2. step x_t -> x_t_prev with the DDPM posterior
        noise = randn_tensor(x.shape, generator=generators, device=x.device) if t_prev >= 0 else None
        x_t = schedule.step(x_t, x0_hat, t, t_prev, noise)
    return x_t.clamp(-1.0, 1.0)


def tile_origins(size: int, tile: int) -> List[int]:
    """Top (or left) coordinates of the tiles that cover ``size`` pixels with ``tile``-pixel tiles overlapping by at
    least a quarter of a tile; the first starts at 0, the last ends at ``size`` (one tile when ``tile >= size``)."""
    if tile >= size:
        return [0]
    stride = max(1, tile - tile // 4)
    count = -(-(size - tile) // stride) + 1
    return [int(v) for v in np.linspace(0, size - tile, count).round().astype(int)]


def tile_window(tile: int, size: int) -> torch.Tensor:
    """The ``(tile, tile)`` blending weight of a tile: 1 in its middle half, falling linearly to ``1 / (tile / 4)``
    at its borders, so overlapping tiles fade into each other without a seam (one tile over the whole image: 1)."""
    if tile >= size:
        return torch.ones(tile, tile)
    ramp = max(1, tile // 4)
    edge = torch.minimum(torch.arange(tile) + 1, torch.arange(tile, 0, -1)).float().clamp(max=ramp) / ramp
    return edge[:, None] * edge[None, :]


def split_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``(B, C, S, S)`` images as ``(B * n, C, tile, tile)`` overlapping tiles (:func:`tile_origins`), image-major."""
    origins = tile_origins(x.shape[-1], tile)
    tiles = [x[:, :, top:top + tile, left:left + tile] for top in origins for left in origins]
    return torch.stack(tiles, dim=1).flatten(0, 1)


def merge_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`split_tiles`: ``(B * n, C, t, t)`` tiles blended (:func:`tile_window`) into ``(B, C, S, S)``
    with ``S = size``; where one tile alone covers a pixel, its value is kept exactly."""
    tile = tiles.shape[-1]
    origins = tile_origins(size, tile)
    n = len(origins) ** 2
    tiles = tiles.unflatten(0, (tiles.shape[0] // n, n))
    window = tile_window(tile, size).to(tiles.device, tiles.dtype)
    out = torch.zeros(tiles.shape[0], tiles.shape[2], size, size, dtype=tiles.dtype, device=tiles.device)
    weight = torch.zeros(size, size, dtype=tiles.dtype, device=tiles.device)
    for k, (top, left) in enumerate((top, left) for top in origins for left in origins):
        out[:, :, top:top + tile, left:left + tile] += tiles[:, k] * window
        weight[top:top + tile, left:left + tile] += window
    return out / weight


def tile_generators(generators: Generators, num_tiles: int) -> Generators:
    """One generator per tile, image-major: with one tile per image the images' own generators; else each image's
    generator seeds its tiles', so a tile's noise depends only on its image's generator and its place."""
    if num_tiles == 1:
        return list(generators)
    seeds = [torch.randint(0, 2**62, (num_tiles,), generator=g).tolist() for g in generators]
    return [torch.Generator().manual_seed(int(s)) for per_image in seeds for s in per_image]


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


MIN_IMAGE_SIDE = 8  # smaller images carry no detail to judge (a 1 x 1 image upscales to grey)
#: EXIF orientation -> PIL ``Image.transpose`` method, as ``PIL.ImageOps.exif_transpose`` applies them.
_EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def exif_orientation(image: Any) -> Optional[int]:
    """The EXIF orientation tag of a PIL image (None when absent or malformed, as PIL's ``exif_transpose``)."""
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001
        return None


def rgb_array(image: Any) -> np.ndarray:
    """diffad's one image reader: a PIL image of any mode as an ``(H, W, 3)`` float32 array in [0, 1], EXIF
    orientation applied, gray repeated, alpha dropped; 16/32-bit integer and float modes scaled by their range
    (``I;16``: 65535; ``I``/``F``: 65535 above 255, else 255; ``F`` in [0, 1] stays), never clipped to white.
    ``ValueError`` for a side below :data:`MIN_IMAGE_SIDE` or non-finite pixels."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"the image is {image.size[0]}x{image.size[1]} px; diffad needs at least {MIN_IMAGE_SIDE} "
                         "px per side")
    orientation = exif_orientation(image)
    if orientation in _EXIF_TRANSPOSE:
        image = image.transpose(_EXIF_TRANSPOSE[orientation])
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if not np.isfinite(arr).all():
            raise ValueError(f"the image (mode {mode}) has NaN or infinite pixels")
        top = 1.0 if arr.max() <= 1 and mode == "F" else 255.0
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else top
        return np.repeat(np.clip(arr / top, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency without PIL's warning
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def default_mean_filter_size(resolution: int) -> int:
    """The default map filter for a resolution: the odd number nearest ``R / 8``, at least 3 (64 px -> 9)."""
    size = max(3, int(round(resolution / 8)))
    return size if size % 2 == 1 else size + 1


# =============================================================================== the sampler's configuration


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class SamplingConfig:
    """Every lever of the sampler, validated once; the calibration stores it and every later call runs exactly it.

    Args:
        mask_timesteps: the ``t`` the noise error ``Q`` is averaged over (thesis: 300..350).
        mask_noise_draws: ``eps`` draws ``Q`` is averaged over (thesis: 1); the mask costs ``draws * len(t)`` passes.
        mask_percentile: ``p``: the mask is ``Q > Q_p``, ``Q_p`` the per-pixel ``p``-quantile of ``Q`` over normal
            images, so about ``1 - p`` of a normal image's pixels are redrawn (thesis: 0.8).
        inpaint_start: ``T``, the noise level every reconstruction starts from (thesis: 50).
        inpaint_steps: strided steps of ``self_aware``'s reconstruction (inpainting or denoising) from ``T - 1``.
        resample_steps: UNet passes per inpainting step (thesis: 5; 1 for ``reconstruction="denoise"``).
        renoise: ``"fixed"`` (the thesis: the start's eps) or ``"fresh"`` (RePaint) noise when resampling.
        denoise_steps: strided steps of ``method="denoise"`` from the same ``T`` (thesis: ``T``).
        map_filter_size: odd mean-filter size of every map; None = :func:`default_mean_filter_size`.
        reconstruction: ``"inpaint"`` (the thesis: redraw the masked pixels) or ``"denoise"`` (every pixel; the
            mask is still returned): at 10 UNet passes on three real categories, denoising plus the ``combined``
            map beat inpainting.
        precision: the networks' arithmetic, ``"fp32"`` or ``"bf16"`` (autocast); the diffusion arithmetic and
            the maps stay float32.
    """

    mask_timesteps: Tuple[int, ...] = (150,)
    mask_noise_draws: int = 3
    mask_percentile: float = 0.8
    inpaint_start: int = 50
    inpaint_steps: int = 7
    resample_steps: int = 1
    renoise: Literal["fixed", "fresh"] = "fresh"
    denoise_steps: int = 10
    map_filter_size: Optional[int] = None
    reconstruction: Literal["denoise", "inpaint"] = "denoise"
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self):
        steps = self.mask_timesteps
        if isinstance(steps, (int, np.integer)) or not steps or not all(_is_int(t, 0) for t in steps):
            raise ValueError(f"mask_timesteps must be a non-empty sequence of ints >= 0; got {steps!r}")
        object.__setattr__(self, "mask_timesteps", tuple(int(t) for t in steps))
        for name in ("mask_noise_draws", "inpaint_start", "resample_steps"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
        for name in ("inpaint_steps", "denoise_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value > self.inpaint_start:
                raise ValueError(f"{name} must be an int in [1, inpaint_start={self.inpaint_start}]; got {value!r}")
        if isinstance(self.mask_percentile, bool) or not (isinstance(self.mask_percentile, (int, float))
                                                          and 0.0 < self.mask_percentile < 1.0):
            raise ValueError(f"mask_percentile must be in (0, 1) (e.g. 0.8); got {self.mask_percentile!r}")
        for name, allowed in zip(("renoise", "reconstruction", "precision"), (RENOISE_KINDS, RECONSTRUCTIONS,
                                                                                PRECISIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.reconstruction == "denoise" and self.resample_steps != 1:
            raise ValueError(f"resample_steps must be 1 with reconstruction='denoise' (resampling harmonises an "
                             f"inpainted region; there is none); got {self.resample_steps}")
        size = self.map_filter_size
        if size is not None and (not _is_int(size) or size % 2 == 0):
            raise ValueError(f"map_filter_size must be None or an odd int >= 1 (1 = none); got {size!r}")

    @classmethod
    def fast(cls) -> "SamplingConfig":
        """The default: the noise error at t = 150 x 3 noise draws + a 7-step denoising reconstruction = 10 UNet
        passes (``method="denoise"``: 10 steps)."""
        return cls()

    @classmethod
    def thesis(cls) -> "SamplingConfig":
        """The thesis's sampler: 51 mask timesteps x 1 draw + 50 inpainting steps x 5 resamplings (fixed eps) =
        301 passes."""
        return cls(mask_timesteps=tuple(range(300, 351)), mask_noise_draws=1, inpaint_steps=50, resample_steps=5,
                   renoise="fixed", denoise_steps=50, reconstruction="inpaint")

    @classmethod
    def from_preset(cls, config: Union[str, "SamplingConfig"]) -> "SamplingConfig":
        """A config, or the preset called ``config`` (one of :data:`SAMPLING_PRESETS`)."""
        if isinstance(config, cls):
            return config
        if config not in SAMPLING_PRESETS:
            raise ValueError(f"unknown sampling preset {config!r}; choose from {', '.join(SAMPLING_PRESETS)} "
                             "or pass a SamplingConfig")
        return getattr(cls, config)()

    @property
    def preset_name(self) -> Optional[str]:
        """``"fast"`` or ``"thesis"`` when this config equals that preset (at any precision), else None."""
        return next((name for name in SAMPLING_PRESETS
                     if dataclasses.replace(getattr(type(self), name)(), precision=self.precision) == self), None)

    def matches(self, config: Union[str, "SamplingConfig"]) -> bool:
        """Whether a call asking for ``config`` runs this (calibrated) config: a preset name matches that preset at
        any precision (the precision is the calibration's), a ``SamplingConfig`` must be equal."""
        if isinstance(config, str):
            return self.preset_name == config or self == SamplingConfig.from_preset(config)
        return self == config

    def unet_passes(self, method: str) -> int:
        """Denoiser passes per image (with ``reconstruction="inpaint"``, an image whose mask comes out empty skips
        inpainting)."""
        if method == "denoise":
            return self.denoise_steps
        return self.mask_noise_draws * len(self.mask_timesteps) + self.inpaint_steps * self.resample_steps

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields (what the calibration stores; :meth:`from_dict` reads them back)."""
        return {**dataclasses.asdict(self), "mask_timesteps": list(self.mask_timesteps)}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SamplingConfig":
        """A config from :meth:`to_dict`'s fields (one stored before ``reconstruction`` existed: recalibrate)."""
        if "reconstruction" not in values:
            raise ValueError("the calibration's sampling config predates `reconstruction`: recalibrate")
        return cls(**values)


# =============================================================================== the calibration


def threshold_key(method: str, map_name: str) -> str:
    """The name of the image threshold (and metrics) of map ``map_name`` under ``method``: ``"<method>/<map>"``."""
    return f"{method}/{map_name}"


class AnomalyCalibration(ModelMixin, ConfigMixin):
    """What :meth:`SelfAwareInpaintPipeline.calibrate` fitted, saved as the ``calibration`` component: the sampler,
    ``Q_p`` per pixel (buffer ``q_threshold``, ``(S, S)``), one image threshold per ``"<method>/<map>"`` (buffer
    ``thresholds``) and the held-out normal scores each was fitted on (``heldout_scores``, ``(thresholds, images)``).

    Args:
        resolution: the working resolution ``S``; tile_size: the networks' tile side (None: one tile).
        sampling_config: :meth:`SamplingConfig.to_dict` of the sampler every later call runs (None: diffad 0.1).
        threshold_names: ``"<method>/<map>"`` names of the image thresholds.
        target_false_positive_rate: the fraction of normal images the thresholds flag.
        heldout_false_positive_rates: per threshold, the false-positive rate on the fold its fit did not see.
        heldout_mask_share: mean share of pixels masked on normal images ``Q_p`` did not see (about ``1 - p``).
        num_images: normal images calibrated on; stores_heldout_scores: ``heldout_scores`` is saved (older: not).
    """

    @register_to_config
    def __init__(self, resolution: int = 64, tile_size: Optional[int] = None,
                 sampling_config: Optional[Dict[str, Any]] = None,
                 threshold_names: List[str] = (), target_false_positive_rate: float = 0.05,
                 heldout_false_positive_rates: List[float] = (), heldout_mask_share: Optional[float] = None,
                 num_images: int = 0, stores_heldout_scores: bool = False):
        super().__init__()
        self.register_to_config(threshold_names=[str(n) for n in threshold_names],
                                heldout_false_positive_rates=[float(v) for v in heldout_false_positive_rates])
        self.register_buffer("q_threshold", torch.zeros(resolution, resolution))
        self.register_buffer("thresholds", torch.zeros(len(threshold_names)))
        self.register_buffer("heldout_scores", torch.zeros(len(threshold_names), num_images), stores_heldout_scores)

    @property
    def sampling(self) -> SamplingConfig:
        """The :class:`SamplingConfig` this calibration was fitted with."""
        if self.config.sampling_config is None:
            raise ValueError("this calibration was made by diffad 0.1: recalibrate (`diffad calibrate`)")
        return SamplingConfig.from_dict(self.config.sampling_config)

    def threshold(self, name: str) -> Optional[float]:
        """The image threshold called ``name`` (``"<method>/<map>"``), or None when it was not calibrated."""
        names = list(self.config.threshold_names)
        return float(self.thresholds[names.index(name)]) if name in names else None

    def heldout_scores_of(self, name: str) -> Optional[np.ndarray]:
        """The held-out normal scores ``(num_images,)`` the threshold ``name`` was fitted on (None: none stored)."""
        names = list(self.config.threshold_names) if self.config.get("stores_heldout_scores") else []
        return self.heldout_scores[names.index(name)].float().cpu().numpy() if name in names else None


# =============================================================================== the pipeline


@dataclass
class SelfAwareInpaintPipelineOutput(BaseOutput):
    """Every map from one reconstruction, at the working resolution ``S``.

    Args:
        anomaly_maps: ``{map name: (B, S, S) float32}``, higher = more anomalous (the pipeline's ``map_names``).
        scores: ``{map name: (B,) float32}``, each map's maximum.
        is_anomalous: ``{map name: (B,) bool}``, ``score > threshold`` (a NaN score is never "ok"); None for a map
            with no calibrated threshold.
        inpaint_masks: ``(B, S, S)`` bool, ``Q > Q_p`` (all False for ``method="denoise"``).
        reconstructions: ``"pt"``: ``(B, 3, S, S)`` in **[-1, 1], the range of tensor inputs**; ``"np"``:
            ``(B, S, S, 3)`` in [0, 1]; ``"pil"``: a list of PIL images.
        unet_passes: ``(B,)`` int, denoiser passes per image (segmenter passes not counted).
        noise_ratios: ``(B, S, S)`` float32, the unfiltered ``Q / Q_p`` (what the mask thresholds and a 7-channel
            segmenter reads); None for ``method="denoise"``.
    """

    anomaly_maps: Dict[str, Union[np.ndarray, torch.Tensor]]
    scores: Dict[str, Union[np.ndarray, torch.Tensor]]
    is_anomalous: Dict[str, Optional[Union[np.ndarray, torch.Tensor]]]
    inpaint_masks: Union[np.ndarray, torch.Tensor]
    reconstructions: Union[np.ndarray, torch.Tensor, List[Any]]
    unet_passes: Union[np.ndarray, torch.Tensor]
    noise_ratios: Optional[Union[np.ndarray, torch.Tensor]] = None


class SelfAwareInpaintPipeline(DiffusionPipeline):
    """Anomaly detection by self-aware DDPM inpainting (Semchyshyn, 2023).

    For an image ``x``: the noise error ``Q(x)`` (:func:`noise_error`) over the calibrated ``Q_p`` marks suspect
    pixels; the image is reconstructed as a normal part would show it, by inpainting them (:func:`inpaint`, the
    thesis) or denoising (:func:`denoise`, the default config); the maps compare ``x`` with it (multi-scale,
    learned), ``noise_error`` is ``Q / Q_p`` and ``combined`` their mean. A score is a map's maximum; a decision
    compares it with a threshold calibrated on normal images.

    Args:
        unet: self-conditioned denoiser, ``UNet2DModel`` 6 -> 3, or its ``diffad export`` (any ``ModelMixin`` with
            ``unet(x, t).sample`` and a ``config``).
        scheduler: ``DDPMScheduler`` (its ``alphas_cumprod`` define the noise levels).
        segmenter: optional ``UNet2DModel`` 6 -> 1 for the learned map (or its export).
        calibration: optional :class:`AnomalyCalibration`, set by :meth:`calibrate`.
        working_resolution: ``S`` (default: the UNet's ``sample_size``, one tile).
    """

    model_cpu_offload_seq = "unet->segmenter"
    _optional_components = ["segmenter", "calibration"]

    def __init__(self, unet: ModelMixin, scheduler: DDPMScheduler, segmenter: Optional[ModelMixin] = None,
                 calibration: Optional[ModelMixin] = None, working_resolution: Optional[int] = None):
        # ModelMixin: an exported network is not a UNet2DModel (nor, remotely, calibration/pipeline.py's class)
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, segmenter=segmenter, calibration=calibration)
        if working_resolution is not None:
            tile = self.tile_size
            if not _is_int(working_resolution) or working_resolution < tile:
                raise ValueError(f"working_resolution must be an int >= the UNet's sample_size {tile} (the tile "
                                 f"size); got {working_resolution!r}")
            working_resolution = int(working_resolution)
        self.register_to_config(working_resolution=working_resolution)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, resample="bicubic", do_convert_rgb=True)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, **kwargs):
        """Save a Hub-ready folder: components (safetensors), this ``pipeline.py`` and a model_index.json naming
        it. ``push_to_hub`` is not supported: save, then upload the folder (``diffad push``)."""
        if kwargs.get("push_to_hub"):
            raise ValueError("push_to_hub=True is not supported: save_pretrained(folder), then upload the folder "
                             "with `diffad push` or huggingface_hub.upload_folder")
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: diffad saves safetensors only")
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        source = os.path.abspath(__file__)
        shutil.copyfile(source, os.path.join(save_directory, PIPELINE_FILE))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_FILE[:-3], type(self).__name__]
        index.pop("_name_or_path", None)  # a local path means nothing on the Hub
        entry = index.get(CALIBRATION_COMPONENT)
        if isinstance(entry, list) and entry[0] is not None:
            index[CALIBRATION_COMPONENT] = [PIPELINE_FILE[:-3], entry[1]]
            shutil.copyfile(source, os.path.join(save_directory, CALIBRATION_COMPONENT, PIPELINE_FILE))
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, safetensors only; a local folder missing a component's weights is a
        ``FileNotFoundError``, weights that are not finite (a corrupt file: NaN maps would pass every part) a
        ``ValueError``, each naming the file and what to do."""
        folder = str(pretrained_model_name_or_path)
        index_path = os.path.join(folder, "model_index.json")
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            for name in ("unet", "segmenter", CALIBRATION_COMPONENT):
                entry = index.get(name)
                weights = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
                torch_weights = isinstance(entry, list) and entry[0] in ("diffusers", PIPELINE_FILE[:-3])
                if torch_weights and not os.path.isfile(weights):
                    fix = {"unet": "copy it back or retrain (training/train_ddpm.py)",
                           "segmenter": "copy it back or retrain it (training/train_segmenter.py)",
                           CALIBRATION_COMPONENT: f"recalibrate: `diffad calibrate --model {folder} ...`"}[name]
                    raise FileNotFoundError(f"{weights} is missing (model_index.json lists a {name}): {fix}")
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        for name in ("unet", "segmenter", "calibration"):
            module = getattr(pipe, name, None)
            tensors = [] if module is None else [*module.parameters(), *module.buffers()]
            bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
            if bad:
                weights = os.path.join(folder, name, "diffusion_pytorch_model.safetensors")
                raise ValueError(f"{weights} holds {bad} NaN or infinite weights: the file is corrupt; download it "
                                 "again or retrain")
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read model_index.json, pointing ``["pipeline", ...]`` entries at this (imported) module, so
        ``SelfAwareInpaintPipeline.from_pretrained(folder)`` needs no remote code."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config, dict) and isinstance(config.get("_class_name"), list):
            config["_class_name"] = config["_class_name"][1]
            for key, value in config.items():
                if isinstance(value, list) and len(value) == 2 and value[0] == PIPELINE_FILE[:-3]:
                    config[key] = [AnomalyCalibration.__module__, value[1]]
        return out

    # ------------------------------------------------------------------ properties and inputs

    @property
    def resolution(self) -> int:
        """``S``, the working resolution every image is inspected (and every map returned) at, in tiles."""
        return int(self.config.working_resolution or self.tile_size)

    @property
    def tile_size(self) -> int:
        """The networks' input side: the UNet's ``sample_size`` (it was trained on crops of this size)."""
        size = self.unet.config.sample_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def schedule(self) -> NoiseSchedule:
        """The diffusion arithmetic over the scheduler's noise levels."""
        return NoiseSchedule(self.scheduler.alphas_cumprod)

    @property
    def num_tiles(self) -> int:
        """Tiles per image (:func:`tile_origins` in each direction)."""
        return len(tile_origins(self.resolution, self.tile_size)) ** 2

    @property
    def is_calibrated(self) -> bool:
        """True when a calibration (``Q_p`` and image thresholds) is stored."""
        return self.calibration is not None

    def map_names(self, method: str = "self_aware") -> Tuple[str, ...]:
        """The anomaly maps a call with ``method`` returns."""
        return tuple(name for name in MAP_NAMES if (name != "learned" or self._has_learned_map(method))
                     and (name not in ("noise_error", "combined") or method == "self_aware"))

    def _has_learned_map(self, method: str) -> bool:
        """A segmenter is loaded and ``method`` gives it its inputs (a 7-channel one reads ``Q / Q_p``)."""
        return self.segmenter is not None and (
            method == "self_aware" or "noise_error" not in SEGMENTER_INPUTS[self.segmenter.config.in_channels])

    @staticmethod
    def default_map(method: str = "self_aware") -> str:
        """The map decisions are read from by default: ``combined`` (self_aware) or ``multiscale`` (denoise)."""
        return "combined" if method == "self_aware" else "multiscale"

    def preprocess(self, images: ImageInput) -> torch.Tensor:
        """Images as ``(B, 3, S, S)`` in [-1, 1]: PIL images of any mode (:func:`rgb_array`, resized bicubic) or a
        ``(B, 3, H, W)``/``(3, H, W)`` float tensor in [-1, 1] (resized bilinear, antialiased). ``ValueError`` for
        an empty input, a wrong shape or type, NaN/inf or out-of-range values, a side below :data:`MIN_IMAGE_SIDE`."""
        r = self.resolution
        if isinstance(images, torch.Tensor):
            x = images.unsqueeze(0) if images.ndim == 3 else images
            if x.ndim != 4 or x.numel() == 0 or x.shape[1] != 3:
                raise ValueError(f"image tensor must be a non-empty (B, 3, H, W) or (3, H, W) RGB tensor; got shape "
                                 f"{tuple(images.shape)} (repeat grayscale to 3 channels)")
            if not x.is_floating_point():
                raise ValueError(f"image tensor must be float in [-1, 1]; got dtype {x.dtype}")
            if not torch.isfinite(x).all():
                raise ValueError("image tensor contains NaN or inf values; pass finite values in [-1, 1]")
            if float(x.min()) < -1.001 or float(x.max()) > 1.001:
                raise ValueError(f"image tensor values must be in [-1, 1]; got min {float(x.min()):.3f}, "
                                 f"max {float(x.max()):.3f}")
            if tuple(x.shape[-2:]) != (r, r):
                x = F.interpolate(x.float(), size=(r, r), mode="bilinear", align_corners=False, antialias=True)
            return x.float().clamp(-1.0, 1.0).to(self.device)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError("no images given: pass a PIL image, a list of PIL images or a (B, 3, H, W) tensor")
        for i, img in enumerate(items):
            if not (hasattr(img, "convert") and hasattr(img, "size")):
                raise ValueError(f"image {i} has unsupported type {type(img).__name__}: pass PIL images or a tensor "
                                 "in [-1, 1]")
            if 0 in img.size:
                raise ValueError(f"image {i} is empty (size {img.size}); pass a non-empty image")
        arrays = []
        for i, img in enumerate(items):
            try:
                arrays.append(rgb_array(img))
            except ValueError as err:
                raise ValueError(f"image {i}: {err}") from None
        # as 8-bit RGB (what the model was trained on), resized bicubic to R x R
        pils = [self.image_processor.numpy_to_pil(a[None])[0] for a in arrays]
        return self.image_processor.preprocess(pils, height=r, width=r).float().to(self.device)

    def _sampling(self, config: Union[None, str, SamplingConfig], method: str) -> SamplingConfig:
        """The config a call runs: the calibration's. Another one is an error (recalibrate); an uncalibrated
        pipeline runs ``config`` (default fast) for ``denoise`` and refuses ``self_aware``."""
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}")
        wanted = None if config is None else SamplingConfig.from_preset(config)
        if not self.is_calibrated:
            if method == "self_aware":
                raise ValueError("this pipeline is not calibrated: call pipe.calibrate(normal_images) first (or use "
                                 "method='denoise', which needs no calibration for maps and scores)")
            return self._check_fits(wanted or SamplingConfig.fast())
        cal, fitted = self.calibration, self.calibration.sampling
        fitted_layout = (int(cal.config.resolution), int(cal.config.get("tile_size") or cal.config.resolution))
        if fitted_layout != (self.resolution, self.tile_size):
            raise ValueError(f"the calibration was made at {fitted_layout[0]} px in {fitted_layout[1]} px tiles but "
                             f"the model inspects at {self.resolution} px in {self.tile_size} px tiles: recalibrate "
                             "with pipe.calibrate(normal_images)")
        if wanted is not None and not fitted.matches(config):
            raise ValueError(f"this pipeline was calibrated with sampling config {fitted.preset_name or fitted}; "
                             f"to run {wanted.preset_name or wanted}, recalibrate: "
                             f"pipe.calibrate(normal_images, config={wanted.preset_name or 'your_config'!r})")
        if method == "self_aware" and cal.threshold(threshold_key("self_aware", "multiscale")) is None:
            raise ValueError("this pipeline was calibrated for method='denoise' only: recalibrate with "
                             "pipe.calibrate(normal_images) to run method='self_aware'")
        return self._check_fits(fitted)

    def _check_fits(self, config: SamplingConfig) -> SamplingConfig:
        n_ts = self.scheduler.config.num_train_timesteps
        if max(config.mask_timesteps) >= n_ts or config.inpaint_start > n_ts:
            raise ValueError(f"sampling config {config} needs timesteps beyond the scheduler's "
                             f"num_train_timesteps={n_ts}")
        return config

    @staticmethod
    def _generators(generator: Union[None, torch.Generator, Generators], n: int) -> Generators:
        """One generator per image: a list is used as is; a generator (None: seed 0) seeds one per image."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images: pass one per image or one in all")
            return list(generator)
        generator = torch.Generator().manual_seed(0) if generator is None else generator
        seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
        return [torch.Generator().manual_seed(int(s)) for s in seeds]

    @staticmethod
    def _chunks(n: int, batch_size: Optional[int]) -> List[np.ndarray]:
        if batch_size is not None and not _is_int(batch_size):
            raise ValueError(f"batch_size must be None or an int >= 1; got {batch_size!r}")
        size = batch_size or n
        return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]

    # ------------------------------------------------------------------ one reconstruction, every map

    @staticmethod
    def _tile_batches(indices: Sequence[int], num_tiles: int) -> List[List[int]]:
        """Tile ``indices`` in network batches: all at once with one tile per image (the caller's ``batch_size``
        bounds the batch), else at most :data:`TILE_BATCH` tiles (bounded memory)."""
        size = max(len(indices), 1) if num_tiles == 1 else TILE_BATCH
        return [list(indices[i:i + size]) for i in range(0, len(indices), size)]

    def _noise_error(self, x: torch.Tensor, config: SamplingConfig, generators: Generators) -> torch.Tensor:
        """``Q`` (:func:`noise_error`) of ``(B, 3, S, S)`` images over their tiles, stitched: ``(B, S, S)``."""
        tiles = split_tiles(x, self.tile_size)
        n = tiles.shape[0] // x.shape[0]
        gens = tile_generators(generators, n)
        q = torch.cat([noise_error(self.unet, self.schedule, tiles[idx], config.mask_timesteps,
                                   config.mask_noise_draws, [gens[i] for i in idx])
                       for idx in self._tile_batches(range(tiles.shape[0]), n)])
        return merge_tiles(q.unsqueeze(1), self.resolution)[:, 0]

    def _reconstruction(self, x: torch.Tensor, masks: torch.Tensor, method: str, config: SamplingConfig,
                        generators: Generators) -> Tuple[torch.Tensor, torch.Tensor]:
        """Each tile denoised (:func:`denoise`) or its masked pixels inpainted (:func:`inpaint`), stitched:
        ``(B, 3, S, S)`` reconstructions and the ``(B,)`` UNet passes they took."""
        b, schedule, start = x.shape[0], self.schedule, config.inpaint_start
        tiles, tile_masks = split_tiles(x, self.tile_size), split_tiles(masks, self.tile_size)
        n = tiles.shape[0] // b
        gens = tile_generators(generators, n)
        passes = torch.zeros(b * n, dtype=torch.long)
        if method == "denoise" or config.reconstruction == "denoise":
            steps = config.denoise_steps if method == "denoise" else config.inpaint_steps
            recs = torch.cat([denoise(self.unet, schedule, tiles[idx], start=start, num_steps=steps,
                                      generators=[gens[i] for i in idx]) for idx in self._tile_batches(range(b * n), n)])
            passes += steps
        else:
            recs = tiles.clone()
            todo = torch.nonzero(tile_masks.flatten(1).amax(dim=1) > 0).flatten().tolist()  # an empty mask keeps x
            for batch in self._tile_batches(todo, n):
                recs[batch] = inpaint(self.unet, schedule, tiles[batch], tile_masks[batch], start=start,
                                      num_steps=config.inpaint_steps, resample_steps=config.resample_steps,
                                      renoise=config.renoise, generators=[gens[i] for i in batch])
                passes[batch] += config.inpaint_steps * config.resample_steps
        return merge_tiles(recs, self.resolution), passes.view(b, n).sum(dim=1)

    def _learned_map(self, x: torch.Tensor, recs: torch.Tensor, ratios: Optional[torch.Tensor]) -> torch.Tensor:
        """The segmenter's defect probability over the tiles of ``(image, reconstruction[, Q / Q_p])`` (tiles of
        the segmenter's own ``sample_size``: the images it was trained on), stitched: ``(B, S, S)``."""
        size = self.segmenter.config.sample_size
        size = min(int(size[0] if isinstance(size, (list, tuple)) else size), self.resolution)
        tiles, rec_tiles = split_tiles(x, size), split_tiles(recs, size)
        ratio_tiles = None if ratios is None else split_tiles(ratios.unsqueeze(1), size)[:, 0]
        logits = torch.cat([segmenter_logits(self.segmenter, tiles[idx], rec_tiles[idx],
                                             None if ratio_tiles is None else ratio_tiles[idx]).float()
                            for idx in self._tile_batches(range(tiles.shape[0]), tiles.shape[0] // x.shape[0])])
        return merge_tiles(torch.sigmoid(logits), self.resolution)[:, 0]

    def _inspect(self, x: torch.Tensor, q: Optional[torch.Tensor], q_p: Optional[torch.Tensor], method: str,
                 config: SamplingConfig, generators: Generators,
                 thresholds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        """One batch: the mask ``Q > Q_p`` (``self_aware``; ``(B, S, S)`` each), the reconstruction and every map.
        ``thresholds`` (the :data:`COMBINED_MAPS`' image thresholds) adds the ``combined`` map."""
        masks = torch.zeros(x.shape[0], 1, *x.shape[-2:], device=x.device)
        passes = torch.zeros(x.shape[0], dtype=torch.long)
        if method == "self_aware":
            masks = (q > q_p).float().unsqueeze(1)
            passes += config.mask_noise_draws * len(config.mask_timesteps) * self.num_tiles
        recs, rec_passes = self._reconstruction(x, masks, method, config, generators)
        size = config.map_filter_size or default_mean_filter_size(self.tile_size)
        ratios = q / q_p.clamp_min(1e-12) if method == "self_aware" else None
        maps = {"multiscale": multiscale_anomaly_map(x, recs, mean_filter_size=size)}
        if self._has_learned_map(method):
            maps["learned"] = mean_filter(self._learned_map(x, recs, ratios), size)
        if method == "self_aware":
            maps["noise_error"] = mean_filter(ratios, size)
            if thresholds is not None:
                maps["combined"] = combined_map(maps, thresholds)
        return {"maps": maps, "masks": masks[:, 0] > 0, "recs": recs, "passes": passes + rec_passes,
                "ratios": ratios}

    def _autocast(self, config: SamplingConfig):
        """The networks' precision: bf16 autocast (matmuls and convolutions only) or, for fp32, nothing."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")

    # ------------------------------------------------------------------ inspection

    @torch.no_grad()
    def __call__(
        self,
        images: ImageInput,
        method: Literal["self_aware", "denoise"] = "self_aware",
        config: Union[None, Literal["fast", "thesis"], SamplingConfig] = None,
        generator: Union[None, torch.Generator, Generators] = None,
        batch_size: Optional[int] = None,
        output_type: Literal["np", "pt", "pil"] = "np",
        return_dict: bool = True,
    ) -> Union[SelfAwareInpaintPipelineOutput, Tuple]:
        """Every anomaly map, score and decision from one reconstruction per image.

        Args:
            images: a PIL image, a list of them, or a ``(B, 3, H, W)`` tensor in [-1, 1] (see :meth:`preprocess`).
            method: ``"self_aware"`` (the mask, then the reconstruction; needs :meth:`calibrate`) or ``"denoise"``
                (the basic baseline: noise to ``T`` and denoise, no mask).
            config: a calibrated pipeline runs its calibration's config; asking for another (a
                :class:`SamplingConfig` or ``"fast"``/``"thesis"``) is a ``ValueError``: recalibrate. Uncalibrated,
                ``"denoise"`` runs ``config`` (default fast) with no decisions.
            generator: one ``torch.Generator`` (seeds one per image) or one per image: an image's noise depends only
                on its generator (batched UNet arithmetic differs by float rounding: batch_size=1 is bit-exact).
            batch_size: images per UNet batch (default: all at once).
            output_type: ``"np"``, ``"pt"`` or ``"pil"``; return_dict: else a tuple in the output's field order.
        """
        if output_type not in ("np", "pt", "pil"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil'; got {output_type!r}")
        config = self._sampling(config, method)
        x = self.preprocess(images)
        generators = self._generators(generator, x.shape[0])
        thresholds = q_p = None
        if method == "self_aware":
            thresholds = {name: self.calibration.threshold(threshold_key(method, name)) for name in COMBINED_MAPS}
            q_p = self.calibration.q_threshold.to(x.device)
        parts: List[Dict[str, Any]] = []
        for idx in self.progress_bar(self._chunks(x.shape[0], batch_size)):
            gens = [generators[i] for i in idx]
            with self._autocast(config):
                # 1. Algorithm 2: the noise error Q(x); the pixels over the calibrated Q_p are suspect
                q = self._noise_error(x[idx], config, gens) if method == "self_aware" else None
                # 2. Algorithm 1 (or denoising): reconstruct the image as a normal part; 3. compare: every map
                parts.append(self._inspect(x[idx], q, None if q is None else q_p.expand_as(q), method, config, gens,
                                           thresholds))
        # 4. a score is a map's maximum; a decision compares it with the map's calibrated image threshold
        maps = {name: torch.cat([p["maps"][name] for p in parts]).float() for name in parts[0]["maps"]}
        scores = {name: m.flatten(1).amax(dim=1) for name, m in maps.items()}
        decisions = {name: self._decide(method, name, s) for name, s in scores.items()}
        masks, recs = torch.cat([p["masks"] for p in parts]), torch.cat([p["recs"] for p in parts])
        ratios = None if method != "self_aware" else torch.cat([p["ratios"] for p in parts]).float()
        out = (maps, scores, decisions, masks, recs, torch.cat([p["passes"] for p in parts]), ratios)
        if output_type != "pt":
            to_np = lambda d: {k: None if v is None else v.cpu().numpy() for k, v in d.items()}  # noqa: E731
            out = (to_np(maps), to_np(scores), to_np(decisions), masks.cpu().numpy(),
                   self.image_processor.postprocess(recs, output_type=output_type), out[-2].numpy(),
                   None if ratios is None else ratios.cpu().numpy())
        self.maybe_free_model_hooks()
        return SelfAwareInpaintPipelineOutput(*out) if return_dict else out

    def _decide(self, method: str, name: str, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """``score > threshold`` (fail closed: a NaN score is never "ok"), or None with a warning (once per map)."""
        threshold = self.calibration.threshold(threshold_key(method, name)) if self.is_calibrated else None
        if threshold is not None:
            return ~(scores <= threshold)
        if (method, name) not in _WARNED:
            _WARNED.add((method, name))
            logger.warning(f"no image threshold calibrated for {threshold_key(method, name)}: is_anomalous[{name!r}] "
                           "is None; pipe.calibrate(normal_images) fits one for every map")
        return None

    # ------------------------------------------------------------------ calibration

    @torch.no_grad()
    def calibrate(
        self,
        images: ImageInput,
        config: Union[Literal["fast", "thesis"], SamplingConfig] = "fast",
        target_false_positive_rate: float = 0.05,
        methods: Sequence[str] = METHODS,
        generator: Union[None, torch.Generator, Generators] = None,
        batch_size: Optional[int] = None,
    ) -> "SelfAwareInpaintPipeline":
        """Fit ``Q_p`` and every image threshold on normal images, with exactly the sampler later calls run.

        Two-fold cross-fit (images at even and odd positions): ``Q`` of every image (Algorithm 2); each fold masked
        with the OTHER fold's ``Q_p`` and reconstructed once, so every map is scored on images its ``Q_p`` never
        saw. Each image threshold is the ``1 - target_false_positive_rate`` quantile of those scores
        (:func:`per_pixel_quantile`; ``combined`` once its two maps' thresholds are fitted); the stored ``Q_p`` is
        fitted on all images. Also recorded: each threshold's false-positive rate fitted on one fold and measured
        on the other, and the share of pixels masked on held-out images (about ``1 - p``).

        Args:
            images: at least 4 normal images (see :meth:`preprocess`).
            config: a :class:`SamplingConfig` or a preset name (``"fast"``, ``"thesis"``).
            target_false_positive_rate: in (0, 1).
            methods: the methods to fit thresholds for.
            generator: a generator or one per image (each method restarts every image's generator from its initial
                seed, as a call would); batch_size: images per UNet batch.
        """
        config, fpr = SamplingConfig.from_preset(config), target_false_positive_rate
        if isinstance(fpr, bool) or not (isinstance(fpr, (int, float)) and 0.0 < fpr < 1.0):
            raise ValueError(f"target_false_positive_rate must be in (0, 1); got {fpr!r}")
        if not methods or any(m not in METHODS for m in methods):
            raise ValueError(f"methods must be a non-empty selection of {METHODS}; got {methods!r}")
        x = self.preprocess(images)
        if x.shape[0] < 4:
            raise ValueError(f"calibration needs at least 4 normal images (two folds of 2); got {x.shape[0]}")
        seeds = [g.initial_seed() for g in self._generators(generator, x.shape[0])]
        self._check_fits(config)
        fold, chunks = np.arange(x.shape[0]) % 2, self._chunks(x.shape[0], batch_size)
        quantile = lambda s: float(per_pixel_quantile(torch.from_numpy(s)[:, None, None], 1.0 - fpr))  # noqa: E731
        scores: Dict[str, np.ndarray] = {}
        q_p, mask_share = torch.zeros(self.resolution, self.resolution), None
        for method in methods:
            gens = [torch.Generator().manual_seed(s) for s in seeds]  # each method as a call with these seeds
            q = heldout_q_p = None
            if method == "self_aware":
                # Algorithm 2 on every image: Q_p over all of them, and each image against the other fold's Q_p
                with self._autocast(config):
                    q = torch.cat([self._noise_error(x[idx], config, [gens[i] for i in idx]).cpu() for idx in chunks])
                q_p = per_pixel_quantile(q, config.mask_percentile)
                heldout_q_p = torch.stack([per_pixel_quantile(q[fold == k], config.mask_percentile)
                                           for k in (0, 1)])[1 - fold]
            maps, shares = self._heldout_maps(x, q, heldout_q_p, method, config, gens, chunks)
            if method == "self_aware":
                mask_share = float(shares.mean())
                # ``combined`` divides its maps by their thresholds: fitted first, on these same held-out maps
                maps["combined"] = combined_map(maps, {name: quantile(maps[name].flatten(1).amax(dim=1).double()
                                                                      .numpy()) for name in COMBINED_MAPS
                                                       if name in maps})
            scores.update({threshold_key(method, name): m.flatten(1).amax(dim=1).double().numpy()
                           for name, m in maps.items()})
        heldout = [float(np.mean([np.mean(s[fold == 1 - k] > quantile(s[fold == k])) for k in (0, 1)]))
                   for s in scores.values()]
        cal = AnomalyCalibration(resolution=self.resolution, tile_size=self.tile_size,
                                 sampling_config=config.to_dict(), threshold_names=list(scores),
                                 target_false_positive_rate=float(fpr), heldout_false_positive_rates=heldout,
                                 heldout_mask_share=mask_share, num_images=x.shape[0], stores_heldout_scores=True)
        cal.q_threshold.copy_(q_p)
        cal.thresholds.copy_(torch.tensor([quantile(s) for s in scores.values()], dtype=torch.float32))
        cal.heldout_scores.copy_(torch.from_numpy(np.stack(list(scores.values()))))
        self.register_modules(calibration=cal.to(self.device))
        return self

    def _heldout_maps(self, x: torch.Tensor, q: Optional[torch.Tensor], q_p: Optional[torch.Tensor], method: str,
                      config: SamplingConfig, generators: Generators,
                      chunks: List[np.ndarray]) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Every map of every image (masked with its held-out ``q_p`` for ``self_aware``), on the CPU, and the
        share of each image's pixels masked."""
        maps: Dict[str, List[torch.Tensor]] = {}
        shares = []
        for idx in chunks:
            with self._autocast(config):
                part = self._inspect(x[idx], None if q is None else q[idx].to(x.device),
                                     None if q_p is None else q_p[idx].to(x.device), method, config,
                                     [generators[i] for i in idx])
            shares.append(part["masks"].flatten(1).float().mean(dim=1).cpu())
            for name, m in part["maps"].items():
                maps.setdefault(name, []).append(m.cpu())
        return {name: torch.cat(values) for name, values in maps.items()}, torch.cat(shares)
