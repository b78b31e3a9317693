# One photo as diffad judges it, and the Hugging Face Inference Endpoints handler. `diffad push` writes this file into
# every Hub repo as `handler.py`, beside the repo's `pipeline.py` and its siblings; it imports only torch, diffusers,
# numpy and Pillow.
"""One photo as diffad judges it, for every command and for a Hub repo's ``handler.py``.

What ``diffad detect``, ``diffad serve``, ``diffad watch`` and Inference Endpoints run for each photo lives here, in
a file every pushed repo carries, so that a Hub user with diffusers alone gets the very score ``diffad detect``
writes: the same 8-bit RGB photo (:func:`rgb_image`), the same noise generator (:func:`image_generator`), the same
decision (:func:`inspect_photos`) and the same JSON answer (:func:`answer`, ``POST /inspect``'s).

Inference Endpoints deploy a Hub model repo that carries a ``handler.py`` with ``EndpointHandler``: the container
calls ``EndpointHandler(path)`` once with the repo's local folder, then ``handler(data)`` per request, where
``data["inputs"]`` is the image (raw bytes, a PIL image, or a base64 string) and ``data["parameters"]`` the
options (``{"overlay": true}`` adds a base64 PNG heat map)::

    handler = EndpointHandler("path/to/repo")
    handler({"inputs": open("part.png", "rb").read(), "parameters": {"overlay": True}})
    # {"score": 0.61, "decision": "ok", "threshold": 0.93, "map": "combined", "method": "self_aware", ...}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import io
import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

try:  # installed: diffad.pipelines.self_aware_inpaint
    from . import images as _images, pipeline as _pipeline
except ImportError:  # `handler.py` at the top of a Hub repo: the repo's pipeline files, imported as one package
    _package = sys.modules.setdefault("diffad_hub_pipeline", types.ModuleType("diffad_hub_pipeline"))
    _package.__path__ = [os.path.dirname(os.path.abspath(__file__))]  # pipeline.py imports its siblings relatively
    _images, _pipeline = (importlib.import_module(f"{_package.__name__}.{name}") for name in ("images", "pipeline"))

#: The error of a photo the model could not judge (a NaN/inf map): an error, never a decision.
NONFINITE_ERROR = "the model produced a non-finite anomaly map: check the weights, or retrain"


def rgb_image(image: Any) -> Any:
    """A PIL image of any mode as the upright 8-bit RGB photo diffad scores (by the pipeline's ``rgb_array``); an
    upright RGB image of a valid size is returned as is. ``ValueError`` for an image that is too small."""
    from PIL import Image

    upright = _images.exif_orientation(image) in (None, 1)
    if image.mode == "RGB" and upright and min(image.size) >= _images.MIN_IMAGE_SIDE:
        return image
    return Image.fromarray((_images.rgb_array(image) * 255.0).round().astype(np.uint8), mode="RGB")


def seeded_generator(seed: int, *stream: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded from ``seed`` and a stream index (e.g. epoch, batch, rank).

    Deriving each batch's generator from its position makes a resumed run draw exactly the
    noise, timesteps and augmentations the uninterrupted run would have drawn, with no RNG
    state to save.
    """
    value = int(seed) & 0xFFFFFFFF
    for s in stream:
        value = (value * 1_000_003 + int(s) + 1) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(value)


def image_generator(seed: int, image: Any) -> torch.Generator:
    """The diffusion-noise generator of one image: seeded from ``seed`` and the image's decoded pixels.

    The one seeding rule of inference (``diffad detect``, ``diffad evaluate``, the demo): an image's
    result depends only on the image, the model and ``seed``, never on its batch, its position in
    it, its file name or what an interrupted run skipped.

    Args:
        seed: the run's seed.
        image: a PIL image (hashed as decoded: mode, size and pixel bytes) or a tensor.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu").contiguous()
        payload = f"{tuple(t.shape)}{t.dtype}".encode() + t.numpy().tobytes()
    else:
        payload = f"{image.mode}{image.size}".encode() + image.tobytes()
    digest = hashlib.sha256(payload).digest()
    return seeded_generator(seed, *(int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)))


@dataclass
class PhotoVerdict:
    """One photo judged as ``diffad detect`` judges it.

    ``decision`` is ``"ok"``, ``"defect"``, ``"unknown"`` (the map has no calibrated threshold) or ``"error"`` (the
    map is not finite: ``error`` says so and ``score`` is NaN; never ``"ok"``). ``anomaly_map`` and ``inpaint_mask``
    are ``(R, R)``; ``threshold`` is the map's calibrated image threshold (None when it has none).
    """

    score: float
    decision: str
    threshold: Optional[float]
    anomaly_map: np.ndarray
    inpaint_mask: np.ndarray
    error: str = ""


def inspect_photos(pipe: Any, photos: Sequence[Any], *, method: str = "self_aware",
                   anomaly_map: Optional[str] = None, seed: int = 0) -> List[PhotoVerdict]:
    """Judge 8-bit RGB photos (:func:`rgb_image`) with a calibrated pipeline: each photo's noise from
    ``image_generator(seed, photo)`` and the UNet run one photo at a time (batched arithmetic differs at 1e-7), so
    a photo's verdict never depends on the other photos of the call. ``anomaly_map`` None: the method's default."""
    photos = list(photos)
    anomaly_map = anomaly_map or pipe.default_map(method)
    output = pipe(photos, method=method, generator=[image_generator(seed, photo) for photo in photos], batch_size=1,
                  output_type="np")
    decisions = output.is_anomalous[anomaly_map]  # None: no calibrated threshold for this map
    threshold = pipe.calibration.threshold(_pipeline.threshold_key(method, anomaly_map))
    verdicts = []
    for i in range(len(photos)):
        amap, mask = output.anomaly_maps[anomaly_map][i], output.inpaint_masks[i]
        if not np.isfinite(amap).all():
            verdicts.append(PhotoVerdict(float("nan"), "error", threshold, amap, mask, NONFINITE_ERROR))
            continue
        decision = "unknown" if decisions is None else ("defect" if bool(decisions[i]) else "ok")
        verdicts.append(PhotoVerdict(float(output.scores[anomaly_map][i]), decision, threshold, amap, mask))
    return verdicts


#: Uploads larger than this are refused (``diffad serve`` answers 413; the handler raises ``ValueError``).
MAX_IMAGE_BYTES = 32 * 1024 * 1024

#: ``render_overlay(photo, anomaly_map, inpaint_mask, threshold) -> PIL image``: ``diffad.detect.render_overlay``.
OverlayRenderer = Callable[[Any, Any, Any, Optional[float]], Any]


def decode_photo(data: Any) -> Any:
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
    return rgb_image(data)


def answer(pipe: Any, photo: Any, *, method: str = "self_aware", anomaly_map: Optional[str] = None, seed: int = 0,
           overlay: bool = False, render_overlay: Optional[OverlayRenderer] = None) -> Dict[str, Any]:
    """The JSON answer for one photo (8-bit RGB, :func:`decode_photo`): ``score`` (None when the model could not judge
    it), ``decision`` (``ok``/``defect``/``unknown``/``error``, never ``ok`` without a judgement), ``threshold``,
    ``map``, ``method``, ``error`` and, with ``overlay``, ``overlay_png`` (base64 PNG of the heat map over the photo,
    drawn by ``render_overlay``; None with ``overlay_error`` when no renderer is installed)."""
    anomaly_map = anomaly_map or pipe.default_map(method)
    verdict = inspect_photos(pipe, [photo], method=method, anomaly_map=anomaly_map, seed=seed)[0]
    result: Dict[str, Any] = {"score": None if verdict.error else verdict.score, "decision": verdict.decision,
                              "threshold": verdict.threshold, "map": anomaly_map, "method": method,
                              "error": verdict.error}
    if overlay:
        if verdict.error:
            result["overlay_png"] = None
        elif render_overlay is None:
            result["overlay_png"] = None
            result["overlay_error"] = ("no overlay renderer here: diffad serve draws overlays "
                                       "(pip install 'diffad[serve]')")
        else:
            buffer = io.BytesIO()
            render_overlay(photo, verdict.anomaly_map, verdict.inpaint_mask, verdict.threshold).save(buffer, "PNG")
            result["overlay_png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return result


def model_facts(pipe: Any, *, method: str = "self_aware", anomaly_map: Optional[str] = None) -> Dict[str, Any]:
    """What the model decides with: working resolution, tile size and tiles per photo, sampler, precision, UNet
    passes per tile, the map and its threshold, and the calibration's held-out measurements (``GET /model``)."""
    anomaly_map = anomaly_map or pipe.default_map(method)
    cal = pipe.calibration
    sampling = cal.sampling
    config = cal.config
    return {"resolution": pipe.resolution, "tile_size": getattr(pipe, "tile_size", pipe.resolution),
            "tiles": getattr(pipe, "num_tiles", 1), "method": method, "map": anomaly_map,
            "maps": list(pipe.map_names(method)),
            "threshold": cal.threshold(_pipeline.threshold_key(method, anomaly_map)),
            "sampling_config": sampling.preset_name or "custom", "precision": sampling.precision,
            "unet_passes": sampling.unet_passes(method), "calibration_images": config.num_images,
            "target_false_positive_rate": config.target_false_positive_rate,
            "heldout_false_positive_rates": dict(zip(config.threshold_names, config.heldout_false_positive_rates)),
            "heldout_mask_share": config.heldout_mask_share}


class EndpointHandler:
    """The Inference Endpoints entry point: loads the repo with diffusers alone, answers like ``POST /inspect``.

    Args:
        path: the repo's local folder (Endpoints pass it; "" is the current folder).
        render_overlay: draws ``parameters.overlay``'s heat map (``diffad.detect.render_overlay``, as ``diffad serve``
            does); Endpoints pass none, and this file may not import diffad's commands (the layer rule), so there an
            overlay request is answered with ``overlay_error`` beside the complete verdict.
    """

    def __init__(self, path: str = "", render_overlay: Optional[OverlayRenderer] = None):
        from diffusers import DiffusionPipeline

        self.pipe = DiffusionPipeline.from_pretrained(path or ".", trust_remote_code=True)
        if not getattr(self.pipe, "is_calibrated", False):
            raise ValueError(f"{path or '.'} holds no calibrated diffad model: run `diffad calibrate` before pushing")
        self.pipe.set_progress_bar_config(disable=True)
        self.render_overlay = render_overlay

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        """``data["inputs"]``: the image; ``data["parameters"]``: ``overlay`` (bool), ``map`` (an anomaly map name),
        ``method`` (``self_aware``/``denoise``), ``seed`` (int). Returns :func:`answer`'s dict."""
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError("the request must be a JSON object with 'inputs' (the image) and optional 'parameters'")
        params = data.get("parameters") or {}
        method = params.get("method", "self_aware")
        if method not in _pipeline.METHODS:
            raise ValueError(f"parameters.method {method!r}: choose from {', '.join(_pipeline.METHODS)}")
        anomaly_map = params.get("map") or self.pipe.default_map(method)
        if anomaly_map not in self.pipe.map_names(method):
            raise ValueError(f"parameters.map {anomaly_map!r}: choose from {', '.join(self.pipe.map_names(method))}")
        photo = decode_photo(data["inputs"])
        return answer(self.pipe, photo, method=method, anomaly_map=anomaly_map, seed=int(params.get("seed", 0)),
                      overlay=bool(params.get("overlay", False)), render_overlay=self.render_overlay)
