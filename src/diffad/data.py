"""MVTec AD-layout folders (or a Hub dataset) as a ``datasets.DatasetDict``, and image <-> tensor helpers.

The MVTec Anomaly Detection dataset (Bergmann, Fauser, Sattlegger, Steger, "MVTec AD - A
Comprehensive Real-World Dataset for Unsupervised Anomaly Detection", CVPR 2019) is licensed
under Creative Commons Attribution-NonCommercial-ShareAlike 4.0 (CC BY-NC-SA 4.0), copyright
MVTec Software GmbH: it may not be used commercially, and copies must keep the attribution
and the license. diffad never ships its images; :func:`load_mvtec` reads a copy the user has.

The layout, which any factory's own photos can follow::

    <root>/<category>/train/good/000.png                  defect-free training images
    <root>/<category>/test/good/000.png                   defect-free test images
    <root>/<category>/test/<defect>/000.png               defective test images
    <root>/<category>/ground_truth/<defect>/000_mask.png  their masks (non-zero = defect)

:func:`load_mvtec` returns splits ``train`` (``train/good`` minus the validation part),
``validation`` (a seeded ``validation_fraction`` of ``train/good``, as the thesis holds out
20% for model selection and calibration) and ``test`` (``test/good`` and every
``test/<defect>``), with features ``image`` (RGB), ``mask`` (mode L, 0 or 255, all zero for
good images), ``label`` (``ClassLabel(names=["good", "defect"])``), ``category``,
``defect_type`` and ``file_name`` (the path inside the category folder).
:func:`make_transform` turns its rows into model tensors in [-1, 1].
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import datasets
import numpy as np
import torch
from PIL import Image

from diffad.inputs import IMAGE_EXTENSIONS, walk_images
from diffad.pipelines.self_aware_inpaint import rgb_image

__all__ = [
    "CLASS_NAMES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "MVTecDataError",
    "MVTecFolderNotFoundError",
    "data_source",
    "images_to_tensor",
    "list_categories",
    "load_mvtec",
    "make_transform",
    "max_image_pixels",
    "read_image",
    "mvtec_features",
    "split_fingerprint",
]

logger = logging.getLogger(__name__)

#: Label names, in ClassLabel order: 0 = good, 1 = defect.
CLASS_NAMES: tuple[str, str] = ("good", "defect")
#: The pixel budget of one image file (width x height), checked from its header before it is decoded: 100 MP,
#: above the largest industrial area-scan cameras (65 MP) and phone photos (50 MP) in use, and a decoding peak of
#: about 4.5 GB, which a 2-core 24 GB station holds with a model running. ``DIFFAD_MAX_IMAGE_PIXELS`` changes it.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
MAX_IMAGE_PIXELS_ENV = "DIFFAD_MAX_IMAGE_PIXELS"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_SPLITS = ("train", "validation", "test")


class MVTecDataError(ValueError):
    """A dataset folder (or Hub dataset) that does not follow the MVTec AD layout; the message names the path and the fix."""


class MVTecFolderNotFoundError(MVTecDataError, FileNotFoundError):
    """A folder the MVTec AD layout needs does not exist (also a ``FileNotFoundError``)."""


class ImageReadError(MVTecDataError):
    """An image file that cannot be read. ``reason`` says why in words (no exception names, no path), so a caller
    can name the file as its user knows it: ``f"{name}: {err.reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str, prefix: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{prefix}{path}: {reason}; replace or delete it")


def mvtec_features() -> datasets.Features:
    """The features of every split :func:`load_mvtec` returns."""
    return datasets.Features({
        "image": datasets.Image(),
        "mask": datasets.Image(),
        "label": datasets.ClassLabel(names=list(CLASS_NAMES)),
        "category": datasets.Value("string"),
        "defect_type": datasets.Value("string"),
        "file_name": datasets.Value("string"),
    })


# --------------------------------------------------------------------------- folders


