"""The embedded default dataset: procedurally generated inspection images in MVTec AD layout.

``make_synthetic_dataset(root)`` writes a small dataset that needs no download, so that
``make demo`` and most tests run on a fresh machine. It has the folder layout of MVTec AD
(Bergmann et al., CVPR 2019) and is read by :func:`diffad.data.load_mvtec` like any real
category::

    root/<category>/train/good/000.png
    root/<category>/test/good/000.png
    root/<category>/test/<defect>/000.png
    root/<category>/ground_truth/<defect>/000_mask.png   (mode L, 0 or 255)

Two categories (:data:`SYNTHETIC_CATEGORIES`):

* ``weave`` (texture): a plain-weave fabric. Every image draws its own thread colour
  (any hue), brightness, thread count, thread thickness, weave angle (about +-11 degrees) and
  phase; every thread has its own brightness and width, plus illumination gradient and grain.
  Defects: ``hole`` (threads gone, the dark backing shows), ``scratch`` (a pulled thread lying
  across the weave), ``stain`` (a colour stain), ``missing_thread`` (a stretch of one thread
  is missing: a missing piece), ``misweave`` (a patch woven at the wrong angle and phase: a
  misplaced part).
* ``nut`` (object): a hexagon nut seen from above, centred with a little jitter, at any
  rotation, steel-to-brass colour, lit from a random direction, with concentric machining
  marks. Defects: ``scratch``, ``pit`` (a dark hole in the face), ``rust`` (a colour stain),
  ``chipped`` (a corner broken off: a missing piece), ``misplaced_hole`` (the threaded hole
  drilled off centre: a misplaced part).

The normals are statistically regular (a small diffusion model learns them) but vary
globally (colour, brightness, angle, phase, pose) much more than a defect changes an
image's global statistics, so trivial detectors (mean intensity, per-pixel distance to the
mean training image) stay far from AUROC 1.0, while the defects are clearly visible local
changes of structure. ``tests/test_synthetic.py`` checks both.

Ground truth is exact: a defect image is rendered from the same parameters as its
defect-free twin, the defect is composited into a region, and the mask is the set of pixels
of that region whose 8-bit value changed visibly (by at least 8 levels in some channel;
fainter changes, such as anti-aliased fringes, are not applied). So the mask is exactly the
set of changed pixels: every pixel outside it equals the defect-free rendering.

All randomness comes from ``numpy.random.Generator`` objects seeded from ``seed``, the
category name, the split and the image index, so an image does not change when the number
of other images does.
"""

from __future__ import annotations

import colorsys
import logging
import math
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_DEFECT_TYPES",
    "make_synthetic_dataset",
]

logger = logging.getLogger(__name__)

#: The categories :func:`make_synthetic_dataset` can write (texture first, then object).
SYNTHETIC_CATEGORIES: tuple[str, ...] = ("weave", "nut")

#: Defect types per category, in the order they are written.
SYNTHETIC_DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "weave": ("hole", "scratch", "stain", "missing_thread", "misweave"),
    "nut": ("scratch", "pit", "rust", "chipped", "misplaced_hole"),
}

# Smallest defect, as a fraction of the image area (about 12 pixels at 64 px); smaller draws are redrawn.
_MIN_DEFECT_AREA = 0.003
_MAX_DRAWS = 50
# A defect pixel changes by at least this many 8-bit levels in some channel; smaller changes are dropped.
_MIN_VISIBLE_CHANGE = 8
_SPLIT_IDS = {"train": 0, "test_good": 1, "test_defect": 2}

