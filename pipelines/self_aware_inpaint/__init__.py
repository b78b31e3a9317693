"""The self-aware inpainting pipeline. ``pipeline.py`` is the very file every Hub repo carries."""

from .pipeline import SelfAwareInpaintPipeline, SelfAwareInpaintPipelineOutput, predict_noise

__all__ = ["SelfAwareInpaintPipeline", "SelfAwareInpaintPipelineOutput", "predict_noise"]
