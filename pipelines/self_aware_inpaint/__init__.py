"""The self-aware inpainting pipeline. ``pipeline.py`` and its siblings (``folder.CODE_FILES``) are the very files every
Hub repo carries; ``inspection.py`` is its ``handler.py``."""

# diffusers loads the networks of a `diffad export` folder (model_index.json: ["diffad.networks", ...]) only from a
# module already imported: importing the pipeline makes them loadable. The only module of diffad imported here.
from diffad import networks as _exported_networks  # noqa: F401  (openvino/onnxruntime are imported only when used)

from .anomaly_calibration import SAMPLING_PRESETS, AnomalyCalibration, SamplingConfig, threshold_key
from .images import MIN_IMAGE_SIDE, exif_orientation, rgb_array
from .inspection import (
    NONFINITE_ERROR,
    EndpointHandler,
    PhotoVerdict,
    image_generator,
    inspect_photos,
    rgb_image,
    seeded_generator,
)
from .maps import (COMBINED_MAPS, MAP_NAMES, combined_map, default_mean_filter_size, mean_filter,
                   multiscale_anomaly_map, per_pixel_quantile, segmenter_logits)
from .pipeline import (
    METHODS,
    NoiseSchedule,
    SelfAwareInpaintPipeline,
    SelfAwareInpaintPipelineOutput,
    denoise,
    inpaint,
    noise_error,
    predict_noise,
)

__all__ = [
    "COMBINED_MAPS",
    "MAP_NAMES",
    "METHODS",
    "MIN_IMAGE_SIDE",
    "NONFINITE_ERROR",
    "NoiseSchedule",
    "SAMPLING_PRESETS",
    "AnomalyCalibration",
    "EndpointHandler",
    "SamplingConfig",
    "SelfAwareInpaintPipeline",
    "PhotoVerdict",
    "SelfAwareInpaintPipelineOutput",
    "combined_map",
    "default_mean_filter_size",
    "denoise",
    "exif_orientation",
    "image_generator",
    "inpaint",
    "inspect_photos",
    "mean_filter",
    "multiscale_anomaly_map",
    "noise_error",
    "per_pixel_quantile",
    "predict_noise",
    "rgb_array",
    "rgb_image",
    "seeded_generator",
    "segmenter_logits",
    "threshold_key",
]
