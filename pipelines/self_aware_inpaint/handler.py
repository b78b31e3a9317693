# Hugging Face Inference Endpoints handler for a diffad model, written as `handler.py` into every pushed Hub repo
# by `diffad push`. It imports only torch, diffusers, numpy and Pillow; the model's own `pipeline.py` comes with
# the repo and is loaded by diffusers (`trust_remote_code=True`).
"""An Inference Endpoints ``EndpointHandler`` for a diffad model, and the one JSON answer of ``POST /inspect``.

Inference Endpoints deploy a Hub model repo that carries a ``handler.py`` with ``EndpointHandler``: the container
calls ``EndpointHandler(path)`` once with the repo's local folder, then ``handler(data)`` per request, where
``data["inputs"]`` is the image (raw bytes, a PIL image, or a base64 string) and ``data["parameters"]`` the
options (``{"overlay": true}`` adds a base64 PNG heat map). The answer is what ``diffad serve``'s
``POST /inspect`` answers for the same photo, with the score ``diffad detect`` writes for it: the same 8-bit RGB
photo, the same per-photo noise seed and the same decision (:func:`answer`, shared by both).

Call it as Endpoints do::

    handler = EndpointHandler("path/to/repo")
    handler({"inputs": open("part.png", "rb").read(), "parameters": {"overlay": True}})
    # {"score": 0.61, "decision": "ok", "threshold": 0.93, "map": "combined", "method": "self_aware", ...}
"""

from __future__ import annotations

import base64
import binascii
import io
import sys
from typing import Any, Callable, Dict, Optional

#: Uploads larger than this are refused (``diffad serve`` answers 413; the handler raises ``ValueError``).
MAX_IMAGE_BYTES = 32 * 1024 * 1024

#: ``render_overlay(photo, anomaly_map, inpaint_mask, threshold) -> PIL image``: ``diffad.detect.render_overlay``.
OverlayRenderer = Callable[[Any, Any, Any, Optional[float]], Any]


def _pipeline_module(pipe: Any) -> Any:
    """The module of ``pipe``'s class: diffad's pipeline file, installed or loaded from the repo as remote code."""
    return sys.modules[type(pipe).__module__]


def decode_photo(pipe: Any, data: Any) -> Any:
    """The photo in ``data`` (raw bytes, a PIL image, or a base64 string, optionally a ``data:`` URL) as the 8-bit RGB
    image diffad scores (the pipeline file's ``rgb_image``). ``ValueError`` with one line for anything else, an
    undecodable or truncated image, or more than :data:`MAX_IMAGE_BYTES`."""
    from PIL import Image

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") else data
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("inputs is a string but not base64: send the image's bytes, or base64 of them") from None
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) > MAX_IMAGE_BYTES:
            raise ValueError(f"the image is {len(data)} bytes; the limit is {MAX_IMAGE_BYTES}")
        try:
            with Image.open(io.BytesIO(bytes(data))) as image:
                image.load()
            data = image
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError, struct.error...
            raise ValueError(f"not a readable image ({type(exc).__name__}: {' '.join(str(exc).split())})") from None
    if not isinstance(data, Image.Image):
        raise ValueError(f"inputs must be image bytes, a PIL image or a base64 string, got {type(data).__name__}")
    return _pipeline_module(pipe).rgb_image(data)


