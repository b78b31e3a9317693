# Overlapping tiles (diffad, community-pipeline format): ships beside pipeline.py in every Hub repo; torch and numpy.
"""The networks run on ``(C, R, R)`` tiles of ``(C, S, S)`` images: where the tiles lie (:func:`tile_origins`), how
they blend back (:func:`tile_window`, :func:`merge_tiles`), how each is seeded (:func:`tile_generators`) and batched
(:func:`tile_batches`). One tile per image (``S = R``) is the untiled arithmetic, exactly."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

TILE_BATCH = 32  # at most this many tiles go through a network at once (bounded memory at any resolution)


def tile_origins(size: int, tile: int) -> List[int]:
    """Top (or left) coordinates of the tiles that cover ``size`` pixels with ``tile``-pixel tiles overlapping by at
    least a quarter of a tile; the first starts at 0, the last ends at ``size`` (one tile when ``tile >= size``)."""
    if tile >= size:
        return [0]
    stride = max(1, tile - tile // 4)
    count = -(-(size - tile) // stride) + 1
    return [int(v) for v in np.linspace(0, size - tile, count).round().astype(int)]


def tile_window(tile: int, size: int) -> torch.Tensor:
    """The ``(tile, tile)`` blending weight of a tile: 1 in its middle half, falling linearly to ``1 / (tile / 4)``
    at its borders, so overlapping tiles fade into each other without a seam (one tile over the whole image: 1)."""
    if tile >= size:
        return torch.ones(tile, tile)
    ramp = max(1, tile // 4)
    edge = torch.minimum(torch.arange(tile) + 1, torch.arange(tile, 0, -1)).float().clamp(max=ramp) / ramp
    return edge[:, None] * edge[None, :]


def split_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """``(B, C, S, S)`` images as ``(B * n, C, tile, tile)`` overlapping tiles (:func:`tile_origins`), image-major."""
    origins = tile_origins(x.shape[-1], tile)
    tiles = [x[:, :, top:top + tile, left:left + tile] for top in origins for left in origins]
    return torch.stack(tiles, dim=1).flatten(0, 1)


def merge_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of :func:`split_tiles`: ``(B * n, C, t, t)`` tiles blended (:func:`tile_window`) into ``(B, C, S, S)``
    with ``S = size``; where one tile alone covers a pixel, its value is kept exactly."""
    tile = tiles.shape[-1]
    origins = tile_origins(size, tile)
    n = len(origins) ** 2
    tiles = tiles.unflatten(0, (tiles.shape[0] // n, n))
    window = tile_window(tile, size).to(tiles.device, tiles.dtype)
    out = torch.zeros(tiles.shape[0], tiles.shape[2], size, size, dtype=tiles.dtype, device=tiles.device)
    weight = torch.zeros(size, size, dtype=tiles.dtype, device=tiles.device)
    for k, (top, left) in enumerate((top, left) for top in origins for left in origins):
        out[:, :, top:top + tile, left:left + tile] += tiles[:, k] * window
        weight[top:top + tile, left:left + tile] += window
    return out / weight


def tile_generators(generators: List[torch.Generator], num_tiles: int) -> List[torch.Generator]:
    """One generator per tile, image-major: with one tile per image the images' own generators; else each image's
    generator seeds its tiles', so a tile's noise depends only on its image's generator and its place."""
    if num_tiles == 1:
        return list(generators)
    seeds = [torch.randint(0, 2**62, (num_tiles,), generator=g).tolist() for g in generators]
    return [torch.Generator().manual_seed(int(s)) for per_image in seeds for s in per_image]



def tile_batches(indices: Sequence[int], num_tiles: int) -> List[List[int]]:
    """Tile ``indices`` in network batches: all at once with one tile per image (the caller's ``batch_size``
    bounds the batch), else at most :data:`TILE_BATCH` tiles (bounded memory)."""
    size = max(len(indices), 1) if num_tiles == 1 else TILE_BATCH
    return [list(indices[i:i + size]) for i in range(0, len(indices), size)]
