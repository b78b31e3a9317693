"""Anomaly-detection metrics: image AUROC, image F1-max, pixel AUROC and AUPRO.

Plain numpy / scikit-learn functions (fast, testable, offline); :func:`compute_anomaly_metrics` gives them all.

References:
    * AUPRO: P. Bergmann, M. Fauser, D. Sattlegger, C. Steger, "Uninformed Students:
      Student-Teacher Anomaly Detection with Discriminative Latent Embeddings", CVPR 2020;
      and the MVTec AD evaluation code (per-region overlap, regions are 8-connected
      components of the ground truth, integrated over FPR in [0, 0.3], normalised by 0.3).
    * Image AUROC, the thesis's Table 4.1 metric (Semchyshyn, 2023).

Conventions: ``scores`` (N,) higher = more anomalous; ``labels`` (N,) 1 = defect, 0 = good;
``anomaly_maps`` (N, H, W) float, higher = more anomalous; ``masks`` (N, H, W) 1 = defect pixel.
Scores are used raw (no min-max normalisation).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = [
    "aupro",
    "compute_anomaly_metrics",
    "image_auroc",
    "image_f1_max",
    "pixel_auroc",
    "pro_curve",
]

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_REGION_STRUCTURE = np.ones((3, 3), dtype=int)


def _as_scores_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same length, got {scores.shape[0]} and {labels.shape[0]}")
    if scores.size == 0:
        raise ValueError("scores is empty: the metrics need at least one good and one defective image")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores contain {int((~np.isfinite(scores)).sum())} NaN/inf values: fix the anomaly scores first")
    if not np.all(np.isin(labels, (0, 1))):
        bad = np.unique(labels[~np.isin(labels, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (good) or 1 (defect), got values {bad.tolist()}")
    labels = labels.astype(np.int64)
    n_defect = int(labels.sum())
    if n_defect == 0 or n_defect == labels.size:
        only = "defect" if n_defect else "good"
        raise ValueError(
            f"image-level metrics are undefined with one class only: all {labels.size} labels are '{only}'; "
            "evaluate on a test split with both good and defective images"
        )
    return scores, labels


def _as_maps_masks(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(anomaly_maps)
    if not np.issubdtype(maps.dtype, np.floating):
        maps = maps.astype(np.float64)
    masks = np.asarray(masks)
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None] if masks.ndim == 2 else masks
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise ValueError(
            f"anomaly_maps and masks must both be (N, H, W) with equal shapes, got {maps.shape} and {masks.shape}"
        )
    if not np.all(np.isfinite(maps)):
        raise ValueError(f"anomaly_maps contain {int((~np.isfinite(maps)).sum())} NaN/inf values")
    if masks.dtype != bool:
        if not np.all(np.isin(masks, (0, 1))):
            raise ValueError("masks must be binary (0 = good pixel, 1 = defect pixel); threshold them first")
        masks = masks.astype(bool)
    n_defect = int(masks.sum())
    if n_defect == 0 or n_defect == masks.size:
        only = "defect" if n_defect else "good"
        raise ValueError(
            f"pixel-level metrics are undefined with one class only: all {masks.size} mask pixels are '{only}'"
        )
    return maps, masks


def image_auroc(scores: Any, labels: Any) -> float:
    """Image-level AUROC: area under the ROC curve of ``scores`` (N,) against ``labels`` (N,) in {0, 1}.

    Ties count one half (the Mann-Whitney statistic), so constant scores give 0.5.
    """
    scores, labels = _as_scores_labels(scores, labels)
    return float(roc_auc_score(labels, scores))


def image_f1_max(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over all thresholds; an image is called defective when ``score >= threshold``.

    Returns:
        ``(f1_max, threshold)``; the threshold is one of the given scores (the lowest one
        when several give the same F1).
    """
    scores, labels = _as_scores_labels(scores, labels)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def pixel_auroc(anomaly_maps: Any, masks: Any) -> float:
    """Pixel-level AUROC over all pixels of ``anomaly_maps`` (N, H, W) against ``masks`` (N, H, W)."""
    maps, masks = _as_maps_masks(anomaly_maps, masks)
    return float(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))


