"""Synthetic defects that look like the ones parts have: thin scratches and cracks, small pits, low-contrast stains,
beside DRAEM's texture blobs (:class:`diffad.anomalies.AnomalySynthesizer`).

DRAEM's blobs are large and textured: at the working resolution a real scratch is 1-3 px wide and a pit a few
pixels across, and a detector validated on blobs alone looks better than it is (a DRAEM set predicted a real
category at image AUROC 1.000 where its test split gave 0.61). :class:`DefectSynthesizer` draws one defect of a
chosen kind; sizes are given for a 256 px image and scale with the image side.

* ``scratch``: a thin curved line (a quadratic Bezier) 1-3 px wide (at 256 px), 10-35% of the side long, darker or
  lighter by 0.15-0.6 (in [-1, 1] units), soft-edged; ``crack`` is a dark, jagged, branching version.
* ``pit``: 1-3 small dark (or bright) discs of radius 1.5-5 px with a soft profile.
* ``stain``: one smooth blob (a component of a Perlin mask) of a random colour at opacity 0.1-0.35: low contrast.
* ``blob``: DRAEM's texture blob (DTD textures when a folder is given), opacity 0.1-1.
* ``displace`` (not in the default set): a rectangle of the part itself, 12-35% of the side each way, cut and pasted
  elsewhere, sometimes flipped (CutPaste, Li et al. 2021): every pixel looks normal and only the place is wrong,
  as with a misplaced or missing component. The mask is where the pasted pixels differ visibly (> 0.1).

``scale_range=(lo, hi)`` multiplies each defect's widths and radii (a stain: grows it) by a factor drawn
log-uniformly in it. The default ``(1, 1)`` draws the sizes above (scratches, cracks, pits and stains of about
80-250 px at 256 px); validation sets draw ``VALIDATION_SCALE_RANGE``: real defects span a few to thousands of
pixels, and a validation set of small defects alone ranked the map filter sizes against the test split's order.

Every sample is ``(anomalous (3, H, W) in [-1, 1], mask (1, H, W) in {0, 1})``; the mask is where a mark reaches a
quarter of its strength (``displace``: where the pasted pixels differ by > 0.1), so a faint fringe of a soft mark
lies outside it; pixels beyond a mark's footprint are unchanged bit for bit, and a mask is never empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from diffad.anomalies import AnomalySynthesizer, numpy_rng, perlin_mask

#: The default kinds, in the order :class:`DefectSynthesizer` cycles through them (the head is trained on these).
DEFECT_KINDS = ("scratch", "crack", "pit", "stain", "blob")
#: Every kind the synthesizer draws: the default ones and ``displace`` (a global anomaly, for validation).
ALL_DEFECT_KINDS = DEFECT_KINDS + ("displace",)
#: The size factors a validation set draws (log-uniform): defects of about 80 px to a few thousand at 256 px.
VALIDATION_SCALE_RANGE = (1.0, 8.0)


def check_kinds(kinds: Sequence[str]) -> tuple[str, ...]:
    """``kinds`` as a tuple, when it is a non-empty selection of :data:`ALL_DEFECT_KINDS`; else ValueError."""
    unknown = [k for k in kinds if k not in ALL_DEFECT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty selection of {','.join(ALL_DEFECT_KINDS)}; got {list(kinds)}")
    return tuple(kinds)


def check_scale_range(scale_range: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` as floats, when ``0 < low <= high``; else ValueError."""
    if not (len(scale_range) == 2 and 0 < scale_range[0] <= scale_range[1]):
        raise ValueError(f"scale_range must be (low, high) with 0 < low <= high; got {scale_range!r}")
    return float(scale_range[0]), float(scale_range[1])