def answer(pipe: Any, photo: Any, *, method: str = "self_aware", anomaly_map: Optional[str] = None, seed: int = 0,
           overlay: bool = False, render_overlay: Optional[OverlayRenderer] = None) -> Dict[str, Any]:
    """The JSON answer for one photo (8-bit RGB, :func:`decode_photo`): ``score`` (None when the model could not judge
    it), ``decision`` (``ok``/``defect``/``unknown``/``error``, never ``ok`` without a judgement), ``threshold``,
    ``map``, ``method``, ``error`` and, with ``overlay``, ``overlay_png`` (base64 PNG of the heat map over the photo,
    drawn by ``render_overlay``; None with ``overlay_error`` when no renderer is installed)."""
    module = _pipeline_module(pipe)
    anomaly_map = anomaly_map or pipe.default_map(method)
    verdict = module.inspect_photos(pipe, [photo], method=method, anomaly_map=anomaly_map, seed=seed)[0]
    result: Dict[str, Any] = {"score": None if verdict.error else verdict.score, "decision": verdict.decision,
                              "threshold": verdict.threshold, "map": anomaly_map, "method": method,
                              "error": verdict.error}
    if overlay:
        if verdict.error:
            result["overlay_png"] = None
        elif render_overlay is None:
            result["overlay_png"] = None
            result["overlay_error"] = "drawing the overlay needs diffad: pip install diffad"
        else:
            buffer = io.BytesIO()
            render_overlay(photo, verdict.anomaly_map, verdict.inpaint_mask, verdict.threshold).save(buffer, "PNG")
            result["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return result


def model_facts(pipe: Any, *, method: str = "self_aware", anomaly_map: Optional[str] = None) -> Dict[str, Any]:
    """What the model decides with: resolution, sampler, precision, UNet passes, the map and its threshold, and the
    calibration's held-out measurements (``diffad serve``'s ``GET /model``)."""
    anomaly_map = anomaly_map or pipe.default_map(method)
    cal = pipe.calibration
    sampling = cal.sampling
    config = cal.config
    return {"resolution": pipe.resolution, "method": method, "map": anomaly_map,
            "maps": list(pipe.map_names(method)), "threshold": cal.threshold(f"{method}/{anomaly_map}"),
            "sampling_config": sampling.preset_name or "custom", "precision": sampling.precision,
            "unet_passes": sampling.unet_passes(method), "calibration_images": config.num_images,
            "target_false_positive_rate": config.target_false_positive_rate,
            "heldout_false_positive_rates": dict(zip(config.threshold_names, config.heldout_false_positive_rates)),
            "heldout_mask_share": config.heldout_mask_share}


def _overlay_renderer() -> Optional[OverlayRenderer]:
    """diffad's overlay renderer where diffad is installed (a ``requirements.txt`` with ``diffad``), else None."""
    try:
        from diffad.detect import render_overlay
    except ImportError:
        return None
    return render_overlay


class EndpointHandler:
    """The Inference Endpoints entry point: loads the repo with diffusers alone, answers like ``POST /inspect``.

    Args:
        path: the repo's local folder (Endpoints pass it; "" is the current folder).
    """

    def __init__(self, path: str = ""):
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(path or ".", trust_remote_code=True)
        if not getattr(self.pipe, "is_calibrated", False):
            raise ValueError(f"{path or '.'} holds no calibrated diffad model: run `diffad calibrate` before pushing")
        self.pipe.set_progress_bar_config(disable=True)
        self.render_overlay = _overlay_renderer()

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """``data["inputs"]``: the image; ``data["parameters"]``: ``overlay`` (bool), ``map`` (an anomaly map name),
        ``method`` (``self_aware``/``denoise``), ``seed`` (int). Returns :func:`answer`'s dict."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request must be a JSON object with 'inputs' (the image) and optional 'parameters'")
        params = data.get("parameters") or {}
        method = params.get("method", "self_aware")
        if method not in _pipeline_module(self.pipe).METHODS:
            raise ValueError(f"parameters.method {method!r}: choose from {', '.join(_pipeline_module(self.pipe).METHODS)}")
        anomaly_map = params.get("map") or self.pipe.default_map(method)
        if anomaly_map not in self.pipe.map_names(method):
            raise ValueError(f"parameters.map {anomaly_map!r}: choose from {', '.join(self.pipe.map_names(method))}")
        photo = decode_photo(self.pipe, data["inputs"])
        return answer(self.pipe, photo, method=method, anomaly_map=anomaly_map, seed=int(params.get("seed", 0)),
                      overlay=bool(params.get("overlay", False)), render_overlay=self.render_overlay)
