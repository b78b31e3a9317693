"""diffad.data: load_mvtec on the synthetic default and the real MVTec AD subset, bad input, tensors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from diffad.data import (
    MVTecDataError,
    MVTecFolderNotFoundError,
    images_to_tensor,
    list_categories,
    load_mvtec,
    make_transform,
)
from diffad.synthetic import SYNTHETIC_CATEGORIES, SYNTHETIC_DEFECT_TYPES

# conftest's synthetic_root: 40 train/good, 10 test/good, 4 per defect type, 64 px.
N_TRAIN, N_TEST_GOOD, N_PER_DEFECT, RES = 40, 10, 4, 64


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _make_category(root: Path, name: str = "widget", *, n_train: int = 5, defects: dict[str, int] | None = None,
                   size: int = 16, with_masks: bool = True) -> Path:
    """A tiny valid MVTec AD category folder: random RGB images, a square defect mask per defect image."""
    rng = np.random.default_rng(0)
    folder = root / name
    for i in range(n_train):
        _png(folder / "train" / "good" / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    _png(folder / "test" / "good" / "000.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    for defect, n in (defects or {"crack": 2}).items():
        for i in range(n):
            _png(folder / "test" / defect / f"{i:03d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            if with_masks:
                mask = np.zeros((size, size), np.uint8)
                mask[2:6, 3:8] = 255
                _png(folder / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return folder


# --------------------------------------------------------------------------- synthetic default


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_synthetic_counts_splits_and_features(synthetic_root, category):
    ds = load_mvtec(synthetic_root, category)
    n_val = round(0.2 * N_TRAIN)
    assert {k: len(v) for k, v in ds.items()} == {
        "train": N_TRAIN - n_val, "validation": n_val,
        "test": N_TEST_GOOD + N_PER_DEFECT * len(SYNTHETIC_DEFECT_TYPES[category])}
    assert ds["train"].features["label"].names == ["good", "defect"]
    assert isinstance(ds["test"].features["image"], datasets.Image)
    assert set(ds["train"]["defect_type"]) == set(ds["validation"]["defect_type"]) == {"good"}
    assert set(ds["train"]["label"]) == {0} and set(ds["train"]["category"]) == {category}
    expected = {"good": N_TEST_GOOD, **{d: N_PER_DEFECT for d in SYNTHETIC_DEFECT_TYPES[category]}}
    assert Counter(ds["test"]["defect_type"]) == expected
    labels = np.array(ds["test"]["label"])
    assert labels.sum() == N_PER_DEFECT * len(SYNTHETIC_DEFECT_TYPES[category])
    assert all(lab == (d != "good") for lab, d in zip(labels, ds["test"]["defect_type"]))
    assert ds["test"][0]["file_name"].startswith("test/")


def test_validation_split_is_seeded_disjoint_and_deterministic(synthetic_root):
    a = load_mvtec(synthetic_root, "weave", seed=0)
    b = load_mvtec(synthetic_root, "weave", seed=0)
    c = load_mvtec(synthetic_root, "weave", seed=1)
    assert a["validation"]["file_name"] == b["validation"]["file_name"]
    assert a["validation"]["file_name"] != c["validation"]["file_name"]
    train, val = set(a["train"]["file_name"]), set(a["validation"]["file_name"])
    assert not train & val
    assert train | val == {f"train/good/{i:03d}.png" for i in range(N_TRAIN)}
    # the split depends only on the seed and the sorted list: numpy's permutation of range(40), first 8
    expected = sorted(np.random.default_rng(0).permutation(N_TRAIN)[:8])
    assert a["validation"]["file_name"] == [f"train/good/{i:03d}.png" for i in expected]
    half = load_mvtec(synthetic_root, "weave", validation_fraction=0.5)
    assert len(half["validation"]) == 20 and len(half["train"]) == 20
    none = load_mvtec(synthetic_root, "weave", validation_fraction=0.0)
    assert len(none["validation"]) == 0 and len(none["train"]) == N_TRAIN


def test_masks_are_aligned_with_their_images(synthetic_root):
    ds = load_mvtec(synthetic_root, "nut")
    folder = synthetic_root / "nut"
    for row in ds["test"]:
        image, mask = row["image"], row["mask"]
        assert image.mode == "RGB" and mask.mode == "L"
        assert image.size == mask.size == (RES, RES)
        m = np.asarray(mask)
        assert set(np.unique(m)) <= {0, 255}
        assert (m.max() > 0) == (row["label"] == 1), row["file_name"]
        if row["label"] == 1:
            stem = Path(row["file_name"]).stem
            on_disk = np.asarray(Image.open(folder / "ground_truth" / row["defect_type"] / f"{stem}_mask.png"))
            np.testing.assert_array_equal(m, on_disk)
            np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(folder / row["file_name"])))
    for row in ds["train"]:
        assert np.asarray(row["mask"]).max() == 0


def test_resolution_resizes_images_bicubic_and_masks_nearest(synthetic_root):
    ds = load_mvtec(synthetic_root, "weave", resolution=32)
    row = next(r for r in ds["test"] if r["label"] == 1)
    assert row["image"].size == row["mask"].size == (32, 32)
    original = Image.open(synthetic_root / "weave" / row["file_name"])
    np.testing.assert_array_equal(np.asarray(row["image"]),
                                  np.asarray(original.resize((32, 32), Image.Resampling.BICUBIC)))
    gt = Image.open(synthetic_root / "weave" / "ground_truth" / row["defect_type"] / f"{Path(row['file_name']).stem}_mask.png")
    np.testing.assert_array_equal(np.asarray(row["mask"]), np.asarray(gt.resize((32, 32), Image.Resampling.NEAREST)))
    assert all(r["image"].size == (32, 32) for r in ds["train"])


def test_transform_gives_model_tensors_through_a_dataloader(synthetic_root):
    ds = load_mvtec(synthetic_root, "nut")["test"].with_transform(make_transform(32))
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    batches = list(loader)
    assert sum(len(b["label"]) for b in batches) == len(ds)
    batch = batches[-1]  # the last batch holds defects (test rows are sorted: defect folders, good)
    assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["mask"].shape[1:] == (1, 32, 32) and batch["mask"].dtype == torch.float32
    assert batch["label"].dtype == torch.int64
    every = torch.cat([b["pixel_values"] for b in batches])
    assert every.min() >= -1.0 and every.max() <= 1.0 and every.min() < -0.5 and every.max() > 0.5
    masks = torch.cat([b["mask"] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masks.flatten(1).amax(1) > 0, labels == 1)


def test_images_to_tensor_is_exact():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    x = images_to_tensor([Image.fromarray(a) for a in arrays], 24)
    assert x.shape == (3, 3, 24, 24) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    back = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # [-1, 1] back to 8 bits
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(b, a)
    gray = images_to_tensor(Image.fromarray(arrays[0][..., 0]), 12)  # one grayscale image, resized
    assert gray.shape == (1, 3, 12, 12) and torch.equal(gray[:, 0], gray[:, 1])


def test_grayscale_palette_rgba_and_16bit_become_rgb(tmp_path):
    folder = _make_category(tmp_path, n_train=4)
    good = folder / "train" / "good"
    gray = np.full((16, 16), 77, np.uint8)
    _png(good / "000.png", gray, "L")
    palette = Image.fromarray(np.full((16, 16, 3), (10, 200, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(good / "001.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = (50, 60, 70), 128
    _png(good / "002.png", rgba, "RGBA")
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(good / "003.png")  # 16-bit grayscale, white
    ds = load_mvtec(folder, validation_fraction=0.0)
    rows = {r["file_name"]: r for r in ds["train"]}
    for name in ("000", "001", "002", "003"):
        assert rows[f"train/good/{name}.png"]["image"].mode == "RGB"
    px = {n: tuple(np.asarray(rows[f"train/good/{n}.png"]["image"])[5, 5]) for n in ("000", "001", "002", "003")}
    assert px == {"000": (77, 77, 77), "001": (10, 200, 30), "002": (50, 60, 70), "003": (255, 255, 255)}


def test_list_categories(synthetic_root, tmp_path):
    assert list_categories(synthetic_root) == sorted(SYNTHETIC_CATEGORIES)
    assert list_categories(synthetic_root / "nut") == ["nut"]
    (tmp_path / "not_a_category").mkdir()
    _make_category(tmp_path, "b")
    _make_category(tmp_path, "a")
    assert list_categories(tmp_path) == ["a", "b"]


def test_category_folder_and_single_category_root(tmp_path):
    folder = _make_category(tmp_path, "widget")
    by_folder = load_mvtec(folder)
    by_name = load_mvtec(folder, "widget")
    by_root = load_mvtec(tmp_path)  # one category under the root: no name needed
    assert by_folder["test"]["file_name"] == by_name["test"]["file_name"] == by_root["test"]["file_name"]
    assert set(by_root["test"]["category"]) == {"widget"}


def test_missing_test_folder_gives_an_empty_test_split(tmp_path):
    folder = _make_category(tmp_path)
    for p in sorted((folder / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (folder / "test").rmdir()
    ds = load_mvtec(folder)
    assert len(ds["test"]) == 0 and len(ds["train"]) + len(ds["validation"]) == 5


# --------------------------------------------------------------------------- bad input


def test_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(MVTecFolderNotFoundError, match="dataset folder not found") as err:
        load_mvtec(missing, "bottle")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, MVTecDataError)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_source_that_is_a_file(tmp_path):
    f = tmp_path / "data.zip"
    f.write_bytes(b"zip")
    with pytest.raises(MVTecDataError, match="is a file"):
        load_mvtec(f)


def test_unknown_category_lists_the_available_ones(tmp_path):
    _make_category(tmp_path, "bottle")
    _make_category(tmp_path, "cable")
    with pytest.raises(MVTecDataError, match=r"unknown category 'screw' .*available: bottle, cable"):
        load_mvtec(tmp_path, "screw")
    with pytest.raises(MVTecDataError, match=r"several categories; pass one of: bottle, cable"):
        load_mvtec(tmp_path)
    with pytest.raises(MVTecDataError, match=r"is the category folder 'bottle', not 'cable'"):
        load_mvtec(tmp_path / "bottle", "cable")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MVTecDataError, match="no MVTec AD category folders"):
        load_mvtec(empty)


def test_defect_image_without_its_mask_explains_the_naming_rule(tmp_path):
    folder = _make_category(tmp_path, defects={"crack": 2})
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(MVTecDataError, match=r"001\.png has no mask: expected .*001_mask\.png") as err:
        load_mvtec(folder)
    assert "ground_truth/<defect>/000_mask.png" in str(err.value)
    assert str(folder / "test" / "crack" / "001.png") in str(err.value)


def test_mask_size_differs_from_its_image(tmp_path):
    folder = _make_category(tmp_path, defects={"crack": 1})
    _png(folder / "ground_truth" / "crack" / "000_mask.png", np.zeros((20, 16), np.uint8))
    with pytest.raises(MVTecDataError, match=r"000_mask\.png is 16x20 but its image .*000\.png is 16x16"):
        load_mvtec(folder)


@pytest.mark.parametrize("where", ["train/good/002.png", "test/crack/001.png", "ground_truth/crack/000_mask.png"])
def test_truncated_image_fails_the_load_naming_the_file(tmp_path, where):
    folder = _make_category(tmp_path, defects={"crack": 2}, size=64)
    path = folder / where
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MVTecDataError, match=r"unreadable or truncated image file .*" + Path(where).name) as err:
        load_mvtec(folder)
    assert str(path) in str(err.value)


def test_file_that_is_not_an_image(tmp_path):
    folder = _make_category(tmp_path)
    (folder / "train" / "good" / "003.png").write_text("not a png")
    with pytest.raises(MVTecDataError, match=r"unreadable or truncated image file .*003\.png"):
        load_mvtec(folder)


def test_empty_or_missing_train_good(tmp_path):
    folder = _make_category(tmp_path, n_train=1)
    (folder / "train" / "good" / "000.png").unlink()
    (folder / "train" / "good" / "notes.txt").write_text("no images here")
    with pytest.raises(MVTecDataError, match=r"empty training folder .*train/good"):
        load_mvtec(folder)
    (folder / "train" / "good" / "notes.txt").unlink()
    (folder / "train" / "good").rmdir()
    with pytest.raises(MVTecFolderNotFoundError, match=r"missing folder .*train/good"):
        load_mvtec(folder)


def test_bad_arguments(synthetic_root):
    with pytest.raises(ValueError, match="validation_fraction=1.0"):
        load_mvtec(synthetic_root, "nut", validation_fraction=1.0)
    with pytest.raises(ValueError, match="resolution=0"):
        load_mvtec(synthetic_root, "nut", resolution=0)
    with pytest.raises(ValueError, match="resolution"):
        make_transform(-3)


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    # conftest sets HF_HUB_OFFLINE after huggingface_hub/datasets read it at import: force offline mode here
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(MVTecDataError, match=r"'diffad-nobody/no-such-dataset' is not a local folder and could not be loaded"):
        load_mvtec("diffad-nobody/no-such-dataset", "bottle")


def test_hub_branch_converts_a_loaded_datasetdict(monkeypatch):
    rng = np.random.default_rng(0)
    rows = {
        "image": [Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)) for _ in range(6)],
        "label": [0, 0, 0, 0, 0, 1],
        "category": ["a", "a", "a", "a", "b", "a"],
    }
    fake = datasets.DatasetDict({"train": datasets.Dataset.from_dict({k: v[:5] for k, v in rows.items()}),
                                 "test": datasets.Dataset.from_dict({k: v[5:] for k, v in rows.items()})})
    monkeypatch.setattr(datasets, "load_dataset", lambda repo_id: fake)
    ds = load_mvtec("someone/mvtec-like", "a", resolution=8, validation_fraction=0.25)
    assert {k: len(v) for k, v in ds.items()} == {"train": 3, "validation": 1, "test": 1}
    row = ds["test"][0]
    assert row["image"].mode == "RGB" and row["image"].size == (8, 8)
    assert row["mask"].mode == "L" and np.asarray(row["mask"]).max() == 0
    assert row["label"] == 1 and row["defect_type"] == "defect" and row["category"] == "a"
    with pytest.raises(MVTecDataError, match="unknown category 'z'"):
        load_mvtec("someone/mvtec-like", "z")


# --------------------------------------------------------------------------- real MVTec AD


def test_real_subset_counts_match_its_readme(real_subset):
    ds = load_mvtec(real_subset, "bottle")
    # README: 209 train/good (20% -> 42 held out), 83 test: 20 good, 20 broken_large, 22 broken_small, 21 contamination
    assert {k: len(v) for k, v in ds.items()} == {"train": 167, "validation": 42, "test": 83}
    assert Counter(ds["test"]["defect_type"]) == {"good": 20, "broken_large": 20, "broken_small": 22, "contamination": 21}
    assert sum(ds["test"]["label"]) == 63
    for row in ds["test"]:
        assert row["image"].size == row["mask"].size == (256, 256) and row["image"].mode == "RGB"
        assert (np.asarray(row["mask"]).max() == 255) == (row["label"] == 1)


def test_real_full_resolution_images_are_resized(real_subset):
    full = real_subset.parent / "mvtec_fullres_sample" / "bottle"
    if not full.is_dir():
        pytest.skip(f"full-resolution sample not found at {full}")
    ds = load_mvtec(full, resolution=256)
    assert {k: len(v) for k, v in ds.items()} == {"train": 4, "validation": 1, "test": 8}
    small = real_subset / "bottle"  # the README's 256 px versions of the same files: LANCZOS images, NEAREST masks
    for row in ds["test"]:
        assert row["image"].size == row["mask"].size == (256, 256)
        ref = np.asarray(Image.open(small / row["file_name"]), np.float32)
        assert np.abs(np.asarray(row["image"], np.float32) - ref).mean() < 2.0, row["file_name"]
        ours = np.asarray(row["mask"]) > 0
        if row["label"] == 1:
            path = Path(row["file_name"])
            theirs = np.asarray(Image.open(small / "ground_truth" / path.parent.name / f"{path.stem}_mask.png")) > 0
            assert (ours & theirs).sum() / (ours | theirs).sum() > 0.95
        else:
            assert not ours.any()
    native = load_mvtec(full)
    assert native["test"][0]["image"].size == (900, 900)


def test_a_dataset_path_with_dot_dot_loads_with_the_same_file_names(synthetic_root):
    """`../shared/data/...` (a path through `..`) loads as the resolved path does (the walk resolves paths)."""
    from diffad.synthetic import SYNTHETIC_CATEGORIES

    category = SYNTHETIC_CATEGORIES[0]
    plain = load_mvtec(synthetic_root, category)
    dotted = load_mvtec(synthetic_root / category / "..", category)
    assert dotted["test"]["file_name"] == plain["test"]["file_name"]
    assert all(not name.startswith("..") for name in dotted["train"]["file_name"])
