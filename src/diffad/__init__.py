"""diffad: automated visual inspection with diffusion models.

Train a self-conditioned DDPM on photos of good parts, then find and outline defects in new
photos by *self-aware* inpainting reconstruction (Semchyshyn, 2023): the model's own
noise-prediction error marks suspicious pixels, resampled diffusion inpainting redraws them
as a normal part would look, and the difference is the anomaly map.

Public API (imported lazily so that ``import diffad`` stays fast)::

    from diffad import load_mvtec, make_synthetic_dataset, SelfAwareInpaintPipeline
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_mvtec": "diffad.data",
    "list_categories": "diffad.data",
    "MVTecDataError": "diffad.data",
    "make_synthetic_dataset": "diffad.synthetic",
    "SelfAwareInpaintPipeline": "diffad.pipelines.self_aware_inpaint",
    "SelfAwareInpaintPipelineOutput": "diffad.pipelines.self_aware_inpaint",
    "compute_anomaly_metrics": "diffad.metrics",
    "make_anomaly": "diffad.anomalies",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffad' has no attribute {name!r}")
