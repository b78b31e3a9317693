"""diffad.defects: realistic synthetic defects (scratch, crack, pit, stain, DRAEM blob) for validation sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffad.defects import ALL_DEFECT_KINDS, DEFECT_KINDS, DefectSynthesizer


@pytest.mark.parametrize("kind", ALL_DEFECT_KINDS)
def test_each_kind_marks_a_defect_and_leaves_the_rest_untouched(kind):
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    synth = DefectSynthesizer(ALL_DEFECT_KINDS)
    out, mask = synth(image, kind=kind, generator=7)
    again, mask_again = synth(image, kind=kind, generator=7)
    assert out.shape == image.shape and mask.shape == (1, 128, 128)
    assert torch.equal(out, again) and torch.equal(mask, mask_again)  # seeded
    assert mask.sum() > 0 and out.min() >= -1 and out.max() <= 1
    assert (out != image).any(dim=0)[mask[0] > 0].any()  # the mark is visible where the mask is
    if kind not in ("blob", "displace"):  # strokes, pits and stains touch nothing outside their soft footprint
        assert mask.mean() < 0.25


def test_scratches_are_thin():
    image = torch.zeros(3, 256, 256)
    _, mask = DefectSynthesizer(["scratch"])(image, generator=3)
    # a thin line: its area is small next to its extent
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    extent = max(int(rows.max() - rows.min()), int(cols.max() - cols.min())) + 1
    assert mask.sum() <= 5 * extent


def test_bad_kinds_and_images_are_one_line_errors():
    with pytest.raises(ValueError, match="kinds must be a non-empty selection of"):
        DefectSynthesizer(["dent"])
    with pytest.raises(ValueError, match="kind must be one of"):
        DefectSynthesizer(["pit"])(torch.zeros(3, 32, 32), kind="scratch")
    with pytest.raises(ValueError, match=r"image must be a float tensor \(3, H, W\)"):
        DefectSynthesizer()(torch.zeros(32, 32))


def test_displace_pastes_a_piece_of_the_part_elsewhere():
    """Every pixel of a displaced patch is a pixel of the same image (only the place is wrong), the default set
    leaves it out (the head trains on the default set) and a smooth image gives a mask only where content moved."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    image = torch.stack([yy, xx, yy * xx])  # every pixel distinct
    out, mask = DefectSynthesizer(["displace"])(image, generator=5)
    changed = (out != image).any(dim=0)
    assert changed.any() and torch.equal(changed, mask[0] > 0)  # the mask is exactly what moved
    rows, cols = torch.nonzero(changed, as_tuple=True)
    pixels = {tuple(v) for v in image.flatten(1).T.tolist()}
    assert all(tuple(out[:, r, c].tolist()) in pixels for r, c in zip(rows[:200].tolist(), cols[:200].tolist()))
    assert "displace" not in DEFECT_KINDS
    with pytest.raises(ValueError, match="kind must be one of"):
        DefectSynthesizer()(image, kind="displace")


def test_validation_sizes_span_small_to_large_defects_and_the_default_sizes_are_unchanged():
    """scale_range=VALIDATION_SCALE_RANGE draws each kind at sizes up to 8x (a stain grown): a validation set of
    small defects alone ranked the map filter sizes against the test split's order. The default range draws
    exactly the samples it drew before (no extra random draw)."""
    from diffad.defects import VALIDATION_SCALE_RANGE

    image = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for kind in ("scratch", "crack", "pit", "stain"):
        small = [float(DefectSynthesizer([kind])(image, generator=s)[1].sum()) for s in range(12)]
        broad = [float(DefectSynthesizer([kind], scale_range=VALIDATION_SCALE_RANGE)(image, generator=s)[1].sum())
                 for s in range(12)]
        assert np.mean(broad) > 2 * np.mean(small) and max(broad) > 3 * np.median(small), kind
        same = DefectSynthesizer([kind], scale_range=(1.0, 1.0))(image, generator=3)
        assert torch.equal(same[0], DefectSynthesizer([kind])(image, generator=3)[0])
    assert "scale_range" in DefectSynthesizer(scale_range=(1.0, 8.0)).config
    assert "scale_range" not in DefectSynthesizer().config  # the head's cache keys of before still hold
    with pytest.raises(ValueError, match="scale_range must be"):
        DefectSynthesizer(scale_range=(2.0, 1.0))