def _is_category_folder(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def _image_files(folder: Path) -> list[Path]:
    """The image files below ``folder``, sorted, by diffad's one walking rule (:func:`diffad.inputs.walk_images`);
    every skipped file is named in a warning."""
    scan = walk_images([folder])
    for path, reason in scan.skipped:
        logger.warning("skipping %s: %s", path, reason)
    return scan.images


def list_categories(root: str | Path) -> list[str]:
    """Sorted names of the category folders under ``root`` (folders holding ``train/`` or ``test/``).

    When ``root`` is itself a category folder, returns ``[root.name]``.

    Raises:
        MVTecFolderNotFoundError: ``root`` is not an existing folder.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise MVTecFolderNotFoundError(f"dataset folder not found: {root}")
    if _is_category_folder(root):
        return [root.name]
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _is_category_folder(p))


def _resolve_category(root: Path, category: str | None) -> Path:
    """Return the category folder for ``category`` under ``root`` (or ``root`` itself)."""
    if _is_category_folder(root):
        if category is None or category == root.name:
            return root
        raise MVTecDataError(f"{root} is the category folder {root.name!r}, not {category!r}; "
                             f"pass category={root.name!r} (or None), or pass the folder that holds {category!r}")
    if category is not None and (root / category).is_dir():
        return root / category
    available = list_categories(root)
    if not available:
        raise MVTecDataError(f"no MVTec AD category folders in {root}: expected <category>/train/good/*.png "
                             "(pass the dataset root or one category folder)")
    if category is None:
        if len(available) == 1:
            return root / available[0]
        raise MVTecDataError(f"{root} holds several categories; pass one of: {', '.join(available)}")
    raise MVTecDataError(f"unknown category {category!r} in {root}; available: {', '.join(available)}")


def _find_mask(gt_folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask", stem):
        for ext in IMAGE_EXTENSIONS:
            for candidate in (gt_folder / f"{name}{ext}", gt_folder / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def _scan(folder: Path) -> tuple[list[Path], list[tuple[Path, str, Path | None]]]:
    """Return (sorted ``train/good`` images, sorted ``(test image, defect type, mask or None)``) of a category folder."""
    good = folder / "train" / "good"
    if not good.is_dir():
        raise MVTecFolderNotFoundError(f"missing folder {good}: an MVTec AD category needs train/good/ with defect-free images")
    train = _image_files(good)
    if not train:
        raise MVTecDataError(f"empty training folder {good}: put defect-free images ({', '.join(IMAGE_EXTENSIONS)}) there")
    rows: list[tuple[Path, str, Path | None]] = []
    test = folder / "test"
    if not test.is_dir():
        logger.warning("no test folder at %s: the test split is empty", test)
        return train, rows
    for defect_dir in sorted(p for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")):
        defect = defect_dir.name
        images = _image_files(defect_dir)
        if not images:
            logger.warning("skipping empty test folder %s", defect_dir)
            continue
        for image in images:
            if defect == "good":
                rows.append((image, "good", None))
                continue
            mask = _find_mask(folder / "ground_truth" / defect, image.stem)
            if mask is None:
                raise MVTecDataError(
                    f"defect image {image} has no mask: expected {folder / 'ground_truth' / defect / (image.stem + '_mask.png')} "
                    f"(MVTec AD pairs test/<defect>/000.png with ground_truth/<defect>/000_mask.png)")
            rows.append((image, defect, mask))
    return train, rows


# --------------------------------------------------------------------------- images


def max_image_pixels() -> int:
    """The pixel budget of one image: ``DIFFAD_MAX_IMAGE_PIXELS`` when set, else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_IMAGE_PIXELS_ENV}={text!r} must be a positive number of pixels, e.g. 100000000")
    return value


