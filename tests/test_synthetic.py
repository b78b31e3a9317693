"""diffad.synthetic: the embedded default dataset (layout, determinism, exact masks, hardness)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from diffad import make_synthetic_dataset
from diffad.synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFECT_TYPES, _image_rng, _render_pair


def test_categories_cover_a_texture_and_an_object():
    assert SYNTHETIC_CATEGORIES == ("weave", "nut")
    for category in SYNTHETIC_CATEGORIES:
        assert len(SYNTHETIC_DEFECT_TYPES[category]) == 5


def test_layout_on_disk(synthetic_root):
    assert (synthetic_root / "README.txt").read_text().startswith("diffad synthetic inspection dataset")
    for category in SYNTHETIC_CATEGORIES:
        base = synthetic_root / category
        assert len(list((base / "train" / "good").glob("*.png"))) == 40
        assert len(list((base / "test" / "good").glob("*.png"))) == 10
        for defect in SYNTHETIC_DEFECT_TYPES[category]:
            images = sorted(p.name for p in (base / "test" / defect).glob("*.png"))
            masks = sorted(p.name for p in (base / "ground_truth" / defect).glob("*.png"))
            assert images == [f"{i:03d}.png" for i in range(4)]
            assert masks == [f"{i:03d}_mask.png" for i in range(4)]
            for name in masks:
                mask = Image.open(base / "ground_truth" / defect / name)
                assert mask.mode == "L" and mask.size == (64, 64)
                assert set(np.unique(np.asarray(mask))) == {0, 255}
        image = Image.open(base / "train" / "good" / "000.png")
        assert image.mode == "RGB" and image.size == (64, 64)


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kwargs = dict(resolution=32, num_train=2, num_test_good=1, num_test_defect_per_type=1)
    a = make_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)
    b = make_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)
    c = make_synthetic_dataset(tmp_path / "c", seed=4, categories=["nut"], **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 * (2 + 1 + 5 * 2)
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert sorted(p.name for p in c.iterdir()) == ["README.txt", "nut"]
    assert (a / "nut/train/good/000.png").read_bytes() != (c / "nut/train/good/000.png").read_bytes()
    # an image does not depend on how many others are written
    more = make_synthetic_dataset(tmp_path / "d", seed=3, categories=["weave"], resolution=32, num_train=5,
                                  num_test_good=0, num_test_defect_per_type=0)
    assert (more / "weave/train/good/001.png").read_bytes() == (a / "weave/train/good/001.png").read_bytes()


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_masks_are_exactly_the_changed_pixels(category):
    for defect in SYNTHETIC_DEFECT_TYPES[category]:
        for index in range(6):
            normal, image, mask = _render_pair(category, defect, 64, _image_rng(0, category, "test_defect", index, defect))
            changed = np.any(image != normal, axis=-1)
            np.testing.assert_array_equal(mask, changed)
            diff = np.abs(image.astype(np.int16) - normal.astype(np.int16)).max(-1)
            assert diff[mask].min() >= 8
            # moderate size: not a few pixels, not half the image
            assert 0.003 <= mask.mean() <= 0.2, (defect, index, mask.mean())
            # clearly visible: the changed pixels move by more than 25/255 on average
            assert diff[mask].mean() > 25, (defect, index, diff[mask].mean())


def test_bad_arguments_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown synthetic category 'carpet'.*weave"):
        make_synthetic_dataset(tmp_path, categories=["carpet"])
    with pytest.raises(ValueError, match="resolution=8"):
        make_synthetic_dataset(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="num_train=1"):
        make_synthetic_dataset(tmp_path, num_train=1)


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """AUROC of the better direction: a detector is trivial if either high or low scores find defects."""
    auc = roc_auc_score(labels, scores)
    return max(auc, 1 - auc)


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_trivial_detectors_are_far_from_perfect(category):
    """Global statistics must not find the defects: mean intensity and per-pixel distance to the mean normal image."""
    res = 64
    train = np.stack([_render_pair(category, None, res, _image_rng(0, category, "train", i))[1]
                      for i in range(60)]).astype(np.float32) / 255
    test, labels = [], []
    for i in range(30):
        test.append(_render_pair(category, None, res, _image_rng(0, category, "test_good", i))[1])
        labels.append(0)
    for defect in SYNTHETIC_DEFECT_TYPES[category]:
        for i in range(6):
            test.append(_render_pair(category, defect, res, _image_rng(0, category, "test_defect", i, defect))[1])
            labels.append(1)
    x, y = np.stack(test).astype(np.float32) / 255, np.array(labels)
    distance = ((x - train.mean(0)) ** 2).sum(-1)  # (N, R, R)
    aurocs = {
        "mean_intensity": _auroc(y, x.mean((1, 2, 3))),
        "l2_to_mean_max": _auroc(y, distance.max((1, 2))),
        "l2_to_mean_mean": _auroc(y, distance.mean((1, 2))),
    }
    assert all(v < 0.8 for v in aurocs.values()), aurocs
    # ...because normals vary globally far more than a defect moves an image's mean intensity
    shifts = [abs(float(a.astype(np.float32).mean() - b.astype(np.float32).mean())) / 255
              for a, b, _ in (_render_pair(category, d, res, _image_rng(0, category, "test_defect", i, d))
                              for d in SYNTHETIC_DEFECT_TYPES[category] for i in range(6))]
    assert x[y == 0].mean((1, 2, 3)).std() > 3 * np.median(shifts)
