# The sampler's configuration and the calibration component (diffad, community-pipeline format). This file ships in
# every Hub repo twice: beside pipeline.py, and alone in calibration/, the calibration component's module. diffusers
# fetches nothing else of a folder with weights, so it imports no sibling: torch, diffusers and numpy only.
"""What a calibration holds: the sampler every later call runs (:class:`SamplingConfig`) and what
:meth:`SelfAwareInpaintPipeline.calibrate` fitted (:class:`AnomalyCalibration`, the ``calibration`` component), with
the names of its image thresholds (:func:`threshold_key`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

RENOISE_KINDS = ("fixed", "fresh")
RECONSTRUCTIONS = ("denoise", "inpaint")
PRECISIONS = ("fp32", "bf16")
SAMPLING_PRESETS = ("fast", "thesis")


def is_int(value: Any, low: int = 1) -> bool:
    """``value`` is an integer (not a bool) >= ``low``: the check of every count a user passes."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


# Fields of SamplingConfig stored under an earlier name by calibrations saved before the rename: old -> new.
# ``inpaint_steps`` counted the steps of self_aware's reconstruction, which is denoising by default.
RENAMED_FIELDS = {"inpaint_steps": "reconstruction_steps"}


@dataclass(frozen=True)
class SamplingConfig:
    """Every lever of the sampler, validated once; the calibration stores it and every later call runs exactly it.

    Args:
        mask_timesteps: the ``t`` the noise error ``Q`` is averaged over (thesis: 300..350).
        mask_noise_draws: ``eps`` draws ``Q`` is averaged over (thesis: 1); the mask costs ``draws * len(t)`` passes.
        mask_percentile: ``p``: the mask is ``Q > Q_p``, ``Q_p`` the per-pixel ``p``-quantile of ``Q`` over normal
            images, so about ``1 - p`` of a normal image's pixels are redrawn (thesis: 0.8).
        inpaint_start: ``T``, the noise level every reconstruction starts from (thesis: 50).
        reconstruction_steps: strided steps of ``self_aware``'s reconstruction (inpainting or denoising) from ``T - 1``.
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
    reconstruction_steps: int = 7
    resample_steps: int = 1
    renoise: Literal["fixed", "fresh"] = "fresh"
    denoise_steps: int = 10
    map_filter_size: Optional[int] = None
    reconstruction: Literal["denoise", "inpaint"] = "denoise"
    precision: Literal["fp32", "bf16"] = "fp32"

    def __post_init__(self):
        steps = self.mask_timesteps
        if isinstance(steps, (int, np.integer)) or not steps or not all(is_int(t, 0) for t in steps):
            raise ValueError(f"mask_timesteps must be a non-empty sequence of ints >= 0; got {steps!r}")
        object.__setattr__(self, "mask_timesteps", tuple(int(t) for t in steps))
        for name in ("mask_noise_draws", "inpaint_start", "resample_steps"):
            if not is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
        for name in ("reconstruction_steps", "denoise_steps"):
            value = getattr(self, name)
            if not is_int(value) or value > self.inpaint_start:
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
        if size is not None and (not is_int(size) or size % 2 == 0):
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
        return cls(mask_timesteps=tuple(range(300, 351)), mask_noise_draws=1, reconstruction_steps=50, resample_steps=5,
                   renoise="fixed", denoise_steps=50, reconstruction="inpaint")

    @classmethod
    def from_preset(cls, config: Union[str, "SamplingConfig"]) -> "SamplingConfig":
        """A config, or the preset called ``config`` (one of :data:`SAMPLING_PRESETS`). A config made by another copy
        of this module is the same config (diffusers' remote code loads it twice: beside ``pipeline.py``, and as the
        calibration component's module)."""
        if isinstance(config, cls):
            return config
        if type(config).__name__ == cls.__name__ and callable(getattr(config, "to_dict", None)):
            return cls.from_dict(config.to_dict())
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
        return type(config).__name__ == type(self).__name__ and self == SamplingConfig.from_preset(config)

    def unet_passes(self, method: str) -> int:
        """Denoiser passes per image (with ``reconstruction="inpaint"``, an image whose mask comes out empty skips
        inpainting)."""
        if method == "denoise":
            return self.denoise_steps
        return self.mask_noise_draws * len(self.mask_timesteps) + self.reconstruction_steps * self.resample_steps

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able fields (what the calibration stores; :meth:`from_dict` reads them back)."""
        return {**dataclasses.asdict(self), "mask_timesteps": list(self.mask_timesteps)}

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SamplingConfig":
        """A config from :meth:`to_dict`'s fields (one stored before ``reconstruction`` existed: recalibrate). A field
        stored under its old name (:data:`RENAMED_FIELDS`) is read as the new one; the stored dict is left as it is
        (the calibration's hash is over it)."""
        if "reconstruction" not in values:
            raise ValueError("the calibration's sampling config predates `reconstruction`: recalibrate")
        return cls(**{RENAMED_FIELDS.get(key, key): value for key, value in values.items()})


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
        map_filter_size: the maps' mean filter the thresholds were fitted with (None: recorded by none before 0.4;
            they were fitted with the sampler's or the odd number nearest ``tile / 8``).
    """

    @register_to_config
    def __init__(self, resolution: int = 64, tile_size: Optional[int] = None,
                 sampling_config: Optional[Dict[str, Any]] = None,
                 threshold_names: List[str] = (), target_false_positive_rate: float = 0.05,
                 heldout_false_positive_rates: List[float] = (), heldout_mask_share: Optional[float] = None,
                 num_images: int = 0, stores_heldout_scores: bool = False, map_filter_size: Optional[int] = None):
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

    def sampling_for(self, config: Union[None, str, SamplingConfig], method: str, resolution: int,
                     tile_size: int) -> SamplingConfig:
        """The config a call asking for ``config`` (None: any) runs with ``method`` at the working resolution
        ``resolution`` in ``tile_size`` px tiles: this calibration's. Another config or layout, or ``self_aware`` on a
        calibration for ``denoise`` only, is a ``ValueError`` that says to recalibrate."""
        fitted = self.sampling
        layout = (int(self.config.resolution), int(self.config.get("tile_size") or self.config.resolution))
        if layout != (resolution, tile_size):
            raise ValueError(f"the calibration was made at {layout[0]} px in {layout[1]} px tiles but the model "
                             f"inspects at {resolution} px in {tile_size} px tiles: recalibrate with "
                             "pipe.calibrate(normal_images)")
        if config is not None and not fitted.matches(config):
            wanted = SamplingConfig.from_preset(config)
            raise ValueError(f"this pipeline was calibrated with sampling config {fitted.preset_name or fitted}; "
                             f"to run {wanted.preset_name or wanted}, recalibrate: "
                             f"pipe.calibrate(normal_images, config={wanted.preset_name or 'your_config'!r})")
        if method == "self_aware" and self.threshold(threshold_key("self_aware", "multiscale")) is None:
            raise ValueError("this pipeline was calibrated for method='denoise' only: recalibrate with "
                             "pipe.calibrate(normal_images) to run method='self_aware'")
        return fitted

    def filter_size(self, tile_size: int) -> int:
        """The mean filter every map is smoothed by, as when the thresholds were fitted (see ``map_filter_size``)."""
        size = self.sampling.map_filter_size or self.config.get("map_filter_size")
        if size:
            return int(size)
        legacy = max(3, int(round(tile_size / 8)))  # the default before 0.4
        return legacy if legacy % 2 == 1 else legacy + 1

    def threshold(self, name: str) -> Optional[float]:
        """The image threshold called ``name`` (``"<method>/<map>"``), or None when it was not calibrated."""
        names = list(self.config.threshold_names)
        return float(self.thresholds[names.index(name)]) if name in names else None

    def heldout_scores_of(self, name: str) -> Optional[np.ndarray]:
        """The held-out normal scores ``(num_images,)`` the threshold ``name`` was fitted on (None: none stored)."""
        names = list(self.config.threshold_names) if self.config.get("stores_heldout_scores") else []
        return self.heldout_scores[names.index(name)].float().cpu().numpy() if name in names else None

