"""What the benchmarks share: test tensors, a validation set with synthetic defects, per-image timed runs, AUROC
and memory (as diffusers' ``benchmarks/benchmarking_utils.py`` serves its benchmarks).

A benchmark imports it as ``from harness import ...`` (Python puts a script's own folder first on ``sys.path``),
never another benchmark's function. Training to a budget and resumable steps are :mod:`diffad.workflow`'s (the demo
shares them).

Memory: one measure everywhere, the process's peak resident set (``VmHWM`` in ``/proc/self/status``, which
:func:`reset_peak_rss` restarts from the current RSS, so a peak can cover one stage; ``getrusage``'s ``ru_maxrss``,
the same peak without a reset, where ``/proc`` is absent). This module imports only the standard library, numpy
and torch at load: ``bench_peer.py`` runs it in anomalib's venv, without diffad.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

__all__ = ["REAL_CATEGORIES", "SHARED_DATA", "auroc", "mean_over_categories", "peak_rss_mib", "reset_peak_rss", "rss_mib", "run_path", "split_tensors", "validation_set"]

_STATUS = Path("/proc/self/status")

#: the shared real data beside the checkout (``DIFFAD_BENCH_DATA``: another copy of it, e.g. on a GPU machine)
SHARED_DATA = Path(os.environ.get("DIFFAD_BENCH_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
#: the five real categories every quality bench runs (diffad's and the peer's) -> the MVTec AD-layout root holding it
REAL_CATEGORIES = {"bottle": SHARED_DATA / "mvtec_subset", "tire": SHARED_DATA / "more_real",
                   "metal_plate": SHARED_DATA / "more_real", "transistor": SHARED_DATA / "more_real",
                   "toothbrush": SHARED_DATA / "more_real"}


def mean_over_categories(cells: Mapping[Tuple[str, int], Mapping[str, Optional[float]]], categories: Sequence[str],
                         metrics: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Every quality bench's mean over categories (diffad's and the peer's), from ``cells[category, seed][metric]``:
    for each seed that every category ran (and scored finitely on the metric), the mean over the categories; then
    the mean and std (``ddof=0``) over those seeds. ``{metric: {"mean", "std", "n"}}``; a metric with no complete
    seed is absent."""
    seeds = sorted({seed for _, seed in cells})
    result: Dict[str, Dict[str, Any]] = {}
    for metric in metrics:
        per_seed = []
        for seed in seeds:
            values = [cells.get((category, seed), {}).get(metric) for category in categories]
            if all(v is not None and np.isfinite(v) for v in values):
                per_seed.append(float(np.mean(values)))
        if per_seed:
            result[metric] = {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "n": len(per_seed)}
    return result


# --------------------------------------------------------------------------- memory


def _status_mib(field: str) -> Optional[float]:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; None where there is none."""
    if not _STATUS.is_file():
        return None
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def rss_mib() -> float:
    """The process's resident memory now, in MiB (nan where ``/proc`` is absent)."""
    value = _status_mib("VmRSS")
    return float("nan") if value is None else value


