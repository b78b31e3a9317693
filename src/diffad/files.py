"""Crash-safe files and folders: what a later run reads back is never half-written.

Every file or folder that a later run reads back is first written under a temporary name in the same directory and
then renamed (``os.replace``, atomic on POSIX), so a run killed at any instant (SIGKILL, power loss) leaves either the
old or the new version, never a half-written one: :func:`atomic_write_text` / :func:`atomic_write_json` for files,
:func:`commit_directory` for folders (written first under :func:`incomplete_path`), :func:`save_pipeline` for a
pipeline folder. :func:`file_lock` holds an OS lock that dies with its holder.

Other people's files: diffad deletes only what it wrote, saying so in the log: leftovers under its own temporary
names (``.<name>.diffad-incomplete``, ``.<name>.diffad-old-<pid>-<ns>``, :func:`remove_incomplete`).

No torch at import: results tables and the app write through here without loading it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, List, Union

__all__ = [
    "PathLike",
    "atomic_write_json",
    "atomic_write_text",
    "commit_directory",
    "file_lock",
    "incomplete_path",
    "remove_incomplete",
    "save_pipeline",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

_INCOMPLETE_SUFFIX = ".diffad-incomplete"
#: The names of diffad's own temporary files and folders (nothing else is ever deleted as a leftover).
_LEFTOVER_RE = re.compile(r"^\..+\.diffad-(incomplete|old-\d+-\d+)$")


def to_jsonable(value: Any) -> Any:
    """``value`` with tuples, paths, numpy/torch scalars and tensors turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    torch = sys.modules.get("torch")  # a tensor exists only once torch is imported
    if torch is not None and isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` so that readers see the old file or the new one, never a
    partial one: write a temporary file in the same folder, flush it to disk, then ``os.replace``.

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write_text`).

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=indent) + "\n")


def incomplete_path(dest: PathLike) -> Path:
    """The temporary sibling under which ``dest`` is written before :func:`commit_directory`:
    ``<parent>/.<name>.diffad-incomplete``. Deterministic, so that every rank of a distributed run
    writes its share of a checkpoint into the same folder."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{_INCOMPLETE_SUFFIX}"


@contextlib.contextmanager
def file_lock(path: PathLike, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock (``flock``) on the file ``path`` (created when missing) for the ``with`` block.

    The OS releases it even when the holder is killed, so no stale lock ever blocks a rerun. With
    ``blocking=False`` a lock held by another process raises ``BlockingIOError`` at once. Not POSIX: no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def commit_directory(tmp: PathLike, dest: PathLike) -> Path:
    """Move a fully written folder ``tmp`` to ``dest`` by renaming it.

    If ``dest`` already exists it is first renamed aside and deleted only after the new folder
    is in place, so at every instant one complete version exists on disk.
    """
    tmp, dest = Path(tmp), Path(dest)
    if not tmp.is_dir():
        raise FileNotFoundError(f"cannot commit {tmp}: it is not a folder")
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.diffad-old-{os.getpid()}-{time.time_ns()}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def remove_incomplete(output_dir: PathLike) -> List[Path]:
    """Delete diffad's own leftovers of interrupted writes in ``output_dir`` (``.<name>.diffad-incomplete`` and
    ``.<name>.diffad-old-<pid>-<ns>``; never another name), each named in the log. Call it on one process, before
    any process starts writing.

    Returns:
        The removed paths.
    """
    output_dir = Path(output_dir)
    removed = []
    if not output_dir.is_dir():
        return removed
    for p in sorted(output_dir.iterdir()):
        if _LEFTOVER_RE.match(p.name):
            logger.info("removing %s: diffad's leftover of an interrupted write", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed



def save_pipeline(pipeline: Any, output_dir: Path) -> None:
    """``pipeline.save_pretrained`` into a temporary folder, then each saved entry renamed into
    ``output_dir`` (beside the checkpoints and logs), so a crash never leaves a torn ``unet/``."""
    tmp = incomplete_path(output_dir / "pipeline")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(str(tmp), safe_serialization=True)
    entries = sorted(tmp.iterdir(), key=lambda p: p.name == "model_index.json")  # the index last
    for entry in entries:
        if entry.is_dir():
            commit_directory(entry, output_dir / entry.name)
        else:
            os.replace(entry, output_dir / entry.name)
    shutil.rmtree(tmp, ignore_errors=True)


