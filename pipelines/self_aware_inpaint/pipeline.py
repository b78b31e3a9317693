# Self-aware inpainting pipeline (Semchyshyn, 2023), community-pipeline format.
# This file ships inside every Hub repo with its siblings (folder.CODE_FILES): torch, diffusers and numpy only.
"""SelfAwareInpaintPipeline: DDPM reconstruction by self-aware inpainting for anomaly detection.

References: Semchyshyn, "Automated visual inspection in the industrial setup via deep learning" (2023):
Algorithm 2 (the mask from the noise-prediction error), Algorithm 1 (resampled inpainting), the multi-scale map;
Ho et al., DDPM (2020): the posterior, eq. 6-7; Lugmayr et al., RePaint (2022): resampling with fresh noise;
Chen et al., Analog Bits (2022): self-conditioning; Zavrtanik et al., DRAEM (2021): the learned map.

Top to bottom: the stages (:class:`NoiseSchedule`, one function per algorithm) and the pipeline that runs them on
tiles and compares. Beside it: ``maps.py`` (the anomaly maps), ``tiles.py`` (tiling, seeding, batching),
``anomaly_calibration.py`` (:class:`SamplingConfig`, :class:`AnomalyCalibration`), ``images.py`` (a call's inputs
and outputs) and ``folder.py`` (what a saved folder carries, the checks of loading).

Conventions: images are ``(B, 3, S, S)`` in [-1, 1] at the working resolution ``S``; the networks run on
``(3, R, R)`` tiles (``R``: the UNet's ``sample_size``) stitched back. ``anomaly_mask`` is 1 where pixels are
redrawn, ``known = 1 - anomaly_mask`` where they are kept. Timesteps are diffusers' 0-based indices into
``alphas_cumprod``: a start of ``T = 50`` noises to index 49 (the thesis's "t = 50").

A folder written by :meth:`SelfAwareInpaintPipeline.save_pretrained` carries these files (and
``calibration/anomaly_calibration.py``) and a ``model_index.json`` naming them, so
``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` needs only diffusers;
``SelfAwareInpaintPipeline.from_pretrained(folder)`` needs no remote code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

# diffusers copies a local folder's remote code by the relative imports of pipeline.py alone: import every sibling here
from .anomaly_calibration import AnomalyCalibration, SamplingConfig, is_int, threshold_key
from .folder import check_finite_weights, check_save_options, check_weight_files, point_at_modules, write_code
from .images import OUTPUT_TYPES, ImageInput, image_batches, image_generators, preprocess, to_output_type
from .maps import (COMBINED_MAPS, MAP_NAMES, SEGMENTER_INPUTS, combined_map, default_mean_filter_size, mean_filter,
                   multiscale_anomaly_map, per_pixel_quantile, segmenter_logits)
from .tiles import merge_tiles, split_tiles, tile_batches, tile_generators, tile_origins

logger = logging.get_logger(__name__)

#: ``"self_aware"``: the noise error, then a reconstruction (the thesis); ``"denoise"``: the basic baseline.
METHODS = ("self_aware", "denoise")
Generators = List[torch.Generator]


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
        # ModelMixin: an exported network is not a UNet2DModel (nor, as remote code, the calibration component's class)
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, segmenter=segmenter, calibration=calibration)
        if working_resolution is not None:
            tile = self.tile_size
            if not is_int(working_resolution) or working_resolution < tile:
                raise ValueError(f"working_resolution must be an int >= the UNet's sample_size {tile} (the tile "
                                 f"size); got {working_resolution!r}")
            working_resolution = int(working_resolution)
        self.register_to_config(working_resolution=working_resolution)
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, resample="bicubic", do_convert_rgb=True)
        self._warned: set = set()  # threshold names already warned about having no threshold

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory: Union[str, os.PathLike], safe_serialization: bool = True, **kwargs):
        """Save a Hub-ready folder: components (safetensors), this package's code (``folder.CODE_FILES``) and a
        model_index.json naming it. ``push_to_hub`` is not supported: save, then upload the folder (``diffad push``)."""
        check_save_options(safe_serialization, kwargs)
        super().save_pretrained(save_directory, safe_serialization=True, **kwargs)
        write_code(save_directory, type(self).__name__)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``DiffusionPipeline.from_pretrained``, safetensors only; a local folder missing a component's weights is a
        ``FileNotFoundError``, weights that are not finite (a corrupt file: NaN maps would pass every part) a
        ``ValueError``, each naming the file and what to do."""
        check_weight_files(str(pretrained_model_name_or_path))
        kwargs.setdefault("use_safetensors", True)
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_finite_weights(pipe, str(pretrained_model_name_or_path))
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """Read model_index.json, pointing entries saved as this package's code at the imported modules, so
        ``SelfAwareInpaintPipeline.from_pretrained(folder)`` needs no remote code."""
        out = super().load_config(*args, **kwargs)
        point_at_modules(out[0] if isinstance(out, tuple) else out, {AnomalyCalibration.__name__: AnomalyCalibration})
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
        """Images as ``(B, 3, S, S)`` in [-1, 1]: PIL images of any mode (``images.rgb_array``, resized bicubic) or
        a ``(B, 3, H, W)``/``(3, H, W)`` float tensor in [-1, 1] (resized bilinear, antialiased). ``ValueError``
        for an empty input, a wrong shape or type, NaN/inf or out-of-range values, a side below ``MIN_IMAGE_SIDE``."""
        return preprocess(images, self.resolution, self.image_processor).to(self.device)

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
        return self._check_fits(self.calibration.sampling_for(config, method, self.resolution, self.tile_size))

    def _check_fits(self, config: SamplingConfig) -> SamplingConfig:
        n_ts = self.scheduler.config.num_train_timesteps
        if max(config.mask_timesteps) >= n_ts or config.inpaint_start > n_ts:
            raise ValueError(f"sampling config {config} needs timesteps beyond the scheduler's "
                             f"num_train_timesteps={n_ts}")
        return config

    # ------------------------------------------------------------------ one reconstruction, every map

    def _noise_error(self, x: torch.Tensor, config: SamplingConfig, generators: Generators) -> torch.Tensor:
        """``Q`` (:func:`noise_error`) of ``(B, 3, S, S)`` images over their tiles, stitched: ``(B, S, S)``."""
        tiles = split_tiles(x, self.tile_size)
        n = tiles.shape[0] // x.shape[0]
        gens = tile_generators(generators, n)
        q = torch.cat([noise_error(self.unet, self.schedule, tiles[idx], config.mask_timesteps,
                                   config.mask_noise_draws, [gens[i] for i in idx])
                       for idx in tile_batches(range(tiles.shape[0]), n)])
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
            steps = config.denoise_steps if method == "denoise" else config.reconstruction_steps
            recs = torch.cat([denoise(self.unet, schedule, tiles[idx], start=start, num_steps=steps,
                                      generators=[gens[i] for i in idx]) for idx in tile_batches(range(b * n), n)])
            passes += steps
        else:
            recs = tiles.clone()
            todo = torch.nonzero(tile_masks.flatten(1).amax(dim=1) > 0).flatten().tolist()  # an empty mask keeps x
            for batch in tile_batches(todo, n):
                recs[batch] = inpaint(self.unet, schedule, tiles[batch], tile_masks[batch], start=start,
                                      num_steps=config.reconstruction_steps, resample_steps=config.resample_steps,
                                      renoise=config.renoise, generators=[gens[i] for i in batch])
                passes[batch] += config.reconstruction_steps * config.resample_steps
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
                            for idx in tile_batches(range(tiles.shape[0]), tiles.shape[0] // x.shape[0])])
        return merge_tiles(torch.sigmoid(logits), self.resolution)[:, 0]

    def _inspect(self, x: torch.Tensor, q: Optional[torch.Tensor], q_p: Optional[torch.Tensor], method: str,
                 config: SamplingConfig, generators: Generators,
                 thresholds: Optional[Dict[str, float]] = None, filter_size: Optional[int] = None) -> Dict[str, Any]:
        """One batch: the mask ``Q > Q_p`` (``self_aware``; ``(B, S, S)`` each), the reconstruction and every map.
        ``thresholds`` (the :data:`COMBINED_MAPS`' image thresholds) adds the ``combined`` map; ``filter_size``:
        the maps' mean filter (None: :meth:`_filter_size`)."""
        masks = torch.zeros(x.shape[0], 1, *x.shape[-2:], device=x.device)
        passes = torch.zeros(x.shape[0], dtype=torch.long)
        if method == "self_aware":
            masks = (q > q_p).float().unsqueeze(1)
            passes += config.mask_noise_draws * len(config.mask_timesteps) * self.num_tiles
        recs, rec_passes = self._reconstruction(x, masks, method, config, generators)
        size = filter_size or self._filter_size(config)
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

    def _filter_size(self, config: SamplingConfig, calibrated: bool = True) -> int:
        """Every map's mean filter: the calibration's (what its thresholds were fitted with), else (uncalibrated, or
        ``calibrated=False``: what a new calibration fits with) the config's or the tile's default."""
        if calibrated and self.is_calibrated:
            return self.calibration.filter_size(self.tile_size)
        return config.map_filter_size or default_mean_filter_size(self.tile_size)

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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'np', 'pt' or 'pil'; got {output_type!r}")
        config = self._sampling(config, method)
        x = self.preprocess(images)
        generators = image_generators(generator, x.shape[0])
        thresholds = q_p = None
        if method == "self_aware":
            thresholds = {name: self.calibration.threshold(threshold_key(method, name)) for name in COMBINED_MAPS}
            q_p = self.calibration.q_threshold.to(x.device)
        parts: List[Dict[str, Any]] = []
        for idx in self.progress_bar(image_batches(x.shape[0], batch_size)):
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
        out = to_output_type((maps, scores, decisions, masks, recs, torch.cat([p["passes"] for p in parts]), ratios),
                             output_type, self.image_processor)
        self.maybe_free_model_hooks()
        return SelfAwareInpaintPipelineOutput(*out) if return_dict else out

    def _decide(self, method: str, name: str, scores: torch.Tensor) -> Optional[torch.Tensor]:
        """``score > threshold`` (fail closed: a NaN score is never "ok"), or None with a warning (once per pipeline
        and map)."""
        key = threshold_key(method, name)
        threshold = self.calibration.threshold(key) if self.is_calibrated else None
        if threshold is not None:
            return ~(scores <= threshold)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(f"no image threshold calibrated for {key}: is_anomalous[{name!r}] is None; "
                           "pipe.calibrate(normal_images) fits one for every map")
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
        seeds = [g.initial_seed() for g in image_generators(generator, x.shape[0])]
        self._check_fits(config)
        fold, chunks = np.arange(x.shape[0]) % 2, image_batches(x.shape[0], batch_size)
        size = self._filter_size(config, calibrated=False)  # never an older calibration's
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
            maps, shares = self._heldout_maps(x, q, heldout_q_p, method, config, gens, chunks, size)
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
                                 heldout_mask_share=mask_share, num_images=x.shape[0], stores_heldout_scores=True,
                                 map_filter_size=size)
        cal.q_threshold.copy_(q_p)
        cal.thresholds.copy_(torch.tensor([quantile(s) for s in scores.values()], dtype=torch.float32))
        cal.heldout_scores.copy_(torch.from_numpy(np.stack(list(scores.values()))))
        self.register_modules(calibration=cal.to(self.device))
        return self

    def _heldout_maps(self, x: torch.Tensor, q: Optional[torch.Tensor], q_p: Optional[torch.Tensor], method: str,
                      config: SamplingConfig, generators: Generators,
                      chunks: List[np.ndarray], size: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """Every map of every image (masked with its held-out ``q_p`` for ``self_aware``), on the CPU, and the
        share of each image's pixels masked."""
        maps: Dict[str, List[torch.Tensor]] = {}
        shares = []
        for idx in chunks:
            with self._autocast(config):
                part = self._inspect(x[idx], None if q is None else q[idx].to(x.device),
                                     None if q_p is None else q_p[idx].to(x.device), method, config,
                                     [generators[i] for i in idx], filter_size=size)
            shares.append(part["masks"].flatten(1).float().mean(dim=1).cpu())
            for name, m in part["maps"].items():
                maps.setdefault(name, []).append(m.cpu())
        return {name: torch.cat(values) for name, values in maps.items()}, torch.cat(shares)
