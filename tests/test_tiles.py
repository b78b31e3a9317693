"""The working resolution: images inspected at S x S in overlapping tiles of the UNet's size, stitched seam-free."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_components import CHEAP_CONFIG, tiny_unet

from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
from diffad.pipelines.self_aware_inpaint.tiles import merge_tiles, split_tiles, tile_origins, tile_window
from diffad.training.train_ddpm import random_crops


def tiled_pipeline(working_resolution: int = 80) -> SelfAwareInpaintPipeline:
    pipe = SelfAwareInpaintPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(1000, beta_schedule="sigmoid"),
                                    working_resolution=working_resolution)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tiles_cover_the_image_with_a_quarter_overlap():
    assert tile_origins(32, 32) == [0] and tile_origins(256, 64) == [0, 48, 96, 144, 192]
    for size, tile in ((80, 32), (100, 32), (2048, 64)):
        origins = tile_origins(size, tile)
        assert origins[0] == 0 and origins[-1] == size - tile
        assert all(0 < b - a <= tile - tile // 4 for a, b in zip(origins, origins[1:]))


@pytest.mark.parametrize("size, tile", [(32, 32), (80, 32), (100, 32)])
def test_merge_inverts_split(size, tile):
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    tiles = split_tiles(x, tile)
    assert tiles.shape == (2 * len(tile_origins(size, tile)) ** 2, 3, tile, tile)
    assert torch.allclose(merge_tiles(tiles, size), x, atol=1e-6)


def test_blend_has_no_seam():
    """Tiles that disagree (each a different constant) blend with steps of at most 1 / ramp of their difference."""
    size, tile = 80, 32
    n = len(tile_origins(size, tile)) ** 2
    tiles = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, tile, tile)
    merged = merge_tiles(tiles, size)[0, 0]
    jump = max(merged.diff(dim=0).abs().max(), merged.diff(dim=1).abs().max())
    spread = float(n - 1)
    assert jump <= spread / (tile // 4) + 1e-5
    assert tile_window(tile, size).min() > 0 and tile_window(32, 32).eq(1).all()


def test_a_tiled_pipeline_inspects_at_its_working_resolution_per_image():
    pipe = tiled_pipeline(80)
    assert (pipe.resolution, pipe.tile_size, pipe.num_tiles) == (80, 32, 9)
    images = torch.rand(5, 3, 120, 120, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pipe.calibrate(images, config=CHEAP_CONFIG, generator=torch.Generator().manual_seed(0))
    assert pipe.calibration.q_threshold.shape == (80, 80) and pipe.calibration.config.tile_size == 32
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    out = pipe(images[:2], generator=gens)
    assert all(m.shape == (2, 80, 80) for m in out.anomaly_maps.values())
    assert out.reconstructions.shape == (2, 80, 80, 3)
    # every tile of every image costs the sampler's passes
    assert out.unet_passes.tolist() == [CHEAP_CONFIG.unet_passes("self_aware") * 9] * 2
    # an image's result depends on its generator only, never on its batch
    alone = pipe(images[1:2], generator=[torch.Generator().manual_seed(4)])
    assert alone.scores["combined"][0] == pytest.approx(out.scores["combined"][1], rel=1e-5)


def test_the_tile_layout_is_part_of_the_calibration(tmp_path):
    pipe = tiled_pipeline(80)
    pipe.calibrate(torch.rand(4, 3, 80, 80) * 2 - 1, config=CHEAP_CONFIG)
    pipe.save_pretrained(tmp_path / "m")
    loaded = SelfAwareInpaintPipeline.from_pretrained(tmp_path / "m")
    assert (loaded.resolution, loaded.tile_size) == (80, 32)
    other = SelfAwareInpaintPipeline(unet=loaded.unet, scheduler=loaded.scheduler, calibration=loaded.calibration,
                                     working_resolution=96)
    with pytest.raises(ValueError, match="calibration was made at 80 px in 32 px tiles but the model inspects at "
                                         "96 px in 32 px tiles: recalibrate"):
        other(torch.zeros(1, 3, 96, 96))


def test_working_resolution_below_the_tile_is_refused():
    with pytest.raises(ValueError, match="working_resolution must be an int >= the UNet's sample_size 32"):
        tiled_pipeline(16)


def test_random_crops_are_seeded_and_inside_the_image():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    a = random_crops(images, 8, torch.Generator().manual_seed(0))
    b = random_crops(images, 8, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, b)
    for crop, image in zip(a, images):  # each crop is a contiguous window of its own image
        top, left = divmod(int(crop[0, 0, 0] - image[0, 0, 0]), 16)
        assert torch.equal(crop, image[:, top:top + 8, left:left + 8])
    assert random_crops(images, 16, torch.Generator()) is images


def test_detect_and_export_work_at_the_working_resolution(tmp_path):
    """`diffad detect` scores a tiled model's photos as the pipeline does; `diffad export` converts its tile-size
    networks, and the exported folder scores the photo as torch does."""
    import csv

    import numpy as np
    from PIL import Image

    from diffad.cli import main
    from diffad.detect import format_score, load_pipeline
    from diffad.pipelines.self_aware_inpaint import image_generator

    pipe = tiled_pipeline(48)
    pipe.calibrate(torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1, config=CHEAP_CONFIG)
    pipe.save_pretrained(tmp_path / "model")
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 90, 3), dtype=np.uint8))
    (tmp_path / "photos").mkdir()
    photo.save(tmp_path / "photos" / "a.png")
    expected = load_pipeline(tmp_path / "model")(photo, generator=[image_generator(0, photo)], batch_size=1)
    assert expected.anomaly_maps["combined"].shape == (1, 48, 48)
    assert main(["detect", "--model", str(tmp_path / "model"), str(tmp_path / "photos"), "--out",
                 str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "results.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    assert row["score"] == format_score(expected.scores["combined"][0])
    assert Image.open(tmp_path / "out" / row["overlay"]).size == photo.size
    assert main(["export", "--model", str(tmp_path / "model"), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")]) == 0
    exported = load_pipeline(tmp_path / "onnx")(photo, generator=[image_generator(0, photo)], batch_size=1)
    assert exported.scores["combined"][0] == pytest.approx(expected.scores["combined"][0], rel=1e-3)
