"""diffad's one writer of results tables (``diffad detect``'s ``results.csv``, the app's download, ``diffad
evaluate``'s ``per_image.csv``) and the identity of the run that wrote them.

* **Safe cells.** A cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to
  Excel and LibreOffice; :func:`safe_cell` prefixes it with ``'`` (OWASP's rule for CSV injection). Numbers are
  left as they are (``-0.5`` is a number, not a formula).
* **Whole rows.** :class:`ResultsFile` appends each batch of rows with one ``write`` on the file, flushed and
  ``fsync``-ed; a write that fails half way (a full disk) is cut back to the last whole row before the error is
  raised. When an existing file ends in a torn row (a run killed by the OS mid-write), the row is cut off on
  opening, so the next row is never glued to it; that file is then scored again.
* **Identity.** :func:`check_identity` keeps, beside a results file, a JSON sidecar saying which model,
  calibration (a hash of its thresholds and config), method, map, threshold and seed decided its rows, and refuses
  to add rows decided under other ones.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["FORMULA_PREFIXES", "ResultsFile", "calibration_hash", "check_identity", "csv_text", "folder_calibration_hash",
           "safe_cell"]

logger = logging.getLogger(__name__)

#: The first characters that make a spreadsheet read a cell as a formula (OWASP, "CSV Injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> str:
    """``value`` as CSV cell text that no spreadsheet runs: a leading ``= + - @ \\t \\r`` gets a ``'`` in front,
    unless the text is a number."""
    text = "" if value is None else str(value)
    if text.startswith(FORMULA_PREFIXES):
        try:
            float(text)
        except ValueError:
            return "'" + text
    return text


def _row_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str], header: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if header:
        writer.writerow(fields)
    for row in rows:
        writer.writerow([safe_cell(row.get(f, "")) for f in fields])
    return buffer.getvalue()


def csv_text(rows: Iterable[Mapping[str, Any]], fields: Sequence[str]) -> str:
    """A whole CSV table (header and ``rows``) with safe cells, as text."""
    return _row_text(rows, fields, header=True)


def _whole_rows_end(text: str, width: int) -> int:
    """The length of the longest prefix of ``text`` made of whole CSV records of ``width`` fields each."""
    end = len(text)
    while end > 0:
        if text[:end].endswith("\n"):
            try:
                records = list(csv.reader(io.StringIO(text[:end], newline=""), strict=True))
            except csv.Error:
                records = None
            if records is not None and all(len(r) == width for r in records):
                return end
        end = text.rfind("\n", 0, end - 1) + 1 if end > 1 else 0
    return 0


class ResultsFile:
    """A results CSV opened for appending whole rows (see the module docstring). Use it as a context manager.

    Args:
        path: the CSV file (created with a header when missing or empty).
        fields: its columns.

    Raises:
        ValueError: the existing file has other columns (written by another diffad or by hand).
    """

    def __init__(self, path: str | os.PathLike, fields: Sequence[str]):
        self.path, self.fields = Path(path), tuple(fields)
        self._fd: Optional[int] = None

    def __enter__(self) -> "ResultsFile":
        self.repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            self._append(_row_text([], self.fields, header=True))
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def repair(self) -> Optional[str]:
        """Cut a torn last row off the file (logged); refuse a file with other columns. Returns the cut text."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        header = next(csv.reader(io.StringIO(text.split("\n", 1)[0])), [])
        if tuple(header) != self.fields:
            raise ValueError(f"{self.path} has the columns {', '.join(header)}, not diffad's "
                             f"{', '.join(self.fields)}: it was written by another program or diffad version; "
                             "pass another --out")
        end = _whole_rows_end(text, len(self.fields))
        if end == len(text):
            return None
        torn = text[end:]
        with self.path.open("r+b") as handle:
            handle.truncate(len(text[:end].encode("utf-8")))
            os.fsync(handle.fileno())
        logger.warning("%s ended in a torn row (%d bytes, an interrupted write): cut it off; that file is "
                       "scored again", self.path, len(torn.encode("utf-8")))
        return torn

    def done(self, column: str = "file") -> set[str]:
        """The cells of ``column`` in the file's rows (as written: pass :func:`safe_cell` of a value to look it up)."""
        if not self.path.is_file():
            return set()
        with self.path.open(newline="", encoding="utf-8", errors="replace") as handle:
            return {row[column] for row in csv.DictReader(handle) if row.get(column)}

    def write(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Append ``rows`` whole, or none of them: one write, flushed to disk; a failed write is cut back."""
        if rows:
            self._append(_row_text(rows, self.fields))

    def _append(self, text: str) -> None:
        assert self._fd is not None, "use ResultsFile as a context manager"
        data = text.encode("utf-8")
        start = os.fstat(self._fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(self._fd, data[written:])
            os.fsync(self._fd)
        except BaseException:
            with contextlib.suppress(OSError):  # best effort: the error that stopped the write is the one raised
                os.ftruncate(self._fd, start)
            raise


# ------------------------------------------------------------------ identity of the run that wrote the rows


def calibration_hash(pipe) -> str:
    """A short hash of ``pipe``'s calibration: its config (sampler, names, rates) and its tensors (``Q_p`` and the
    image thresholds). Two calibrations that could decide differently hash differently; the same calibration hashes
    the same wherever its folder lies."""
    return _hash_calibration(pipe.calibration)


def folder_calibration_hash(model_dir: str | os.PathLike) -> Optional[str]:
    """:func:`calibration_hash` of the model folder ``model_dir``, reading only its calibration component (not the
    networks); None when it is not calibrated. What ``diffad evaluate`` records per category, so ``diffad card`` can
    tell that results were made by this model."""
    from diffad.model_folder import CALIBRATION_COMPONENT, calibration_config
    from diffad.pipelines.self_aware_inpaint.anomaly_calibration import AnomalyCalibration

    if calibration_config(model_dir) is None:
        return None
    return _hash_calibration(AnomalyCalibration.from_pretrained(str(model_dir), subfolder=CALIBRATION_COMPONENT))


def _hash_calibration(calibration) -> str:
    import numpy as np

    # diffusers' own keys (_name_or_path: where it was loaded from, _diffusers_version, ...) say nothing of what it
    # decides: a moved or copied model folder is the same calibration
    config = {key: value for key, value in dict(calibration.config).items() if not key.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(calibration.state_dict().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.detach().cpu().float().numpy()).tobytes())
    return digest.hexdigest()[:16]


#: The keys that must match to append rows: what decides them.
IDENTITY_KEYS = ("calibration", "method", "map", "threshold", "seed")


def check_identity(sidecar: str | os.PathLike, identity: Mapping[str, Any], results: str | os.PathLike) -> None:
    """Write ``identity`` to ``sidecar`` (JSON), or, when it exists, refuse (``ValueError``, one line) to add rows to
    ``results`` under another calibration, method, map, threshold or seed. A results file with rows but no sidecar
    (another diffad version) is refused too: its rows' identity is unknown."""
    from diffad.files import atomic_write_json

    sidecar, results = Path(sidecar), Path(results)
    if sidecar.is_file():
        try:
            old = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{sidecar} is unreadable ({exc}): delete it with {results.name}, or pass another "
                             "--out") from None
        for key in IDENTITY_KEYS:
            if not _same(old.get(key), identity.get(key)):
                raise ValueError(f"{results} holds rows decided with {key} {old.get(key)!r} (model "
                                 f"{old.get('model')}), this run has {key} {identity.get(key)!r}: pass another "
                                 "--out, or delete both files to start over")
        return
    if results.is_file() and results.stat().st_size > 0:
        raise ValueError(f"{results} has no {sidecar.name} saying which model and settings decided its rows: "
                         "pass another --out, or delete it to start over")
    atomic_write_json(sidecar, dict(identity))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b