def _curve_points(rng: np.random.Generator, size: int, length: float) -> np.ndarray:
    """``(N, 2)`` points (row, col) along a quadratic Bezier of about ``length`` pixels inside the image."""
    start = rng.uniform(0.1, 0.9, size=2) * size
    angle = rng.uniform(0, np.pi)
    end = np.clip(start + length * np.array([np.sin(angle), np.cos(angle)]), 1, size - 2)
    bend = (start + end) / 2 + rng.normal(0, length * 0.2, size=2)
    t = np.linspace(0, 1, max(8, int(length * 3)))[:, None]
    return (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end


def _stroke(points: np.ndarray, size: int, width: float) -> np.ndarray:
    """A soft stroke ``(S, S)`` in [0, 1] of ``width`` px along ``points``."""
    canvas = np.ones((size, size), bool)
    idx = np.clip(np.round(points).astype(int), 0, size - 1)
    canvas[idx[:, 0], idx[:, 1]] = False
    dist = ndimage.distance_transform_edt(canvas)
    return np.clip(width / 2 + 0.5 - dist, 0, 1).astype(np.float32)


class DefectSynthesizer:
    """Draws one synthetic defect of a given (or random) kind onto an image.

    Args:
        kinds: the kinds to draw from (see :data:`DEFECT_KINDS`).
        textures: DRAEM's texture source for ``blob`` (None: procedural; a folder of images, e.g. DTD).

    Example::

        synth = DefectSynthesizer()
        image_with_scratch, mask = synth(image, kind="scratch", generator=torch.Generator().manual_seed(0))
    """

    def __init__(self, kinds: Sequence[str] = DEFECT_KINDS, textures: Union[None, str, Path] = None,
                 scale_range: tuple[float, float] = (1.0, 1.0)):
        self.scale_range = check_scale_range(scale_range)
        self.kinds = check_kinds(kinds)
        self.blobs = AnomalySynthesizer(textures, normal_probability=0.0) if "blob" in kinds else None

    @property
    def config(self) -> dict:
        """What the samples depend on besides the image and the generator (a cache key's part)."""
        return {"kinds": list(self.kinds), "blobs": None if self.blobs is None else self.blobs.config,
                **({} if self.scale_range == (1.0, 1.0) else {"scale_range": list(self.scale_range)})}

    def __call__(self, image: torch.Tensor, *, kind: Optional[str] = None,
                 generator: Union[None, int, torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One defect on ``image`` (``(3, H, W)`` float in [-1, 1]): ``(anomalous, mask)``."""
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be a float tensor (3, H, W) in [-1, 1]; got {getattr(image, 'shape', image)}")
        rng = numpy_rng(generator)
        kind = kind or self.kinds[int(rng.integers(len(self.kinds)))]
        if kind not in self.kinds:
            raise ValueError(f"kind must be one of {self.kinds}; got {kind!r}")
        if kind == "blob":
            return self.blobs(image, generator=int(rng.integers(2**31)))
        size = image.shape[-1]
        scale = size / 256
        low, high = self.scale_range
        if high > low or low != 1.0:  # the default draws nothing here: its samples are those of before
            scale *= float(np.exp(rng.uniform(np.log(low), np.log(high))))
        for _ in range(20):  # a draw that touches no pixel is redrawn
            alpha, colour = getattr(self, f"_{kind}")(rng, size, scale, image)
            if alpha.max() > 0.05:
                break
        alpha_t = torch.from_numpy(alpha).to(image)[None]
        out = image * (1 - alpha_t) + colour.to(image) * alpha_t
        mask = (alpha_t >= 0.25 * alpha_t.max()).to(image.dtype)
        return torch.where(alpha_t > 0, out.clamp(-1, 1), image), mask

    @staticmethod
    def _shade(rng: np.random.Generator, image: torch.Tensor, low: float, high: float,
               dark: Optional[bool] = None) -> torch.Tensor:
        """The image shifted darker or lighter by ``U[low, high]``: the colour a mark paints with."""
        delta = rng.uniform(low, high) * (-1 if (rng.random() < 0.6 if dark is None else dark) else 1)
        return (image + delta).clamp(-1, 1)

    def _scratch(self, rng, size, scale, image):
        points = _curve_points(rng, size, rng.uniform(0.10, 0.35) * size)
        alpha = _stroke(points, size, rng.uniform(1.0, 3.0) * scale) * rng.uniform(0.6, 1.0)
        return alpha, self._shade(rng, image, 0.15, 0.6)

    def _crack(self, rng, size, scale, image):
        alpha = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 4))):  # a trunk and up to two branches
            points = _curve_points(rng, size, rng.uniform(0.05, 0.25) * size)
            points = points + rng.normal(0, 0.8 * scale, points.shape)  # jagged
            alpha = np.maximum(alpha, _stroke(points, size, rng.uniform(1.0, 2.0) * scale))
        return alpha, self._shade(rng, image, 0.3, 0.8, dark=True)

    def _pit(self, rng, size, scale, image):
        yy, xx = np.mgrid[:size, :size]
        alpha = np.zeros((size, size), np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.1, 0.9, size=2) * size
            radius = rng.uniform(1.5, 5.0) * scale
            alpha = np.maximum(alpha, np.clip(1.5 - np.hypot(yy - cy, xx - cx) / radius, 0, 1).astype(np.float32))
        return alpha, self._shade(rng, image, 0.3, 0.8)

    def _stain(self, rng, size, scale, image):
        mask = perlin_mask((size, size), generator=rng, min_scale_exponent=2, max_scale_exponent=5)
        labels, count = ndimage.label(mask)
        if count:  # one compact stain, not a scatter of them
            mask = (labels == int(rng.integers(1, count + 1))).astype(np.float32)
        grow = int(round(3 * (scale - size / 256)))  # a stain of a larger size factor is grown by 3 px per unit
        if grow > 0:
            mask = ndimage.binary_dilation(mask > 0, iterations=grow).astype(np.float32)
        alpha = ndimage.gaussian_filter(mask, 1.5 * scale).astype(np.float32) * rng.uniform(0.1, 0.35)
        colour = torch.from_numpy(rng.uniform(-1, 1, size=3).astype(np.float32)).view(3, 1, 1).expand_as(image)
        return np.where(mask > 0, alpha, 0).astype(np.float32), colour

    def _displace(self, rng, size, scale, image):
        h, w = (max(2, int(rng.uniform(0.12, 0.35) * size)) for _ in range(2))
        y0, x0 = (int(rng.integers(0, size - n + 1)) for n in (h, w))
        for _ in range(20):  # a destination at least half a patch away from the source
            y1, x1 = (int(rng.integers(0, size - n + 1)) for n in (h, w))
            if max(abs(y1 - y0) / h, abs(x1 - x0) / w) >= 0.5:
                break
        patch = image[:, y0:y0 + h, x0:x0 + w]
        if rng.random() < 0.5:
            patch = torch.flip(patch, dims=[int(rng.integers(1, 3))])
        colour = image.clone()
        colour[:, y1:y1 + h, x1:x1 + w] = patch
        changed = ((colour - image).abs().mean(dim=0) > 0.1).numpy()
        changed = ndimage.binary_opening(changed, iterations=1)
        return changed.astype(np.float32), colour
