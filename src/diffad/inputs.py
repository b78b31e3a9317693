"""diffad's one rule for finding images in folders, shared by ``diffad detect``, the app (a zip's members) and the
training data loader, and its one list of accepted formats.

The rule: a file named explicitly is always taken (a file that is not an image becomes an error row later). A
folder contributes every file below it, recursively, **following symbolic links to folders** (each real folder
once), whose suffix is in :data:`IMAGE_EXTENSIONS`; everything else below it is *skipped and named*: hidden files
and folders (a leading ``.``), other suffixes, broken links. Nothing is left out silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

__all__ = ["IMAGE_EXTENSIONS", "ImageScan", "is_image_name", "skip_reason", "walk_images"]

#: File suffixes read as images (case-insensitive): every format PIL decodes that cameras and scanners write.
#: A multi-page TIFF or animated GIF is refused by the reader (one image per file).
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    """Whether a file called ``name`` is taken from a folder: an image suffix and no leading ``.``."""
    return skip_reason(name) is None


def skip_reason(name: str) -> Optional[str]:
    """Why a file called ``name`` is skipped when found in a folder (or a zip), or None when it is taken."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    if base.startswith("."):
        return "a hidden file"
    if os.path.splitext(base)[1].lower() not in IMAGE_EXTENSIONS:
        return f"not an image format diffad reads ({', '.join(IMAGE_EXTENSIONS)})"
    return None


@dataclass
class ImageScan:
    """What :func:`walk_images` found: the images to read, and every skipped path with its reason."""

    images: list[Path] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def skipped_summary(self, limit: int = 10) -> str:
        """``"N skipped (a, b, ...)"``: the count and the first ``limit`` names; empty when nothing was skipped."""
        if not self.skipped:
            return ""
        names = ", ".join(str(p) for p, _ in self.skipped[:limit])
        more = f", and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return f"{len(self.skipped)} skipped ({names}{more})"


def walk_images(inputs: Iterable[str | os.PathLike], *, exclude: Optional[Path] = None) -> ImageScan:
    """Expand files and folders into sorted, de-duplicated image paths (resolved), by the module's rule.

    Args:
        inputs: files and/or folders.
        exclude: a folder never entered (``detect``'s own output folder inside an input folder).

    Raises:
        FileNotFoundError: an input does not exist.
    """
    scan = ImageScan()
    found: dict[Path, None] = {}
    seen_dirs: set[Path] = set()
    excluded = exclude.resolve() if exclude is not None else None

    def walk(folder: Path) -> None:
        real = folder.resolve()
        if real in seen_dirs or real == excluded:
            return
        seen_dirs.add(real)
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                scan.skipped.append((entry, "hidden"))
            elif entry.is_dir():
                walk(entry)
            elif entry.is_symlink() and not entry.exists():
                scan.skipped.append((entry, f"a broken symbolic link (its target {os.readlink(entry)} does not "
                                            "exist)"))
            elif not entry.is_file():
                scan.skipped.append((entry, "not a regular file"))
            elif (reason := skip_reason(entry.name)) is not None:
                scan.skipped.append((entry, reason))
            else:
                found.setdefault(entry.resolve(), None)

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            walk(path)
        elif path.is_file():
            found.setdefault(path.resolve(), None)
        else:
            raise FileNotFoundError(f"{path} does not exist: pass image files or folders of images")
    scan.images = sorted(found)
    return scan