def _open(path: Path) -> Image.Image:
    """Decode ``path`` fully (so truncated files fail here, not later), or raise :class:`ImageReadError`. The
    pixel budget and the page count are checked from the header, before anything is decoded."""
    budget = max_image_pixels()
    try:
        with Image.open(path) as im:
            width, height = im.size
            if width * height > budget:
                raise ImageReadError(path, f"{width}x{height} px is over the pixel budget of {budget} px "
                                           f"({budget / 1e6:g} MP), refused before decoding (a decompression bomb, "
                                           f"or a bigger photo than expected); to read it, raise "
                                           f"{MAX_IMAGE_PIXELS_ENV}")
            pages = getattr(im, "n_frames", 1)
            if pages > 1:
                raise ImageReadError(path, f"it has {pages} pages (frames) and diffad judges one image per file: "
                                           "save each page as its own file")
            im.load()
        return im
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageReadError(path, f"over PIL's decompression-bomb limit ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise ImageReadError(path, "it is not an image, or not in a format diffad reads",
                             "unreadable or truncated image file ") from err
    except PermissionError as err:
        raise ImageReadError(path, "permission denied", "unreadable image file ") from err
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError, struct.error...
        raise ImageReadError(path, "the file is truncated or damaged", "unreadable or truncated image file ") from err


#: Any PIL mode -> upright 8-bit RGB, by the pipeline's one reader (the function a Hub repo's handler.py runs too).
_to_rgb = rgb_image


def _checked_rgb(image: Image.Image, path: Path) -> Image.Image:
    """:func:`_to_rgb`, its error naming the file."""
    try:
        return _to_rgb(image)
    except ValueError as err:
        raise ImageReadError(path, str(err)) from None


def read_image(path: str | os.PathLike) -> Image.Image:
    """diffad's one image reader for files (training data, calibration, ``diffad detect``): decode ``path`` fully
    and return it as 8-bit RGB, any PIL mode (16-bit and float scaled, never saturated), EXIF orientation
    applied. ``MVTecDataError`` (a ``ValueError``) naming the file when it cannot be read or is smaller than
    ``MIN_IMAGE_SIDE`` px (the pipeline's)."""
    path = Path(path)
    return _checked_rgb(_open(path), path)


def _to_mask(image: Image.Image) -> Image.Image:
    """Any PIL mode -> L with values {0, 255}: every non-zero pixel is defect."""
    arr = np.asarray(image.convert("L") if image.mode in ("P", "PA") else image)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    return Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8), mode="L")


def _resize(image: Image.Image, resolution: int | None, resample: Image.Resampling) -> Image.Image:
    if resolution is None or image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), resample=resample)


