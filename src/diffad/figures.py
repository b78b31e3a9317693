"""Figures: the thesis's Fig. 4.4-style panels and heat-map overlays (matplotlib, Agg backend).

* :func:`inspection_figure`: one row per image, columns original | reconstruction |
  noise-error map ``Q / Q_p`` (when available) | inpainting mask | multi-scale map | learned map
  (when available) | ground truth.
* :func:`overlay`: an anomaly heat map over the photo, with an optional mask outline
  (used by ``diffad detect``).
* :func:`score_histogram`: the calibration's held-out normal scores, the threshold and the scores of inspected
  images (``diffad app``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["FigureRow", "inspection_figure", "overlay", "score_histogram"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def _as_rgb_float(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 or float in [0, 1] -> float in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def overlay(
    image_rgb_uint8: np.ndarray,
    anomaly_map: np.ndarray,
    mask_outline: Optional[np.ndarray] = None,
    *,
    alpha: float = 0.5,
    vmin: Optional[float] = 0.0,
    vmax: Optional[float] = 1.0,
    cmap: str = "jet",
    outline_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Blend an anomaly heat map over a photo and draw a mask's outline.

    Args:
        image_rgb_uint8: the photo, ``(H, W, 3)`` uint8.
        anomaly_map: ``(h, w)`` float; resized (bilinear) to ``(H, W)`` when it differs. Values are
            clipped to ``[vmin, vmax]`` and mapped through ``cmap`` (default ``[0, 1]``: pass maps
            already scaled, e.g. by the decision threshold; ``None`` uses the map's own min / max).
        mask_outline: optional ``(h, w)`` bool mask (e.g. the inpainting mask or the ground truth),
            resized (nearest) to ``(H, W)``; its boundary is drawn in ``outline_color``.
        alpha: heat-map opacity in [0, 1].

    Returns:
        An RGB ``PIL.Image`` of size ``(W, H)``.
    """
    photo = np.asarray(image_rgb_uint8)
    if photo.ndim != 3 or photo.shape[-1] != 3 or photo.dtype != np.uint8:
        raise ValueError(f"image_rgb_uint8 must be (H, W, 3) uint8, got {photo.shape} {photo.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = photo.shape[:2]
    heat = np.asarray(anomaly_map, dtype=np.float32)
    if heat.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (h, w), got shape {heat.shape}")
    if heat.shape != (h, w):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize((w, h), Image.Resampling.BILINEAR))
    lo = float(np.nanmin(heat)) if vmin is None else float(vmin)
    hi = float(np.nanmax(heat)) if vmax is None else float(vmax)
    scaled = np.clip((heat - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    colours = _colormap(cmap)(scaled)[..., :3].astype(np.float32)
    out = (1 - alpha) * photo.astype(np.float32) / 255.0 + alpha * colours
    out = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
    if mask_outline is not None:
        mask = np.asarray(mask_outline).astype(bool)
        if mask.ndim != 2:
            raise ValueError(f"mask_outline must be 2-D (h, w), got shape {mask.shape}")
        if mask.shape != (h, w):
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)) > 127
        edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
        if max(h, w) > 256:  # keep the line visible on large photos
            edge = ndimage.binary_dilation(edge, iterations=max(1, max(h, w) // 256 - 1))
        out[edge] = outline_color
    return Image.fromarray(out, mode="RGB")


@dataclass
class FigureRow:
    """One row of :func:`inspection_figure`.

    Args:
        image: the test image, ``(R, R, 3)`` uint8 or float in [0, 1].
        reconstruction: its reconstruction, same format.
        inpainting_mask: ``(R, R)`` bool, the region that was redrawn (all False for denoising).
        multiscale_map: ``(R, R)`` float, or None.
        learned_map: ``(R, R)`` float, or None (the column is dropped when no row has one).
        ground_truth: ``(R, R)`` bool.
        title: row label, e.g. ``"broken_large/003.png  score 0.41"``.
        noise_error_map: ``(R, R)`` float, the pipeline's ``noise_error`` map: the self-aware mask
            stage's ``Q / Q_p``, mean-filtered (the mask redraws where the unfiltered ratio exceeds 1),
            or None (the column is dropped when no row has one).
    """

    image: np.ndarray
    reconstruction: np.ndarray
    inpainting_mask: np.ndarray
    multiscale_map: Optional[np.ndarray]
    learned_map: Optional[np.ndarray]
    ground_truth: np.ndarray
    title: str = ""
    noise_error_map: Optional[np.ndarray] = None


def inspection_figure(
    rows: Sequence[FigureRow],
    path: Optional[Union[str, os.PathLike]] = None,
    *,
    suptitle: Optional[str] = None,
    panel_size: float = 2.0,
    dpi: int = 100,
):
    """A Fig. 4.4-style panel: original, reconstruction, noise-error map, inpainting mask, multi-scale map, learned
    map, ground truth (the noise-error and learned columns only when some row has that map).

    Maps of one kind share one colour scale over all rows (0 to the largest value; the noise-error
    map, a ratio around 1, from its smallest to its largest value), so rows
    can be compared. Saved as PNG when ``path`` is given (the figure is then closed).

    Returns:
        The ``matplotlib.figure.Figure`` (closed when ``path`` is given; ``savefig`` still works).
    """
    if not rows:
        raise ValueError("inspection_figure needs at least one row")
    plt = _pyplot()
    columns = [("original", "image"), ("reconstruction", "reconstruction")]
    if any(r.noise_error_map is not None for r in rows):
        columns.append(("noise error Q/Q_p", "noise_error_map"))
    columns.append(("inpainting mask", "inpainting_mask"))
    if any(r.multiscale_map is not None for r in rows):
        columns.append(("multi-scale map", "multiscale_map"))
    if any(r.learned_map is not None for r in rows):
        columns.append(("learned map", "learned_map"))
    columns.append(("ground truth", "ground_truth"))
    vmax = {key: max([float(np.max(getattr(r, key))) for r in rows if getattr(r, key) is not None] + [1e-12])
            for key in ("multiscale_map", "learned_map", "noise_error_map")}
    vmin = {"multiscale_map": 0.0, "learned_map": 0.0,
            "noise_error_map": min([float(np.min(r.noise_error_map)) for r in rows if r.noise_error_map is not None]
                                   + [vmax["noise_error_map"]])}

    fig, axes = plt.subplots(len(rows), len(columns), squeeze=False,
                             figsize=(panel_size * len(columns), panel_size * len(rows) + (0.4 if suptitle else 0)))
    for i, row in enumerate(rows):
        for j, (label, key) in enumerate(columns):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            value = getattr(row, key)
            if value is None:
                ax.set_facecolor("0.85")
            elif key in ("image", "reconstruction"):
                ax.imshow(_as_rgb_float(value))
            elif key in ("inpainting_mask", "ground_truth"):
                ax.imshow(np.asarray(value, dtype=np.float32), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(np.asarray(value, dtype=np.float32), cmap="jet", vmin=vmin[key],
                          vmax=max(vmax[key], vmin[key] + 1e-12))
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0 and row.title:
                ax.set_ylabel(row.title, fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


def score_histogram(heldout: Optional[np.ndarray], threshold: float, inspected: Sequence[float] = (), *,
                    title: str = "", bins: int = 20):
    """A histogram of the held-out normal images' scores (what the threshold was fitted on), the threshold as a
    vertical line and the scores of ``inspected`` images as ticks along the bottom.

    Args:
        heldout: ``(N,)`` scores, or None when the calibration stores none (the figure says so).
        threshold: the image threshold drawn.
        inspected: scores of images inspected since (non-finite ones are left out).
        title: the axes' title; bins: the histogram's bins (at most one per held-out score).

    Returns:
        A ``matplotlib.figure.Figure`` not registered with pyplot (safe to make from several threads; freed with
        its last reference).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 2.8), dpi=100)
    ax = fig.add_subplot()
    if heldout is not None and len(heldout):
        ax.hist(np.asarray(heldout, dtype=np.float64), bins=min(bins, len(heldout)), color="tab:blue", alpha=0.6,
                label=f"held-out normal images ({len(heldout)})")
    else:
        ax.text(0.5, 0.6, "no held-out scores stored in this calibration:\nrecalibrate the model to see them",
                transform=ax.transAxes, ha="center", va="center", fontsize=9)
    ax.axvline(float(threshold), color="tab:red", linewidth=2, label=f"threshold {float(threshold):.4g}")
    scores = [float(v) for v in inspected if np.isfinite(v)]
    if scores:  # along the bottom, whatever the bars' height
        ax.plot(scores, [0.03] * len(scores), linestyle="none", marker="|", markersize=16, markeredgewidth=2,
                color="tab:orange", transform=ax.get_xaxis_transform(), label=f"inspected here ({len(scores)})")
    ax.set_xlabel("image score")
    ax.set_ylabel("images")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig
