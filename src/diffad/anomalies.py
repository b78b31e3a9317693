"""DRAEM-style synthetic anomalies: Perlin-noise masks filled with augmented foreign textures.

Reference: V. Zavrtanik, M. Kristan, D. Skocaj, "DRAEM - A discriminatively trained
reconstruction embedding for surface anomaly detection", ICCV 2021
(https://arxiv.org/abs/2108.07610). As in DRAEM:

* a Perlin noise image with random scales ``2**kx``, ``2**ky`` (``k`` in ``0..5``), rotated by a
  random angle in [-90, 90] degrees, thresholded at 0.5, gives the mask ``M``;
* a texture image ``A`` (a folder of photos such as DTD, or a built-in procedural source)
  is changed by 3 augmentations drawn without replacement from {posterize, sharpness,
  solarize, equalize, brightness, color, autocontrast} (PIL ``ImageOps``/``ImageEnhance``);
* it is blended with opacity ``beta ~ U[0.1, 1.0]``:
  ``I_a = (1 - M) I + (1 - beta) (M I) + beta (M A)`` (DRAEM's blending);
* a share of the samples (``normal_probability``, 0.5 as in DRAEM) stays normal, mask empty.

Every draw comes from the ``generator`` argument (a ``torch.Generator`` or an int seed; one
int64 drawn from it seeds a numpy ``Generator`` for the whole sample). ``generator=None`` falls
back to torch's default generator, as diffusers does.
"""

from __future__ import annotations

import functools
import hashlib
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

from diffad.data import read_image
from diffad.inputs import IMAGE_EXTENSIONS, walk_images

__all__ = [
    "AUGMENTATIONS",
    "AnomalySynthesizer",
    "ProceduralTextures",
    "TextureFolder",
    "TextureSource",
    "make_anomaly",
    "numpy_rng",
    "perlin_mask",
    "perlin_noise",
]


GeneratorLike = Optional[Union[torch.Generator, int, np.random.Generator]]


def numpy_rng(generator: GeneratorLike) -> np.random.Generator:
    """One numpy Generator derived from a torch.Generator / int seed (None: torch's default generator)."""
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# Perlin noise
# --------------------------------------------------------------------------------------------


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3  # Perlin's quintic interpolant


def perlin_noise(
    shape: tuple[int, int], scale: tuple[int, int], *, generator: GeneratorLike = None
) -> np.ndarray:
    """Gradient (Perlin) noise, vectorised: ``scale = (ry, rx)`` lattice cells along (height, width).

    Args:
        shape: ``(H, W)`` of the output.
        scale: number of lattice cells along each axis (>= 1); DRAEM uses powers of two.
        generator: torch.Generator / int seed for the random gradient directions.

    Returns:
        float32 array ``(H, W)``, roughly in [-1, 1] (zero mean).
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(scale[0]), int(scale[1])
    if h < 1 or w < 1 or ry < 1 or rx < 1:
        raise ValueError(f"shape and scale must be positive, got shape={shape}, scale={scale}")
    rng = numpy_rng(generator)
    angles = rng.uniform(0.0, 2 * math.pi, size=(ry + 1, rx + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # (ry+1, rx+1, 2)
    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]  # (H,1), (1,W) position inside the cell

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[iy[:, None] + dy, ix[None, :] + dx]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (math.sqrt(2) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    *,
    generator: GeneratorLike = None,
    min_scale_exponent: int = 0,
    max_scale_exponent: int = 6,
    threshold: float = 0.5,
    rotate: bool = True,
) -> np.ndarray:
    """A DRAEM anomaly mask: Perlin noise at random scales ``2**k`` (k in [min, max)), rotated, thresholded.

    Args:
        shape: ``(H, W)``.
        generator: torch.Generator / int seed.
        min_scale_exponent, max_scale_exponent: ``kx, ky`` are drawn independently from
            ``[min, max)`` (DRAEM: 0 and 6, i.e. 1 to 32 lattice cells).
        threshold: pixels with noise above it are anomalous (DRAEM: 0.5).
        rotate: rotate the noise by an angle in [-90, 90] degrees before thresholding (DRAEM).

    Returns:
        float32 array ``(H, W)`` in {0, 1}; it may be empty (noise never above the threshold).
    """
    if not 0 <= min_scale_exponent < max_scale_exponent:
        raise ValueError(
            f"need 0 <= min_scale_exponent < max_scale_exponent, got {min_scale_exponent}, {max_scale_exponent}"
        )
    rng = numpy_rng(generator)
    ky, kx = rng.integers(min_scale_exponent, max_scale_exponent, size=2)
    noise = perlin_noise(shape, (2**int(ky), 2**int(kx)), generator=rng)
    if rotate:
        angle = float(rng.uniform(-90.0, 90.0))
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="reflect")
    return (noise > threshold).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Texture sources
# --------------------------------------------------------------------------------------------


class TextureSource:
    """Where anomaly textures come from: ``sample(size, rng) -> PIL.Image`` (RGB, ``size = (W, H)``)."""

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description (part of cache keys)."""
        return {"type": type(self).__name__}


class TextureFolder(TextureSource):
    """Texture photos from a folder (searched recursively), e.g. the Describable Textures Dataset (DTD).

    A randomly chosen file is resized to the image size (as DRAEM does). Files are opened lazily.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: it holds no image files.
    """

    def __init__(self, root: Union[str, Path]):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"texture folder {str(root)!r} does not exist: pass a folder of texture images "
                                    "(e.g. DTD) or textures=None for the built-in procedural textures")
        files = walk_images([root]).images
        if not files:
            raise ValueError(f"texture folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                             "add texture photos or pass textures=None for the built-in procedural textures")
        self.root = root
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
        path = self.files[int(rng.integers(len(self.files)))]
        return read_image(path).resize(size, Image.BILINEAR)

    def describe(self) -> dict:
        digest = hashlib.sha256("\n".join(str(p.relative_to(self.root)) for p in self.files).encode()).hexdigest()
        return {"type": "TextureFolder", "root": str(self.root.resolve()), "num_files": len(self.files),
                "files_sha256": digest[:16]}


class ProceduralTextures(TextureSource):
    """Built-in textures, no download: colourful fractal Perlin noise, stripes, checkerboards and blobs."""

    KINDS = ("fractal", "stripes", "checker", "blobs")

    def sample(self, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
        w, h = size
        kind = self.KINDS[int(rng.integers(len(self.KINDS)))]
        colours = rng.uniform(0, 255, size=(2, 3))
        if kind == "fractal":
            t = sum(perlin_noise((h, w), (2**o, 2**o), generator=rng) / 2**o for o in range(1, 6))
            t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
            rgb = np.stack([(t * rng.uniform(0.5, 1.5) + rng.uniform(-0.3, 0.3)) % 1.0 for _ in range(3)], -1) * 255
            return Image.fromarray(rgb.astype(np.uint8))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        if kind == "stripes":
            angle, period = rng.uniform(0, math.pi), rng.uniform(3, max(4.0, min(h, w) / 4))
            t = 0.5 + 0.5 * np.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period)
        elif kind == "checker":
            cell = int(rng.integers(2, max(3, min(h, w) // 6)))
            t = ((yy // cell + xx // cell) % 2).astype(np.float32)
        else:  # blobs
            t = (perlin_noise((h, w), (int(rng.integers(2, 9)),) * 2, generator=rng) > 0).astype(np.float32)
        rgb = colours[0] * (1 - t[..., None]) + colours[1] * t[..., None]
        return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def _texture_folder(root: str) -> TextureFolder:
    return TextureFolder(root)


def _as_texture_source(textures: Union[None, str, Path, TextureSource]) -> TextureSource:
    if textures is None:
        return ProceduralTextures()
    if isinstance(textures, TextureSource):
        return textures
    if isinstance(textures, (str, Path)):
        return _texture_folder(str(Path(textures).expanduser().resolve()))
    raise ValueError(f"textures must be None, a folder path or a TextureSource, got {type(textures).__name__}")


# --------------------------------------------------------------------------------------------
# Augmentations (PIL): each takes (image, rng) and draws its own strength
# --------------------------------------------------------------------------------------------

AUGMENTATIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "posterize": lambda im, rng: ImageOps.posterize(im, int(rng.integers(2, 7))),  # keep 2..6 bits
    "sharpness": lambda im, rng: ImageEnhance.Sharpness(im).enhance(float(rng.uniform(0.0, 2.0))),
    "solarize": lambda im, rng: ImageOps.solarize(im, int(rng.integers(32, 129))),  # DRAEM: threshold 32..128
    "equalize": lambda im, rng: ImageOps.equalize(im),
    "brightness": lambda im, rng: ImageEnhance.Brightness(im).enhance(float(rng.uniform(0.5, 1.5))),
    "color": lambda im, rng: ImageEnhance.Color(im).enhance(float(rng.uniform(0.0, 2.0))),
    "autocontrast": lambda im, rng: ImageOps.autocontrast(im, cutoff=float(rng.uniform(0.0, 5.0))),
}


# --------------------------------------------------------------------------------------------
# The synthesiser
# --------------------------------------------------------------------------------------------


class AnomalySynthesizer:
    """Makes DRAEM synthetic anomalies; holds the texture source and the settings.

    Args:
        textures: None (built-in procedural textures), a folder of texture images, or a
            :class:`TextureSource`.
        normal_probability: share of samples returned unchanged with an empty mask (DRAEM: 0.5).
        beta_range: opacity ``beta ~ U[low, high]`` of the texture (0.1, 1.0).
        num_augmentations: augmentations drawn without replacement per texture (3).
        threshold, min_scale_exponent, max_scale_exponent, rotate: see :func:`perlin_mask`.
        max_mask_tries: an anomalous sample redraws its Perlin mask while it is empty, up to
            this many times (so the share of empty masks stays ``normal_probability``).

    Example::

        synth = AnomalySynthesizer("/data/dtd/images")
        anomalous, mask = synth(image, generator=torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        textures: Union[None, str, Path, TextureSource] = None,
        *,
        normal_probability: float = 0.5,
        beta_range: tuple[float, float] = (0.1, 1.0),
        num_augmentations: int = 3,
        threshold: float = 0.5,
        min_scale_exponent: int = 0,
        max_scale_exponent: int = 6,
        rotate: bool = True,
        augmentations: Sequence[str] = tuple(AUGMENTATIONS),
        max_mask_tries: int = 20,
    ):
        if not 0.0 <= normal_probability <= 1.0:
            raise ValueError(f"normal_probability must be in [0, 1], got {normal_probability}")
        if not 0.0 <= beta_range[0] <= beta_range[1] <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= low <= high <= 1, got {beta_range}")
        unknown = [a for a in augmentations if a not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"unknown augmentations {unknown}; choose from {sorted(AUGMENTATIONS)}")
        if not 0 <= num_augmentations <= len(augmentations):
            raise ValueError(f"num_augmentations must be in [0, {len(augmentations)}], got {num_augmentations}")
        self.textures = _as_texture_source(textures)
        self.normal_probability = float(normal_probability)
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.num_augmentations = int(num_augmentations)
        self.threshold = float(threshold)
        self.min_scale_exponent = int(min_scale_exponent)
        self.max_scale_exponent = int(max_scale_exponent)
        self.rotate = bool(rotate)
        self.augmentations = tuple(augmentations)
        self.max_mask_tries = int(max_mask_tries)

    @property
    def config(self) -> dict:
        """JSON-able settings (use them in cache keys of precomputed training sets)."""
        return {
            "textures": self.textures.describe(),
            "normal_probability": self.normal_probability,
            "beta_range": list(self.beta_range),
            "num_augmentations": self.num_augmentations,
            "threshold": self.threshold,
            "min_scale_exponent": self.min_scale_exponent,
            "max_scale_exponent": self.max_scale_exponent,
            "rotate": self.rotate,
            "augmentations": list(self.augmentations),
            "max_mask_tries": self.max_mask_tries,
        }

    def texture(self, size: tuple[int, int], rng: np.random.Generator) -> torch.Tensor:
        """An augmented texture ``(3, H, W)`` float32 in [-1, 1] for ``size = (H, W)``."""
        h, w = size
        im = self.textures.sample((w, h), rng)
        for i in rng.choice(len(self.augmentations), size=self.num_augmentations, replace=False):
            im = AUGMENTATIONS[self.augmentations[int(i)]](im, rng)
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def __call__(self, image: torch.Tensor, *, generator: GeneratorLike = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Make one synthetic anomaly.

        Args:
            image: float tensor ``(3, H, W)`` in [-1, 1].
            generator: torch.Generator / int seed; the same seed gives the same sample.

        Returns:
            ``(anomalous_image, mask)``: ``(3, H, W)`` in [-1, 1], same dtype and device as
            ``image``, and ``(1, H, W)`` float in {0, 1}. Pixels where the mask is 0 are
            returned unchanged (bit for bit); a normal sample has an all-zero mask.
        """
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image must be a float tensor (3, H, W) in [-1, 1], got {shape}")
        if not image.is_floating_point():
            raise ValueError(f"image must be a float tensor in [-1, 1], got dtype {image.dtype}")
        rng = numpy_rng(generator)
        _, h, w = image.shape
        if rng.random() < self.normal_probability:
            return image.clone(), torch.zeros((1, h, w), dtype=image.dtype, device=image.device)

        mask_np = np.zeros((h, w), np.float32)
        for _ in range(self.max_mask_tries):
            mask_np = perlin_mask((h, w), generator=rng, min_scale_exponent=self.min_scale_exponent,
                                  max_scale_exponent=self.max_scale_exponent, threshold=self.threshold,
                                  rotate=self.rotate)
            if mask_np.any():
                break
        texture = self.texture((h, w), rng).to(device=image.device, dtype=image.dtype)
        beta = float(rng.uniform(*self.beta_range))
        mask = torch.from_numpy(mask_np)[None].to(device=image.device, dtype=image.dtype)
        blended = (1 - mask) * image + (1 - beta) * (mask * image) + beta * (mask * texture)
        # Outside the mask the formula already gives `image`; torch.where makes that bit-exact.
        anomalous = torch.where(mask.bool(), blended.clamp(-1.0, 1.0), image)
        return anomalous, mask


def make_anomaly(
    image: torch.Tensor,
    *,
    textures: Union[None, str, Path, TextureSource] = None,
    generator: GeneratorLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM synthetic anomaly with the default settings (see :class:`AnomalySynthesizer`).

    Args:
        image: float tensor ``(3, H, W)`` in [-1, 1].
        textures: None (built-in procedural textures), a folder of texture images (searched
            recursively; cached per folder), or a :class:`TextureSource`.
        generator: torch.Generator / int seed.

    Returns:
        ``(anomalous_image (3, H, W) in [-1, 1], mask (1, H, W) in {0, 1})``; half the samples
        stay normal with an empty mask.
    """
    return AnomalySynthesizer(textures)(image, generator=generator)