def _load_row(image_path: Path, mask_path: Path | None, resolution: int | None) -> tuple[Any, Image.Image]:
    """Return ``(image, mask)``: image is the path when it is stored unchanged, else a converted PIL image."""
    image = _open(image_path)
    size = image.size
    rgb = _checked_rgb(image, image_path)
    unchanged = rgb is image and (resolution is None or size == (resolution, resolution))
    if mask_path is None:
        mask = Image.new("L", size, 0)
    else:
        mask = _open(mask_path)
        if mask.size != size:
            raise MVTecDataError(f"mask {mask_path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                                 f"{size[0]}x{size[1]}; masks must have their image's size")
        mask = _to_mask(mask)
    mask = _resize(mask, resolution, Image.Resampling.NEAREST)
    if unchanged:
        return str(image_path), mask
    return _resize(rgb, resolution, Image.Resampling.BICUBIC), mask


def _split_indices(n: int, validation_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` (a sorted file list) into (train, validation) index lists, both sorted."""
    n_val = min(int(round(validation_fraction * n)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val = sorted(int(i) for i in perm[:n_val])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def _check_args(resolution: int | None, validation_fraction: float) -> None:
    if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < 1):
        raise ValueError(f"resolution={resolution!r} must be a positive int (pixels) or None to keep the original size")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must be in [0, 1)")


def load_mvtec(source: str | Path, category: str | None = None, *, resolution: int | None = None,
               validation_fraction: float = 0.2, seed: int = 0) -> datasets.DatasetDict:
    """Load one category of an MVTec AD-layout folder, or a Hub dataset, as a ``DatasetDict``.

    Args:
        source: the dataset root holding category folders, one category folder, or a Hub
            dataset id (``owner/name``; needs the network unless cached).
        category: the category folder's name; may be None when ``source`` is a category
            folder or holds exactly one category.
        resolution: resize images (bicubic) and masks (nearest) to ``resolution x resolution``
            (a non-square image is stretched); None keeps the files' size.
        validation_fraction: share of ``train/good`` held out as the ``validation`` split, in [0, 1).
        seed: seed of that split (a ``numpy.random.Generator`` permutes the sorted file list,
            so the same seed and files give the same split on every machine).

    Returns:
        ``DatasetDict`` with ``train``, ``validation`` and ``test`` (see :func:`mvtec_features`):
        ``image`` RGB PIL image, ``mask`` mode-L PIL image of the same size (255 = defect, all
        zero for good images), ``label`` 0 good / 1 defect, ``category``, ``defect_type``
        (``"good"`` or the test sub-folder name), ``file_name`` (e.g. ``"test/crack/000.png"``).

    Every image and mask is decoded when loading, so bad files are reported here, not in a
    training loop: an unreadable or truncated image **fails the load** with
    :class:`MVTecDataError` naming the file (silently skipping it would change the test
    set's metrics; fix or delete the file). Grayscale, palette, 16-bit and RGBA images
    become RGB (alpha dropped); any non-zero mask pixel is defect. The mask of
    ``test/<defect>/000.png`` is ``ground_truth/<defect>/000_mask.png`` (``000.png`` there is
    accepted too, and any image suffix). Images that
    are already RGB at the requested size are stored as paths, others as re-encoded PNGs.

    Raises:
        MVTecFolderNotFoundError: ``source`` or ``<category>/train/good`` does not exist.
        MVTecDataError: unknown category (the message lists those that exist), a defect
            image without its mask, a mask whose size differs from its image, an unreadable
            or truncated image, an empty ``train/good``, or a Hub dataset that cannot be loaded.
        ValueError: ``resolution`` or ``validation_fraction`` out of range.
    """
    _check_args(resolution, validation_fraction)
    path = Path(source).expanduser().absolute()
    if not path.is_dir():
        if isinstance(source, str) and _HUB_ID.match(source) and not path.exists() and not Path(source).is_absolute():
            return _load_hub(source, category, resolution=resolution, validation_fraction=validation_fraction, seed=seed)
        if path.exists():
            raise MVTecDataError(f"{path} is a file; pass the dataset folder (holding <category>/train/good/)")
        raise MVTecFolderNotFoundError(f"dataset folder not found: {path}")
    folder = _resolve_category(path, category)
    name = folder.name
    train_files, test_rows = _scan(folder)
    rows = [(p, "good", None) for p in train_files] + test_rows

    columns: dict[str, list[Any]] = {key: [] for key in mvtec_features()}
    for image_path, defect, mask_path in rows:
        image, mask = _load_row(image_path, mask_path, resolution)
        columns["image"].append(image)
        columns["mask"].append(mask)
        columns["label"].append(0 if defect == "good" else 1)
        columns["category"].append(name)
        columns["defect_type"].append(defect)
        # the walk gives resolved paths: name them relative to the resolved folder (`..` and links in the path)
        columns["file_name"].append(Path(os.path.relpath(image_path, folder.resolve())).as_posix())

    n_train = len(train_files)
    train_idx, val_idx = _split_indices(n_train, validation_fraction, seed)
    test_idx = list(range(n_train, len(rows)))

    def subset(indices: Sequence[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({k: [v[i] for i in indices] for k, v in columns.items()},
                                          features=mvtec_features())

    logger.info("loaded %s: %d train, %d validation, %d test images", folder, len(train_idx), len(val_idx), len(test_idx))
    return datasets.DatasetDict({"train": subset(train_idx), "validation": subset(val_idx), "test": subset(test_idx)})


def _load_hub(repo_id: str, category: str | None, *, resolution: int | None, validation_fraction: float,
              seed: int) -> datasets.DatasetDict:
    """Thin Hub branch: ``datasets.load_dataset(repo_id)``, then the same splits and features as a folder."""
    try:
        loaded = datasets.load_dataset(repo_id)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot use this source"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MVTecDataError(f"{repo_id!r} is not a local folder and could not be loaded as a Hub dataset "
                             f"({type(err).__name__}: {first}); check the path, or the id and network "
                             "(HF_HUB_OFFLINE=1 blocks the Hub)") from err
    if not isinstance(loaded, datasets.DatasetDict) or "image" not in next(iter(loaded.values())).column_names:
        raise MVTecDataError(f"Hub dataset {repo_id!r} has no 'image' column; expected MVTec AD-style rows")
    if category is not None:
        if "category" not in next(iter(loaded.values())).column_names:
            raise MVTecDataError(f"Hub dataset {repo_id!r} has no 'category' column to select {category!r} from")
        loaded = datasets.DatasetDict({k: d.filter(lambda c: c == category, input_columns="category") for k, d in loaded.items()})
        if all(len(d) == 0 for d in loaded.values()):
            raise MVTecDataError(f"unknown category {category!r} in Hub dataset {repo_id!r}")
    if "train" not in loaded:
        raise MVTecDataError(f"Hub dataset {repo_id!r} has no 'train' split (splits: {', '.join(loaded)})")
    if "validation" not in loaded:
        train_idx, val_idx = _split_indices(len(loaded["train"]), validation_fraction, seed)
        loaded = datasets.DatasetDict({**loaded, "train": loaded["train"].select(train_idx),
                                       "validation": loaded["train"].select(val_idx)})

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        image = _to_rgb(row["image"])
        mask = row.get("mask")
        mask = Image.new("L", image.size, 0) if mask is None else _to_mask(mask)
        label = row.get("label", 0)
        defect = row.get("defect_type") or ("good" if label == 0 else "defect")
        return {"image": _resize(image, resolution, Image.Resampling.BICUBIC),
                "mask": _resize(mask, resolution, Image.Resampling.NEAREST),
                "label": int(label), "category": row.get("category") or repo_id, "defect_type": defect,
                "file_name": row.get("file_name") or ""}

    out = {}
    for split in _SPLITS:
        ds = loaded[split] if split in loaded else loaded["train"].select([])
        out[split] = ds.map(convert, remove_columns=ds.column_names, features=mvtec_features())
    return datasets.DatasetDict(out)


def split_fingerprint(dataset: datasets.Dataset) -> str:
    """A short hash of a split's images by content, in order (a file's bytes, or a converted image's PNG bytes):
    the same images give the same hash wherever they lie; other images under the same folder names do not."""
    if len(dataset) == 0 or "image" not in dataset.column_names:
        return hashlib.sha256(b"").hexdigest()[:16]
    digest = hashlib.sha256()
    for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]:
        data = item.get("bytes") if isinstance(item, dict) else None
        if data is None:
            data = Path(item["path"]).read_bytes()
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- where the data comes from


#: The licence files a dataset folder may hold (MVTec AD ships ``license.txt`` in each category).
LICENSE_FILES = ("license.txt", "LICENSE", "LICENSE.txt", "LICENSE.md", "license.md", "COPYING")
#: Hub licence ids by the text that names them in a licence file, most specific first.
_LICENSE_TEXTS = (
    ("cc-by-nc-sa-4.0", ("attribution-noncommercial-sharealike 4.0", "cc by-nc-sa 4.0")),
    ("cc-by-nc-nd-4.0", ("attribution-noncommercial-noderivatives 4.0", "cc by-nc-nd 4.0")),
    ("cc-by-nc-4.0", ("attribution-noncommercial 4.0", "cc by-nc 4.0")),
    ("cc-by-sa-4.0", ("attribution-sharealike 4.0", "cc by-sa 4.0")),
    ("cc-by-4.0", ("attribution 4.0 international", "cc by 4.0")),
    ("cc0-1.0", ("cc0 1.0", "creative commons zero")),
    ("apache-2.0", ("apache license", )),
    ("mit", ("mit license", "permission is hereby granted, free of charge")),
)
#: The title of the MVTec AD paper, which MVTec AD's ``readme.txt`` cites.
_MVTEC_AD_TITLE = "comprehensive real-world dataset for unsupervised anomaly detection"
#: The first line of the README that :func:`diffad.make_synthetic_dataset` writes.
_SYNTHETIC_README = ("README.txt", "diffad synthetic inspection dataset")


def data_source(data_dir: str | os.PathLike, category: str | None = None) -> dict[str, Any]:
    """What a dataset folder says about itself, read from its files (never guessed from its path): the licence its
    licence file states, and whether it is MVTec AD (its ``readme.txt`` cites the MVTec AD paper) or diffad's
    synthetic dataset (its ``README.txt``). ``training/train_ddpm.py`` records it in ``training_log.json`` and
    ``diffad card`` takes the model's licence from it.

    Args:
        data_dir: the dataset root, or one category folder.
        category: the category folder under ``data_dir``, looked in first.

    Returns:
        ``{"license": Hub licence id or None (no file, or a text diffad does not know), "license_file": the file's
        path or None, "dataset": "mvtec_ad", "diffad-synthetic" or None}``.
    """
    root = Path(data_dir)
    folders = [root / category, root] if category else [root]
    texts: list[str] = []
    found: dict[str, Any] = {"license": None, "license_file": None, "dataset": None}
    for folder in folders:
        for name in (*LICENSE_FILES, "readme.txt", "README.txt", "README.md"):
            path = folder / name
            try:
                text = " ".join(path.read_text(encoding="utf-8", errors="replace")[:20_000].split()).lower()
            except OSError:
                continue
            texts.append(text)
            if name in LICENSE_FILES and found["license_file"] is None:
                found["license_file"] = str(path)
                found["license"] = next((spdx for spdx, marks in _LICENSE_TEXTS if any(m in text for m in marks)),
                                        None)
            if name == _SYNTHETIC_README[0] and text.startswith(_SYNTHETIC_README[1]):
                found["dataset"] = "diffad-synthetic"
    if found["dataset"] is None and any(_MVTEC_AD_TITLE in text for text in texts):
        found["dataset"] = "mvtec_ad"
    if found["dataset"] == "diffad-synthetic" and found["license_file"] is None:
        found["license"] = "apache-2.0"  # generated by diffad ("free to use and share"), under diffad's licence
    return found


# --------------------------------------------------------------------------- tensors


def images_to_tensor(pil_images: Image.Image | Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL image(s) -> float32 tensor (B, 3, R, R) in [-1, 1], resized with bicubic filtering, any mode made RGB."""
    if isinstance(pil_images, Image.Image):
        pil_images = [pil_images]
    if len(pil_images) == 0:
        raise ValueError("images_to_tensor got no images")
    arrays = [np.asarray(_resize(_to_rgb(im), resolution, Image.Resampling.BICUBIC), dtype=np.float32) for im in pil_images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (batch / 127.5 - 1.0).contiguous()


def _mask_to_tensor(mask: Image.Image, resolution: int) -> torch.Tensor:
    arr = np.asarray(_resize(_to_mask(mask), resolution, Image.Resampling.NEAREST)) > 0
    return torch.from_numpy(arr.astype(np.float32))[None]



def make_transform(resolution: int) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    """A batch transform for ``dataset.with_transform(make_transform(R))``.

    Each row becomes ``pixel_values`` float32 (3, R, R) in [-1, 1], ``mask`` float32 (1, R, R)
    in {0, 1} and ``label`` int, so a ``torch.utils.data.DataLoader`` with the default collate
    yields ``pixel_values`` (B, 3, R, R), ``mask`` (B, 1, R, R) and ``label`` (B,).
    """
    if not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} must be a positive int")

    def transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        images = batch["image"]
        pixel_values = list(images_to_tensor(images, resolution).unbind(0))
        masks = batch.get("mask") or [None] * len(images)
        mask = [torch.zeros(1, resolution, resolution) if m is None else _mask_to_tensor(m, resolution) for m in masks]
        labels = batch.get("label") or [0] * len(images)
        return {"pixel_values": pixel_values, "mask": mask, "label": [int(x) for x in labels]}

    return transform
