"""DRAEM synthetic anomalies: blending formula, mask statistics, determinism, texture sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from diffad.anomalies import (
    AnomalySynthesizer,
    ProceduralTextures,
    TextureFolder,
    make_anomaly,
    perlin_mask,
    perlin_noise,
)

TEXTURES = Path(__file__).resolve().parents[2] / "shared" / "data" / "textures"


def _image(seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class _ConstantTexture(ProceduralTextures):
    """A known texture: every pixel the same colour (augmentations keep it uniform)."""

    def sample(self, size, rng):
        from PIL import Image

        return Image.new("RGB", size, (200, 40, 90))


def test_perlin_noise_shape_range_and_smoothness():
    noise = perlin_noise((64, 48), (4, 2), generator=0)
    assert noise.shape == (64, 48) and noise.dtype == np.float32
    assert -1.5 < noise.min() < 0 < noise.max() < 1.5
    # a gradient noise is smooth: neighbouring pixels differ far less than the range
    assert np.abs(np.diff(noise, axis=0)).max() < 0.25
    # it is zero on the lattice points (every 16 rows, every 24 columns)
    assert np.allclose(noise[::16, ::24], 0.0, atol=1e-6)


def test_perlin_mask_binary_and_seeded():
    a = perlin_mask((32, 32), generator=torch.Generator().manual_seed(3))
    b = perlin_mask((32, 32), generator=torch.Generator().manual_seed(3))
    c = perlin_mask((32, 32), generator=torch.Generator().manual_seed(4))
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_blending_formula_recomputed_independently():
    image = _image(1)
    synth = AnomalySynthesizer(normal_probability=0.0)
    anomalous, mask = synth(image, generator=torch.Generator().manual_seed(7))
    assert mask.sum() > 0
    # Replay the same draws to get the texture and beta, then apply the formula by hand.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(7))))
    rng.random()  # the normal/anomalous coin
    h, w = image.shape[1:]
    m = perlin_mask((h, w), generator=rng)
    assert np.array_equal(m, mask[0].numpy())
    texture = synth.texture((h, w), rng)
    beta = rng.uniform(0.1, 1.0)
    expected = (1 - m) * image.numpy() + (1 - beta) * (m * image.numpy()) + beta * (m * texture.numpy())
    np.testing.assert_allclose(anomalous.numpy(), expected, atol=1e-6)


def test_blend_with_constant_texture_and_known_beta():
    image = _image(2)
    synth = AnomalySynthesizer(_ConstantTexture(), normal_probability=0.0, beta_range=(0.4, 0.4),
                               num_augmentations=0)
    anomalous, mask = synth(image, generator=11)
    colour = torch.tensor([200, 40, 90], dtype=torch.float32)[:, None, None] / 127.5 - 1
    inside = mask[0].bool()
    expected = 0.6 * image + 0.4 * colour
    torch.testing.assert_close(anomalous[:, inside], expected[:, inside], atol=1e-6, rtol=0)


def test_outside_mask_bit_exact_and_range():
    for seed in range(10):
        image = _image(seed)
        anomalous, mask = make_anomaly(image, generator=seed)
        assert anomalous.shape == image.shape and mask.shape == (1, *image.shape[1:])
        outside = mask[0] == 0
        assert torch.equal(anomalous[:, outside], image[:, outside])
        assert anomalous.min() >= -1 and anomalous.max() <= 1
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_seed_determinism():
    image = _image(3)
    a1, m1 = make_anomaly(image, generator=torch.Generator().manual_seed(5))
    a2, m2 = make_anomaly(image, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    differ = [not torch.equal(make_anomaly(image, generator=s)[1], m1) for s in range(6, 12)]
    assert any(differ)


def test_mask_coverage_statistics():
    image = _image(4, size=32)
    synth = AnomalySynthesizer(normal_probability=0.5)
    generator = torch.Generator().manual_seed(0)
    masks = [synth(image, generator=generator)[1] for _ in range(300)]
    empty = np.mean([float(m.sum() == 0) for m in masks])
    assert abs(empty - 0.5) < 0.1  # binomial std 0.03
    cover = np.array([m.mean().item() for m in masks if m.sum() > 0])
    # DRAEM masks: blobs and streaks covering a few percent of the image, never all of it
    assert 0.01 < cover.mean() < 0.3
    assert cover.max() < 0.8
    # a normal sample is the untouched image
    assert all(torch.equal(a, image) for a, m in (synth(image, generator=s) for s in range(20)) if m.sum() == 0)


def test_normal_probability_extremes():
    image = _image(5, size=32)
    always = AnomalySynthesizer(normal_probability=1.0)
    never = AnomalySynthesizer(normal_probability=0.0)
    assert all(always(image, generator=s)[1].sum() == 0 for s in range(10))
    assert all(never(image, generator=s)[1].sum() > 0 for s in range(10))


def test_texture_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TextureFolder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no images"):
        make_anomaly(_image(), textures=tmp_path / "empty", generator=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        make_anomaly(torch.zeros(1, 8, 8), generator=0)


def test_texture_folder_real_dtd():
    if not TEXTURES.is_dir():
        pytest.skip(f"DTD texture subset not found at {TEXTURES}")
    folder = TextureFolder(TEXTURES)
    assert len(folder) == 80  # 10 classes x 8, found recursively
    synth = AnomalySynthesizer(folder, normal_probability=0.0)
    anomalous, mask = synth(_image(6, size=64), generator=0)
    assert mask.sum() > 0 and not torch.equal(anomalous, _image(6, size=64))
    assert synth.config["textures"]["num_files"] == 80