def reset_peak_rss() -> bool:
    """Restart the peak (:func:`peak_rss_mib`) from the current resident memory (``/proc/self/clear_refs``);
    False where the kernel does not allow it (the peak then covers the whole process)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """The process's peak resident memory in MiB, since it started or since the last :func:`reset_peak_rss`."""
    value = _status_mib("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- data


def split_tensors(split, resolution: int, limit: Optional[int], seed: int
                  ) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """``(images (N, 3, R, R) in [-1, 1], masks (N, R, R) bool, labels (N,) int)`` of a split of
    :func:`diffad.data.load_mvtec`, read by the library's own transform (:func:`diffad.data.make_transform`); with
    ``limit``, a seeded subset of about ``limit`` rows keeping the share of each label."""
    from diffad.data import make_transform

    n = len(split)
    idx = np.arange(n)
    if limit is not None and limit < n:
        labels_all = np.array(split["label"])
        rng = np.random.default_rng(seed)
        picked = []
        for lab in np.unique(labels_all):
            members = idx[labels_all == lab]
            k = max(1, int(round(limit * len(members) / n)))
            picked.extend(rng.choice(members, size=min(k, len(members)), replace=False).tolist())
        idx = np.sort(np.array(picked))
    rows = split.select(idx.tolist()).with_transform(make_transform(resolution))[:]
    masks = torch.stack(rows["mask"])[:, 0].numpy() > 0.5
    return torch.stack(rows["pixel_values"]), masks, np.array(rows["label"])


def validation_set(images: torch.Tensor, draw: Callable[[torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]],
                   copies: int = 1) -> Tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The validation data a choice is made on (never the test split), from a validation split's normal ``images``
    ``(N, 3, R, R)``: the even positions calibrate; the odd ones are scored as they are and each once more with one
    synthetic defect, ``draw(image (3, R, R), n) -> (anomalous (3, R, R), mask (1, R, R))`` for the n-th defect
    (``draw`` seeds it: the same ``n``, the same defect, whatever else is drawn); with ``copies`` > 1 each scored
    image carries ``copies`` defects in turn (defects ``n = i * copies .. i * copies + copies - 1`` of image i):
    more positives from a small split.

    Returns:
        ``(calibration (C, 3, R, R), images (H + copies H, 3, R, R), masks bool, labels)``: the H normal images
        first, then their defective versions.
    """
    calib, held = images[0::2], images[1::2]
    pairs = [draw(img, i * copies + j) for i, img in enumerate(held) for j in range(copies)]
    scored = torch.cat([held, torch.stack([a for a, _ in pairs])])
    masks = np.concatenate([np.zeros((len(held),) + tuple(held.shape[-2:]), dtype=bool),
                            np.stack([m[0].numpy() > 0.5 for _, m in pairs])])
    return calib, scored, masks, np.array([0] * len(held) + [1] * len(pairs))


# --------------------------------------------------------------------------- timed runs and scores


def run_path(pipe: "SelfAwareInpaintPipeline", images: torch.Tensor, *, seed: int,
             **call_kwargs: Any) -> Dict[str, Any]:
    """Every image alone (batch 1), timed; seeds ``seed + i`` per image so that every config sees the same noise
    seeds. One call per image returns every map.

    Returns:
        ``seconds`` and ``passes`` (lists, one per image), ``scores`` ``{map: (N,)}``, ``maps`` ``{map: (N, R, R)}``,
        ``reconstructions`` ``(N, 3, R, R)`` in [-1, 1] and the inpainting ``masks`` ``(N, R, R)`` bool.
    """
    seconds, passes, recs, masks = [], [], [], []
    scores: Dict[str, List[float]] = {}
    maps: Dict[str, List[np.ndarray]] = {}
    for i in range(images.shape[0]):
        start = time.perf_counter()
        out = pipe(images[i:i + 1], generator=torch.Generator().manual_seed(seed + i), output_type="pt", **call_kwargs)
        seconds.append(time.perf_counter() - start)
        for name, values in out.scores.items():
            scores.setdefault(name, []).append(float(values[0]))
            maps.setdefault(name, []).append(out.anomaly_maps[name][0].numpy())
        passes.append(int(out.unet_passes[0]))
        recs.append(out.reconstructions[0])
        masks.append(out.inpaint_masks[0].numpy())
    return {"seconds": seconds, "scores": {k: np.array(v) for k, v in scores.items()},
            "maps": {k: np.stack(v) for k, v in maps.items()}, "passes": passes,
            "reconstructions": torch.stack(recs), "masks": np.stack(masks)}


def auroc(labels: np.ndarray, scores: np.ndarray) -> Optional[float]:
    """The area under the ROC curve of ``scores`` for binary ``labels``; None when only one label occurs."""
    from sklearn.metrics import roc_auc_score  # not in anomalib's venv, which imports this module for memory

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None
