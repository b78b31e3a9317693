# A call's inputs and outputs (diffad, community-pipeline format): ships beside pipeline.py in every Hub repo; torch,
# diffusers and numpy.
"""The edges of a call: diffad's one image reader (:func:`rgb_array`), images as the ``(B, 3, S, S)`` tensor the
pipeline runs on (:func:`preprocess`), one generator per image, image batches, and the outputs as numpy, torch or
PIL (:func:`to_output_type`)."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from .anomaly_calibration import is_int

ImageInput = Union[torch.Tensor, Any, Sequence[Any]]
OUTPUT_TYPES = ("np", "pt", "pil")
MIN_IMAGE_SIDE = 8  # smaller images carry no detail to judge (a 1 x 1 image upscales to grey)
#: EXIF orientation -> PIL ``Image.transpose`` method, as ``PIL.ImageOps.exif_transpose`` applies them.
_EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def exif_orientation(image: Any) -> Optional[int]:
    """The EXIF orientation tag of a PIL image (None when absent or malformed, as PIL's ``exif_transpose``)."""
    try:
        return image.getexif().get(0x0112)
    except Exception:  # noqa: BLE001
        return None


def rgb_array(image: Any) -> np.ndarray:
    """diffad's one image reader: a PIL image of any mode as an ``(H, W, 3)`` float32 array in [0, 1], EXIF
    orientation applied, gray repeated, alpha dropped; 16/32-bit integer and float modes scaled by their range
    (``I;16``: 65535; ``I``/``F``: 65535 above 255, else 255; ``F`` in [0, 1] stays), never clipped to white.
    ``ValueError`` for a side below :data:`MIN_IMAGE_SIDE` or non-finite pixels."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise ValueError(f"the image is {image.size[0]}x{image.size[1]} px; diffad needs at least {MIN_IMAGE_SIDE} "
                         "px per side")
    orientation = exif_orientation(image)
    if orientation in _EXIF_TRANSPOSE:
        image = image.transpose(_EXIF_TRANSPOSE[orientation])
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if arr.ndim == 3:
            arr = arr[..., 0]
        if not np.isfinite(arr).all():
            raise ValueError(f"the image (mode {mode}) has NaN or infinite pixels")
        top = 1.0 if arr.max() <= 1 and mode == "F" else 255.0
        top = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else top
        return np.repeat(np.clip(arr / top, 0.0, 1.0)[..., None], 3, axis=-1).astype(np.float32)
    if mode in ("P", "PA"):
        image = image.convert("RGBA")  # palette transparency without PIL's warning
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def preprocess(images: ImageInput, resolution: int, processor: VaeImageProcessor) -> torch.Tensor:
    """Images as ``(B, 3, S, S)`` in [-1, 1], ``S = resolution``: PIL images of any mode (:func:`rgb_array`, resized
    bicubic by ``processor``) or a ``(B, 3, H, W)``/``(3, H, W)`` float tensor in [-1, 1] (resized bilinear,
    antialiased). ``ValueError`` for an empty input, a wrong shape or type, NaN/inf or out-of-range values, a side
    below :data:`MIN_IMAGE_SIDE`."""
    r = resolution
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.ndim == 3 else images
        if x.ndim != 4 or x.numel() == 0 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be a non-empty (B, 3, H, W) or (3, H, W) RGB tensor; got shape "
                             f"{tuple(images.shape)} (repeat grayscale to 3 channels)")
        if not x.is_floating_point():
            raise ValueError(f"image tensor must be float in [-1, 1]; got dtype {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("image tensor contains NaN or inf values; pass finite values in [-1, 1]")
        if float(x.min()) < -1.001 or float(x.max()) > 1.001:
            raise ValueError(f"image tensor values must be in [-1, 1]; got min {float(x.min()):.3f}, "
                             f"max {float(x.max()):.3f}")
        if tuple(x.shape[-2:]) != (r, r):
            x = F.interpolate(x.float(), size=(r, r), mode="bilinear", align_corners=False, antialias=True)
        return x.float().clamp(-1.0, 1.0)
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no images given: pass a PIL image, a list of PIL images or a (B, 3, H, W) tensor")
    for i, img in enumerate(items):
        if not (hasattr(img, "convert") and hasattr(img, "size")):
            raise ValueError(f"image {i} has unsupported type {type(img).__name__}: pass PIL images or a tensor "
                             "in [-1, 1]")
        if 0 in img.size:
            raise ValueError(f"image {i} is empty (size {img.size}); pass a non-empty image")
    arrays = []
    for i, img in enumerate(items):
        try:
            arrays.append(rgb_array(img))
        except ValueError as err:
            raise ValueError(f"image {i}: {err}") from None
    # as 8-bit RGB (what the model was trained on), resized bicubic to R x R
    pils = [processor.numpy_to_pil(a[None])[0] for a in arrays]
    return processor.preprocess(pils, height=r, width=r).float()


def image_generators(generator: Union[None, torch.Generator, List[torch.Generator]], n: int) -> List[torch.Generator]:
    """One generator per image: a list is used as is; a generator (None: seed 0) seeds one per image."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} images: pass one per image or one in all")
        return list(generator)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    seeds = torch.randint(0, 2**62, (n,), generator=generator).tolist()
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def image_batches(n: int, batch_size: Optional[int]) -> List[np.ndarray]:
    """The indices of ``n`` images in batches of ``batch_size`` (None: one batch)."""
    if batch_size is not None and not is_int(batch_size):
        raise ValueError(f"batch_size must be None or an int >= 1; got {batch_size!r}")
    size = batch_size or n
    return [np.arange(i, min(i + size, n)) for i in range(0, n, size)]


def to_output_type(out: Tuple, output_type: str, processor: VaeImageProcessor) -> Tuple:
    """A call's ``(maps, scores, decisions, masks, reconstructions, passes, noise ratios)``, torch tensors, as
    ``output_type``: as they are (``"pt"``) or numpy arrays, the reconstructions as ``(B, S, S, 3)`` in [0, 1]
    (``"np"``) or PIL images (``"pil"``)."""
    if output_type == "pt":
        return out
    maps, scores, decisions, masks, recs, passes, ratios = out
    to_np = lambda d: {k: None if v is None else v.cpu().numpy() for k, v in d.items()}  # noqa: E731
    return (to_np(maps), to_np(scores), to_np(decisions), masks.cpu().numpy(),
            processor.postprocess(recs, output_type=output_type), passes.numpy(),
            None if ratios is None else ratios.cpu().numpy())