Params = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(u, v)`` in [-1, 1], each (R, R) float32; u grows to the right, v downwards."""
    c = ((np.arange(resolution, dtype=np.float32) + 0.5) / resolution) * 2.0 - 1.0
    v, u = np.meshgrid(c, c, indexing="ij")
    return u, v


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, resolution: int, cells: int) -> np.ndarray:
    """Low-frequency noise (R, R) in about [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled."""
    coarse = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1)).astype(np.float32)
    x = np.linspace(0, cells, resolution, dtype=np.float32)
    i = np.minimum(x.astype(int), cells - 1)
    f = x - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _blob(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, centre: np.ndarray, radius: float) -> np.ndarray:
    """An irregular filled blob (R, R) bool: a disc whose radius wobbles with 3 random harmonics."""
    du, dv = u - centre[0], v - centre[1]
    r = np.hypot(du, dv)
    ang = np.arctan2(dv, du)
    wobble = np.ones_like(r)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.05, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
    return r < radius * wobble


def _segment_distance(u: np.ndarray, v: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distance from every pixel to the segment p0-p1 (R, R) and the position along it in [0, 1]."""
    d = p1 - p0
    length2 = float(d @ d) + 1e-12
    s = np.clip(((u - p0[0]) * d[0] + (v - p0[1]) * d[1]) / length2, 0.0, 1.0)
    return np.hypot(u - (p0[0] + s * d[0]), v - (p0[1] + s * d[1])), s


def _random_segment(rng: np.random.Generator, centre_radius: float, length: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    angle = rng.uniform(0, 2 * np.pi)
    half = rng.uniform(*length) / 2
    r, a = centre_radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
    mid = np.array([r * np.cos(a), r * np.sin(a)], dtype=np.float32)
    step = half * np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)
    return mid - step, mid + step


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- weave (texture)


def _weave_params(rng: np.random.Generator, resolution: int) -> Params:
    hue = rng.uniform(0, 1)
    sat = rng.uniform(0.2, 0.6)
    val = rng.uniform(0.5, 0.85)
    return {
        "theta": rng.uniform(-0.2, 0.2),
        "threads": rng.uniform(9.0, 12.0),  # threads across the image width
        "phase": rng.uniform(0, 2, size=2),
        "thickness": rng.uniform(0.68, 0.84),  # fraction of a thread's pitch it covers
        "warp": _hsv(hue, sat, val),
        "weft": _hsv(hue + rng.uniform(-0.06, 0.06), sat * rng.uniform(0.8, 1.2), val * rng.uniform(0.82, 0.95)),
        "gap": _hsv(hue, sat * 0.6, val * rng.uniform(0.15, 0.3)),
        "thread_gain": rng.normal(0, 0.05, size=(2, 64)).astype(np.float32),
        "thread_width": rng.normal(0, 0.035, size=(2, 64)).astype(np.float32),
        "light": _smooth_noise(rng, resolution, 2) * rng.uniform(0.04, 0.12),
        "grain": rng.normal(0, 0.02, size=(resolution, resolution, 1)).astype(np.float32),
    }


def _render_weave(p: Params, u: np.ndarray, v: np.ndarray, *, theta: float | None = None,
                  phase: np.ndarray | None = None, drop: tuple[int, int, float, float] | None = None) -> np.ndarray:
    """Render a plain weave (R, R, 3) float32 in [0, 1].

    ``theta``/``phase`` override the image's own; ``drop = (axis, thread, lo, hi)`` removes thread
    number ``thread`` of the warp (axis 0) or weft (axis 1) between positions ``lo`` and ``hi`` along it.
    """
    resolution = u.shape[0]
    theta = p["theta"] if theta is None else theta
    phase = p["phase"] if phase is None else phase
    c, s = math.cos(theta), math.sin(theta)
    scale = p["threads"] / 2.0
    a = (u * c + v * s) * scale + phase[0]  # across the warp threads, in thread pitches
    b = (-u * s + v * c) * scale + phase[1]  # across the weft threads
    ia, ib = np.floor(a), np.floor(b)
    fa, fb = a - ia, b - ib
    ia_i, ib_i = ia.astype(np.int64), ib.astype(np.int64)
    pixels_per_pitch = resolution / p["threads"]

    half_a = (p["thickness"] + p["thread_width"][0][ia_i % 64]) / 2
    half_b = (p["thickness"] + p["thread_width"][1][ib_i % 64]) / 2
    cov_a = np.clip((half_a - np.abs(fa - 0.5)) * pixels_per_pitch + 0.5, 0, 1)  # anti-aliased coverage
    cov_b = np.clip((half_b - np.abs(fb - 0.5)) * pixels_per_pitch + 0.5, 0, 1)
    if drop is not None:
        axis, thread, lo, hi = drop
        if axis == 0:
            cov_a = np.where((ia_i == thread) & (b >= lo) & (b < hi), 0.0, cov_a)
        else:
            cov_b = np.where((ib_i == thread) & (a >= lo) & (a < hi), 0.0, cov_b)

    # Round threads: brighter along the middle, and bulging where they pass over the other thread.
    prof_a = np.sqrt(np.clip(1 - ((fa - 0.5) / half_a) ** 2, 0, 1))
    prof_b = np.sqrt(np.clip(1 - ((fb - 0.5) / half_b) ** 2, 0, 1))
    warp = p["warp"] * ((1 + p["thread_gain"][0][ia_i % 64]) * (0.55 + 0.45 * prof_a) * (0.8 + 0.2 * np.sin(np.pi * fb)))[..., None]
    weft = p["weft"] * ((1 + p["thread_gain"][1][ib_i % 64]) * (0.55 + 0.45 * prof_b) * (0.8 + 0.2 * np.sin(np.pi * fa)))[..., None]
    gap = np.broadcast_to(p["gap"], warp.shape)
    ca, cb = cov_a[..., None], cov_b[..., None]
    warp_on_top = ((ia_i + ib_i) % 2 == 0)[..., None]
    under_a = gap * (1 - cb) + weft * cb  # weft over the gap, then the warp on top
    under_b = gap * (1 - ca) + warp * ca
    img = np.where(warp_on_top, under_a * (1 - ca) + warp * ca, under_b * (1 - cb) + weft * cb)
    img = img * (1 + p["light"])[..., None] + p["grain"]
    return np.clip(img, 0, 1).astype(np.float32)


def _weave_defect(p: Params, u: np.ndarray, v: np.ndarray, normal: np.ndarray, defect: str,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(region (R, R) bool, replacement (R, R, 3) float32)`` for one weave defect."""
    centre = rng.uniform(-0.6, 0.6, size=2).astype(np.float32)
    if defect == "hole":
        region = _blob(u, v, rng, centre, rng.uniform(0.1, 0.16))
        dark = p["gap"] * rng.uniform(0.8, 1.1)
        return region, np.clip(dark + p["grain"], 0, 1) * np.ones_like(normal)
    if defect == "scratch":  # a pulled thread lying across the weave
        p0, p1 = _random_segment(rng, 0.5, (0.6, 1.0))
        dist, _ = _segment_distance(u, v, p0, p1)
        half = rng.uniform(0.045, 0.065)
        region = dist < half
        prof = np.sqrt(np.clip(1 - (dist / half) ** 2, 0, 1))[..., None]
        colour = p["warp"] * rng.uniform(1.0, 1.25)
        return region, np.clip(colour * (0.6 + 0.4 * prof) + p["grain"], 0, 1)
    if defect == "stain":
        region = _blob(u, v, rng, centre, rng.uniform(0.14, 0.22))
        hue, sat, val = colorsys.rgb_to_hsv(*p["warp"])
        stain = _hsv(hue + rng.uniform(0.25, 0.5), max(sat, 0.4) + 0.2, val * rng.uniform(0.35, 0.6))
        alpha = rng.uniform(0.5, 0.75)
        return region, np.clip(normal * (1 - alpha) + stain * alpha, 0, 1)
    if defect == "missing_thread":
        axis = int(rng.integers(2))
        scale = p["threads"] / 2.0
        c, s = math.cos(p["theta"]), math.sin(p["theta"])
        a0 = (centre[0] * c + centre[1] * s) * scale + p["phase"][0]
        b0 = (-centre[0] * s + centre[1] * c) * scale + p["phase"][1]
        length = rng.uniform(2.0, 4.0)
        if axis == 0:
            drop = (0, int(np.floor(a0)), b0 - length / 2, b0 + length / 2)
        else:
            drop = (1, int(np.floor(b0)), a0 - length / 2, a0 + length / 2)
        return np.ones_like(u, dtype=bool), _render_weave(p, u, v, drop=drop)
    if defect == "misweave":  # a patch woven at the wrong angle and phase
        half = rng.uniform(0.14, 0.22, size=2)
        rot = rng.uniform(0, np.pi)
        du, dv = u - centre[0], v - centre[1]
        region = (np.abs(du * np.cos(rot) + dv * np.sin(rot)) < half[0]) & (np.abs(-du * np.sin(rot) + dv * np.cos(rot)) < half[1])
        theta = p["theta"] + rng.choice([-1, 1]) * rng.uniform(0.35, 0.6)
        return region, _render_weave(p, u, v, theta=theta, phase=rng.uniform(0, 2, size=2))
    raise ValueError(f"unknown weave defect {defect!r}; expected one of {SYNTHETIC_DEFECT_TYPES['weave']}")


# --------------------------------------------------------------------------- nut (object)


def _nut_params(rng: np.random.Generator, resolution: int) -> Params:
    steel, brass = np.array([0.62, 0.63, 0.66], np.float32), np.array([0.80, 0.65, 0.36], np.float32)
    w = rng.uniform(0, 1)
    outer = rng.uniform(0.6, 0.68)
    return {
        "centre": rng.normal(0, 0.07, size=2).astype(np.float32),
        "rotation": rng.uniform(0, np.pi / 3),
        "outer": outer,  # circumradius of the hexagon
        "chamfer": outer * rng.uniform(0.9, 0.95),
        "hole": outer * rng.uniform(0.4, 0.47),
        "hole_offset": np.zeros(2, np.float32),
        "material": ((1 - w) * steel + w * brass) * rng.uniform(0.8, 1.15),
        "light_angle": rng.uniform(0, 2 * np.pi),
        "light": rng.uniform(0.15, 0.35),
        "rings": rng.uniform(25, 40),
        "ring_phase": rng.uniform(0, 2 * np.pi),
        "background": _hsv(rng.uniform(0.5, 0.7), rng.uniform(0.05, 0.25), rng.uniform(0.12, 0.32)),
        "bg_light": _smooth_noise(rng, resolution, 2) * rng.uniform(0.05, 0.2),
        "grain": rng.normal(0, 0.02, size=(resolution, resolution, 1)).astype(np.float32),
    }


def _nut_layers(p: Params, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render the nut: ``(image (R,R,3), background (R,R,3), body coverage (R,R), face (R,R) bool)``."""
    resolution = u.shape[0]
    px = 2.0 / resolution
    x, y = u - p["centre"][0], v - p["centre"][1]
    r = np.hypot(x, y)
    ang = np.arctan2(y, x) - p["rotation"]
    sector = np.mod(ang, np.pi / 3) - np.pi / 6  # angle to the normal of the nearest flat
    hex_dist = r * np.cos(sector)  # distance along that normal; vertices lie at rotation + k * 60 degrees
    inradius = p["outer"] * math.cos(math.pi / 6)
    body = np.clip((inradius - hex_dist) / px + 0.5, 0, 1)

    lx, ly = math.cos(p["light_angle"]), math.sin(p["light_angle"])
    mat = p["material"]
    face_shade = 0.8 + p["light"] * (x * lx + y * ly) + 0.04 * np.sin(r * p["rings"] + p["ring_phase"])
    face = mat * face_shade[..., None]
    vertex_angle = np.round(ang / (np.pi / 3)) * (np.pi / 3) + p["rotation"]  # nearest vertex: its chamfer facet
    facet = mat * (0.55 + 0.35 * np.cos(vertex_angle - p["light_angle"]))[..., None]
    on_face = np.clip((p["chamfer"] - r) / px + 0.5, 0, 1)[..., None]
    top = face * on_face + facet * (1 - on_face)

    hx, hy = x - p["hole_offset"][0], y - p["hole_offset"][1]
    hr = np.hypot(hx, hy)
    sink = p["hole"] * 1.15
    countersink = mat * (0.45 + 0.3 * np.clip((hr - p["hole"]) / (sink - p["hole"]), 0, 1)
                         + 0.2 * ((hx * lx + hy * ly) / (hr + 1e-6)))[..., None]
    inside = (0.08 + 0.05 * np.sin(hr * 90.0))[..., None] * mat / mat.mean()
    hole_cov = np.clip((p["hole"] - hr) / px + 0.5, 0, 1)[..., None]
    sink_cov = np.clip((sink - hr) / px + 0.5, 0, 1)[..., None]
    top = top * (1 - sink_cov) + (countersink * (1 - hole_cov) + inside * hole_cov) * sink_cov

    background = p["background"] * (1 + p["bg_light"])[..., None] + p["grain"]
    img = background * (1 - body[..., None]) + (top + p["grain"]) * body[..., None]
    face_region = (r < p["chamfer"] - px) & (hr > sink + px) & (body >= 1)
    return np.clip(img, 0, 1).astype(np.float32), np.clip(background, 0, 1).astype(np.float32), body, face_region


def _render_nut(p: Params, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return _nut_layers(p, u, v)[0]


def _point_on(region: np.ndarray, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(region)
    k = idx[rng.integers(len(idx))]
    return np.array([u.flat[k], v.flat[k]], dtype=np.float32)


def _nut_defect(p: Params, u: np.ndarray, v: np.ndarray, normal: np.ndarray, defect: str,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(region (R, R) bool, replacement (R, R, 3) float32)`` for one nut defect."""
    _, background, body, face = _nut_layers(p, u, v)
    if defect == "scratch":
        p0 = _point_on(face, u, v, rng)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 0.5)
        p1 = p0 + length * np.array([np.cos(angle), np.sin(angle)], dtype=np.float32)
        dist, _ = _segment_distance(u, v, p0, p1)
        region = (dist < rng.uniform(0.04, 0.055)) & face
        gain = rng.choice([rng.uniform(0.35, 0.55), rng.uniform(1.35, 1.6)])
        return region, np.clip(normal * gain, 0, 1)
    if defect == "pit":
        region = _blob(u, v, rng, _point_on(face, u, v, rng), rng.uniform(0.08, 0.11)) & face
        dark = p["material"] * rng.uniform(0.1, 0.2)
        return region, np.clip(dark + p["grain"], 0, 1) * np.ones_like(normal)
    if defect == "rust":
        region = _blob(u, v, rng, _point_on(body >= 1, u, v, rng), rng.uniform(0.12, 0.18)) & (body >= 1)
        rust = _hsv(rng.uniform(0.02, 0.08), rng.uniform(0.6, 0.85), rng.uniform(0.3, 0.5))
        alpha = rng.uniform(0.55, 0.8)
        return region, np.clip(normal * (1 - alpha) + rust * alpha + p["grain"] * 0.5, 0, 1)
    if defect == "chipped":  # a corner broken off
        k = int(rng.integers(6))
        direction = p["rotation"] + k * np.pi / 3
        x, y = u - p["centre"][0], v - p["centre"][1]
        along = x * math.cos(direction) + y * math.sin(direction)
        cut = p["outer"] * rng.uniform(0.55, 0.68)
        region = (along > cut) & (body > 0)
        return region, background
    if defect == "misplaced_hole":
        q = dict(p)
        angle = rng.uniform(0, 2 * np.pi)
        q["hole_offset"] = p["outer"] * rng.uniform(0.18, 0.26) * np.array([np.cos(angle), np.sin(angle)], np.float32)
        return np.ones_like(u, dtype=bool), _render_nut(q, u, v)
    raise ValueError(f"unknown nut defect {defect!r}; expected one of {SYNTHETIC_DEFECT_TYPES['nut']}")


_RENDERERS: dict[str, tuple[Callable[..., Params], Callable[..., np.ndarray], Callable[..., tuple[np.ndarray, np.ndarray]]]] = {
    "weave": (_weave_params, _render_weave, _weave_defect),
    "nut": (_nut_params, _render_nut, _nut_defect),
}


# --------------------------------------------------------------------------- public API


def _check_category(category: str) -> None:
    if category not in _RENDERERS:
        raise ValueError(f"unknown synthetic category {category!r}; expected one of {list(SYNTHETIC_CATEGORIES)}")


def _render_pair(category: str, defect_type: str | None, resolution: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``(normal (R,R,3) uint8, image (R,R,3) uint8, mask (R,R) bool)``; image is normal when ``defect_type`` is None."""
    _check_category(category)
    sample_params, render, make_defect = _RENDERERS[category]
    u, v = _grid(resolution)
    params = sample_params(rng, resolution)
    normal_f = render(params, u, v)
    normal = _to_uint8(normal_f)
    if defect_type is None:
        return normal, normal.copy(), np.zeros((resolution, resolution), dtype=bool)
    if defect_type not in SYNTHETIC_DEFECT_TYPES[category]:
        raise ValueError(f"unknown defect type {defect_type!r} for {category!r}; expected one of {SYNTHETIC_DEFECT_TYPES[category]}")
    min_area = max(4, int(_MIN_DEFECT_AREA * resolution * resolution))
    for _ in range(_MAX_DRAWS):
        region, replacement = make_defect(params, u, v, normal_f, defect_type, rng)
        candidate = _to_uint8(replacement)
        change = np.abs(candidate.astype(np.int16) - normal.astype(np.int16)).max(axis=-1)
        mask = region & (change >= _MIN_VISIBLE_CHANGE)  # invisible changes (anti-aliased fringes) are not kept
        if mask.sum() >= min_area:
            return normal, np.where(mask[..., None], candidate, normal), mask
    raise RuntimeError(f"could not draw a {defect_type!r} defect of at least {min_area} pixels in {_MAX_DRAWS} tries")


def _image_rng(seed: int, category: str, split: str, index: int, defect: str = "") -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(category.encode()), _SPLIT_IDS[split], zlib.crc32(defect.encode()), index])


_README = """\
diffad synthetic inspection dataset (the embedded default)
===========================================================

Written by diffad.make_synthetic_dataset(seed={seed}, resolution={resolution}). Procedurally
generated, no real photographs: free to use and share. MVTec AD folder layout:

  <category>/train/good/NNN.png                 defect-free images for training
  <category>/test/good/NNN.png                  defect-free test images
  <category>/test/<defect>/NNN.png              defective test images
  <category>/ground_truth/<defect>/NNN_mask.png masks, 255 exactly where the defect changed a pixel

Images are {resolution}x{resolution} RGB PNGs. Categories and counts:

{counts}
weave: a plain-weave fabric of random colour, thread count, angle and phase (texture).
nut: a hexagon nut at any rotation, steel to brass, lit from a random direction (object).
Load it with: diffad.load_mvtec("{root}", "<category>").
"""


def make_synthetic_dataset(root: str | Path, *, seed: int = 0, resolution: int = 128, num_train: int = 120,
                           num_test_good: int = 20, num_test_defect_per_type: int = 8,
                           categories: Sequence[str] | None = None) -> Path:
    """Write the synthetic dataset in MVTec AD layout under ``root`` and return ``root``.

    Args:
        root: output folder (created if missing). Existing files of the same names are overwritten.
        seed: seed of every image; the same arguments give byte-identical files.
        resolution: side of the square images in pixels (>= 32).
        num_train: defect-free images per category in ``train/good`` (>= 2: the loader holds out a validation part).
        num_test_good: defect-free images per category in ``test/good``.
        num_test_defect_per_type: images per defect type in ``test/<defect>``, each with its mask.
        categories: subset of :data:`SYNTHETIC_CATEGORIES`; all of them when None.

    Returns:
        ``Path(root)``; ``diffad.load_mvtec(root, category)`` reads it.
    """
    categories = list(SYNTHETIC_CATEGORIES) if categories is None else list(categories)
    for category in categories:
        _check_category(category)
    if resolution < 32:
        raise ValueError(f"resolution={resolution} is too small; use at least 32 pixels")
    if num_train < 2:
        raise ValueError(f"num_train={num_train} must be at least 2 (the loader holds out a validation split)")
    if num_test_good < 0 or num_test_defect_per_type < 0:
        raise ValueError(f"num_test_good={num_test_good} and num_test_defect_per_type={num_test_defect_per_type} must be >= 0")
    root = Path(root)
    counts = []
    for category in categories:
        base = root / category
        jobs: list[tuple[str, str, int]] = [("train", "good", i) for i in range(num_train)]
        jobs += [("test_good", "good", i) for i in range(num_test_good)]
        jobs += [("test_defect", d, i) for d in SYNTHETIC_DEFECT_TYPES[category] for i in range(num_test_defect_per_type)]
        for split, kind, index in jobs:
            rng = _image_rng(seed, category, split, index, "" if kind == "good" else kind)
            _, image, mask = _render_pair(category, None if kind == "good" else kind, resolution, rng)
            folder = base / ("train" if split == "train" else "test") / kind
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image, mode="RGB").save(folder / f"{index:03d}.png", compress_level=1)
            if kind != "good":
                gt = base / "ground_truth" / kind
                gt.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(gt / f"{index:03d}_mask.png", compress_level=1)
        defects = ", ".join(f"{d} {num_test_defect_per_type}" for d in SYNTHETIC_DEFECT_TYPES[category])
        counts.append(f"  {category}: train/good {num_train}, test/good {num_test_good}, {defects}")
        logger.info("wrote synthetic category %r to %s", category, base)
    (root / "README.txt").write_text(_README.format(seed=seed, resolution=resolution, counts="\n".join(counts), root=root))
    return root
