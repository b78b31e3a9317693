"""diffad.defects: realistic synthetic defects (scratch, crack, pit, stain, DRAEM blob) for validation sets."""

from __future__ import annotations

import pytest
import torch

from diffad.defects import DEFECT_KINDS, DefectSynthesizer


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_kind_marks_a_defect_and_leaves_the_rest_untouched(kind):
    image = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0)) * 2 - 1
    synth = DefectSynthesizer()
    out, mask = synth(image, kind=kind, generator=7)
    again, mask_again = synth(image, kind=kind, generator=7)
    assert out.shape == image.shape and mask.shape == (1, 128, 128)
    assert torch.equal(out, again) and torch.equal(mask, mask_again)  # seeded
    assert mask.sum() > 0 and out.min() >= -1 and out.max() <= 1
    assert (out != image).any(dim=0)[mask[0] > 0].any()  # the mark is visible where the mask is
    if kind != "blob":  # strokes, pits and stains touch nothing outside their soft footprint
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
