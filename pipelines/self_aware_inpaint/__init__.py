"""The self-aware inpainting pipeline. ``pipeline.py`` is the very file every Hub repo carries."""

from .pipeline import (
    FAST_SETTINGS,
    REFERENCE_SETTINGS,
    AnomalyCalibration,
    SelfAwareInpaintPipeline,
    SelfAwareInpaintPipelineOutput,
    default_mean_filter_size,
    estimate_x0,
    multiscale_anomaly_map,
    predict_noise,
    segmenter_logits,
)

__all__ = [
    "FAST_SETTINGS",
    "REFERENCE_SETTINGS",
    "AnomalyCalibration",
    "SelfAwareInpaintPipeline",
    "SelfAwareInpaintPipelineOutput",
    "default_mean_filter_size",
    "estimate_x0",
    "multiscale_anomaly_map",
    "predict_noise",
    "segmenter_logits",
]