def pro_curve(anomaly_maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve: PRO against the pixel false-positive rate, one point per distinct threshold.

    Ground-truth regions are the 8-connected components of each image's mask. For a threshold
    ``th`` (a pixel is flagged when ``map >= th``): ``FPR(th)`` is the share of good pixels (all
    images) that are flagged, ``PRO(th)`` the mean over all regions of the share of the region
    that is flagged. One sort of all pixels gives every threshold at once.

    Returns:
        ``(fpr, pro)``, both increasing, starting at ``(0, 0)`` and ending at ``(1, 1)``.
    """
    maps, masks = _as_maps_masks(anomaly_maps, masks)
    regions = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=_REGION_STRUCTURE)
        regions[i] = np.where(lab > 0, lab + num_regions, 0)
        num_regions += n
    flat_regions = regions.reshape(-1)
    flat_scores = maps.reshape(-1)
    region_sizes = np.bincount(flat_regions, minlength=num_regions + 1).astype(np.float64)
    num_good = region_sizes[0]

    # Each pixel's contribution to FPR (good pixels) or to PRO (pixels in a region).
    weight_fpr = np.where(flat_regions == 0, 1.0 / num_good, 0.0)
    with np.errstate(divide="ignore"):
        per_region = 1.0 / (num_regions * region_sizes)
    per_region[0] = 0.0
    weight_pro = per_region[flat_regions]

    order = np.argsort(-flat_scores, kind="stable")
    sorted_scores = flat_scores[order]
    fpr = np.cumsum(weight_fpr[order])
    pro = np.cumsum(weight_pro[order])
    # Keep the last pixel of each run of equal scores: the curve's points are distinct thresholds.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    fpr = np.r_[0.0, np.minimum(fpr[last_of_tie], 1.0)]
    pro = np.r_[0.0, np.minimum(pro[last_of_tie], 1.0)]
    return fpr, pro


def aupro(anomaly_maps: Any, masks: Any, *, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for FPR in ``[0, max_fpr]``, divided by ``max_fpr`` (1.0 = perfect).

    Args:
        anomaly_maps: (N, H, W) float, higher = more anomalous.
        masks: (N, H, W) in {0, 1}, at least one defect and one good pixel.
        max_fpr: the integration limit in (0, 1]; 0.3 as in Bergmann et al. 2020.

    The curve is integrated with the trapezoidal rule, linearly interpolated at ``max_fpr``.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(anomaly_maps, masks)
    # fpr is non-decreasing; several points may share one fpr (thresholds flagging region pixels only).
    end = int(np.searchsorted(fpr, max_fpr, side="right"))
    xs, ys = fpr[:end], pro[:end]
    if end < fpr.size and xs[-1] < max_fpr:
        x0, x1, y0, y1 = fpr[end - 1], fpr[end], pro[end - 1], pro[end]
        y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        xs, ys = np.r_[xs, max_fpr], np.r_[ys, y_at]
    area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
    return area / max_fpr


def compute_anomaly_metrics(
    scores: Any,
    labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    *,
    max_fpr: float = 0.3,
) -> dict[str, float]:
    """All the metrics of the thesis's Table 4.1 and today's papers, as one dict.

    Args:
        scores: (N,) image anomaly scores, higher = more anomalous.
        labels: (N,) 1 = defect, 0 = good; both classes must occur.
        anomaly_maps: optional (N, H, W) float maps.
        masks: optional (N, H, W) ground truth in {0, 1}; needed together with ``anomaly_maps``.
        max_fpr: AUPRO's FPR limit (0.3).

    Returns:
        ``{"image_auroc", "image_f1_max", "image_f1_threshold"}``, plus ``"pixel_auroc"`` and
        ``"aupro"`` when maps and masks are given.

    Raises:
        ValueError: mismatched shapes, NaN/inf, non-binary labels/masks, or one class only.
    """
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("pass anomaly_maps and masks together (pixel metrics need both), or neither")
    scores, labels = _as_scores_labels(scores, labels)
    f1, threshold = image_f1_max(scores, labels)
    result = {
        "image_auroc": image_auroc(scores, labels),
        "image_f1_max": f1,
        "image_f1_threshold": threshold,
    }
    if anomaly_maps is not None:
        maps, gt = _as_maps_masks(anomaly_maps, masks)
        if maps.shape[0] != scores.shape[0]:
            raise ValueError(f"got {scores.shape[0]} scores but {maps.shape[0]} anomaly maps: they must match")
        result["pixel_auroc"] = pixel_auroc(maps, gt)
        result["aupro"] = aupro(maps, gt, max_fpr=max_fpr)
    return result

