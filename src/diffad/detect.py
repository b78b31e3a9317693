"""``diffad detect``: score a folder of photos with a trained, calibrated model.

For every image it writes one row of ``results.csv`` (file, score, decision, the overlay's
name, and the error for files that could not be read) and one overlay PNG (the anomaly map
as a heat map over the photo, with the inpainting mask's outline). The model runs the sampling
config it was calibrated with (``diffad calibrate --config``); ``--config`` only asserts which.

Every score is reproducible bit for bit: an image's noise comes from ``--seed`` and its decoded
pixels (:func:`diffad.training_utils.image_generator`) and the UNet runs one image at a time, so a
file's score never depends on ``--batch-size``, on its position among the inputs, or on what an
interrupted run already did (scores are written with every digit of their float32 value).
``--batch-size`` is the number of images read, scored and written per step: memory stays bounded
for thousands of images; the CSV is appended and flushed after every batch, so an interrupted run
loses at most one batch, and a re-run skips every file already in the CSV (delete its row to redo it).
Rows are written whole or not at all, and a torn last row (a full disk, a killed run) is cut off on resume
(:class:`diffad.results.ResultsFile`). ``results.json`` beside the CSV records the model, its calibration's hash,
the method, map, threshold and seed that decided the rows; a re-run under other ones is refused in one line.
Every row carries its map and threshold.

Folders are walked by diffad's one rule (:mod:`diffad.inputs`: recursive, symbolic links to folders followed);
every file skipped there is counted and named.

Unreadable files (truncated, not an image, permission denied) are logged on one line each,
recorded in the CSV with ``decision = error``, and skipped: they never abort the run.

Images are read by diffad's one reader (:func:`diffad.data.read_image`: any PIL mode, 16-bit scaled, EXIF
orientation applied). A model that gives a non-finite map for an image writes an error row for it, never a
decision, and the run exits 2.

Several processes: ``accelerate launch [--num_processes N] [--num_machines M ...] -m diffad.cli detect ...`` splits
the files to do across the processes (CPU processes form one gloo group; GPU processes each score on their own GPU),
each image scored as one process scores it (same reader, seeding, one image per UNet call); the overlays are written
by the process that scored the image, and the main process alone holds the lock and writes ``results.csv``, in the
order one process writes it: the same bytes as a one-process run (:func:`_detect_ranks`; GPU processes score with
the GPU's float rounding, not the CPU's). With several machines the inputs and ``--out`` must be on a file system
they share.

Exit codes: 0 when the run completed (even with unreadable files: their count is printed);
2 for bad input (no model, no images found, or not one readable image among them) or non-finite maps;
1 when scoring itself failed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from diffusers.utils import logging as diffusers_logging
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import binary_opening

from diffad.data import ImageReadError, read_image
from diffad.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from diffad.figures import overlay
from diffad.files import file_lock
from diffad.inputs import IMAGE_EXTENSIONS, ImageScan, walk_images
from diffad.launch import launched_accelerator
from diffad.model_folder import require_model_folder
from diffad.networks import INSTALL_HINT, ExportedNetwork
# NONFINITE_ERROR: the error of a file the model could not judge (a NaN/inf map): an error row, never a decision.
from diffad.pipelines.self_aware_inpaint import (MAP_NAMES, METHODS, NONFINITE_ERROR, SAMPLING_PRESETS,
                                                 SelfAwareInpaintPipeline, inspect_photos, threshold_key)
from diffad.precision import add_precision_assertion, check_network_precision, check_precision, inference_device
from diffad.results import ResultsFile, calibration_hash, check_identity, safe_cell

__all__ = [
    "IMAGE_EXTENSIONS",
    "CSV_FIELDS",
    "DetectSummary",
    "find_images",
    "load_pipeline",
    "read_or_record",
    "record_batch",
    "detect",
    "format_score",
    "register",
    "run",
]

logger = logging.getLogger(__name__)

#: The columns of ``results.csv`` (and of the app's download): ``map`` and ``threshold`` decided the row.
CSV_FIELDS = ("file", "score", "decision", "overlay", "error", "map", "threshold")
RESULTS_NAME = "results.csv"
#: Beside ``results.csv``: what decided its rows (:func:`diffad.results.check_identity`).
IDENTITY_NAME = "results.json"
OVERLAY_DIR = "overlays"
LOCK_NAME = ".diffad-detect.lock"
# Overlays are drawn at the photo's own size, capped on the long side to keep files small.
MAX_OVERLAY_SIDE = 512


@dataclass
class DetectSummary:
    """What a :func:`detect` run did. ``scored + failed`` files were new in this run."""

    results_csv: Path
    scored: int = 0
    defective: int = 0
    failed: int = 0
    skipped_done: int = 0
    failed_files: list[str] = field(default_factory=list)
    nonfinite: int = 0  # files the model could not judge (a non-finite map): an error, not a decision
    scan: ImageScan = field(default_factory=ImageScan)  # the inputs found, and every file skipped in a folder


def find_images(inputs: Sequence[str | os.PathLike], *, exclude: Optional[Path] = None) -> ImageScan:
    """Expand files and folders by diffad's one walking rule (:func:`diffad.inputs.walk_images`): a file named
    explicitly is always taken (reported later if it is not an image); a folder gives every image below it,
    symbolic links to folders followed, and names every file it skips.

    Raises:
        FileNotFoundError: an input does not exist, or no image was found at all.
    """
    scan = walk_images(inputs, exclude=exclude)
    if not scan.images:
        skipped = f"; {scan.skipped_summary()}" if scan.skipped else ""
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in "
                                f"{', '.join(str(p) for p in inputs)}{skipped}")
    return scan


def load_pipeline(model: str | os.PathLike, device: Optional[torch.device | str] = None):
    """Load a ``SelfAwareInpaintPipeline`` from a local folder, a folder written by ``diffad export`` (OpenVINO or
    ONNX networks) or a Hub repo id (``org/name``), onto ``device`` (None: :func:`inference_device`; see
    :func:`from_pretrained_quietly`).

    A Hub id needs the network (unset ``HF_HUB_OFFLINE``) or a cached copy.

    Raises:
        FileNotFoundError: ``model`` is neither an existing model folder nor a Hub id.
        ValueError: the model is not calibrated (``diffad calibrate`` first).
    """
    path = Path(model)
    if path.is_dir():
        source = str(require_model_folder(path))
    else:
        source = str(model)
        if source.count("/") != 1 or source.startswith((".", "/")) or path.suffix:
            raise FileNotFoundError(f"--model {source}: no such folder, and not a Hub repo id (org/name)")
    try:
        pipe = from_pretrained_quietly(source, device=device)
    except ImportError as exc:  # a `diffad export` folder without its backend
        raise ValueError(f"--model {model}: {INSTALL_HINT} ({exc})") from None
    except OSError as exc:
        if path.is_dir():
            raise
        raise FileNotFoundError(f"--model {source}: could not load it from the Hub "
                                f"({type(exc).__name__}; offline mode is {os.environ.get('HF_HUB_OFFLINE', '0')})"
                                ) from exc
    _require_calibration(pipe, model)
    check_network_precision(pipe, str(model))  # another export's networks swapped in, or an edited config
    pipe.set_progress_bar_config(disable=True)
    return pipe


def from_pretrained_quietly(source: str | os.PathLike, device: Optional[torch.device | str] = None, **kwargs):
    """``SelfAwareInpaintPipeline.from_pretrained`` without diffusers' "Loading pipeline components" bar (noise
    around a command's own lines, and never part of a one-line error), on ``device`` (None: :func:`inference_device`,
    a GPU when there is one; a `diffad export` folder's networks stay where their runtime runs them)."""
    bars = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        pipe = SelfAwareInpaintPipeline.from_pretrained(str(source), **kwargs)
        device = torch.device(device) if device is not None else inference_device()
        if device.type != "cpu" and not isinstance(pipe.unet, ExportedNetwork):
            pipe = pipe.to(device)
        return pipe
    finally:
        if bars:
            diffusers_logging.enable_progress_bar()


def _require_calibration(pipe, model) -> None:
    if not pipe.is_calibrated:
        raise ValueError(f"--model {model} is not calibrated: run `diffad calibrate --model {model} ...` first")


#: The most bytes of an image's stem kept in its overlay's name: with the hash and suffix, far below the 255
#: bytes a file name may have on every common file system, whatever the image's name.
OVERLAY_STEM_BYTES = 100


def _overlay_name(path: Path) -> str:
    """A unique, stable overlay file name that fits any file system: the image's stem (cut to
    :data:`OVERLAY_STEM_BYTES` bytes of UTF-8, at a character boundary) plus a short hash of its full path."""
    digest = hashlib.sha1(str(path).encode("utf-8", errors="surrogateescape")).hexdigest()[:8]
    stem = path.stem.encode("utf-8", errors="surrogateescape")[:OVERLAY_STEM_BYTES].decode("utf-8", errors="ignore")
    return f"{stem}_{digest}.png"


def read_error_words(exc: BaseException) -> str:
    """Why a file could not be read, in words on one line: an :class:`~diffad.data.ImageReadError`'s reason, else
    the error's own text (never a class name or a traceback)."""
    text = exc.reason if isinstance(exc, ImageReadError) else (str(exc) or type(exc).__name__)
    return " ".join(text.split())


def result_base(pipe, method: str, anomaly_map: str) -> dict[str, str]:
    """The cells every row of a run shares: its map and the threshold that decided it (empty cells elsewhere)."""
    threshold = pipe.calibration.threshold(threshold_key(method, anomaly_map))
    return {"score": "", "overlay": "", "error": "", "map": anomaly_map,
            "threshold": "" if threshold is None else format_score(threshold)}


def read_or_record(path: Path, table, summary: DetectSummary,
                   base: Optional[dict[str, str]] = None) -> tuple[Optional[Image.Image], Optional[dict[str, str]]]:
    """``(photo, None)`` read by diffad's reader, or ``(None, row)`` for an unreadable file: its error row (``base``'s
    cells, the reason in words) written whole to ``table`` (a :class:`diffad.results.ResultsFile`) and counted in
    ``summary`` (``diffad detect`` and ``diffad watch``)."""
    photo, row = _read(path, base)
    if row is not None:
        table.write([row])
        _count(summary, [row])
    return photo, row


def _read(path: Path, base: Optional[dict[str, str]] = None) -> tuple[Optional[Image.Image], Optional[dict[str, str]]]:
    """``(photo, None)``, or ``(None, error row)`` for a file diffad's reader cannot read (logged on one line)."""
    try:
        return read_image(path), None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        message = read_error_words(exc)
        logger.warning("skipping unreadable file %s (%s)", path, message)
        return None, {**(base or {}), "file": str(path), "score": "", "decision": "error", "overlay": "",
                      "error": message}


def _count(summary: DetectSummary, rows: Iterable[dict[str, str]]) -> None:
    """Count written rows in ``summary``: an error row is a failed file (a non-finite map's among them), any other
    a scored one."""
    for row in rows:
        if row["decision"] == "error":
            summary.failed += 1
            summary.failed_files.append(row["file"])
            summary.nonfinite += row["error"] == NONFINITE_ERROR
        else:
            summary.scored += 1
            summary.defective += row["decision"] == "defect"


def _batches(paths: Iterable[Path], batch_size: int, summary: DetectSummary, table,
             base: dict[str, str]) -> Iterator[list[tuple[Path, Image.Image]]]:
    """Yield lists of up to ``batch_size`` decoded images; unreadable files are recorded and skipped."""
    batch: list[tuple[Path, Image.Image]] = []
    for path in paths:
        photo, _ = read_or_record(path, table, summary, base)
        if photo is not None:
            batch.append((path, photo))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _save_overlay(photo: Image.Image, anomaly_map: np.ndarray, mask: Optional[np.ndarray],
                  vmax: Optional[float], out_path: Path) -> None:
    """:func:`render_overlay`, written atomically to ``out_path`` (PNG)."""
    tmp = out_path.with_name(out_path.name + ".tmp")
    render_overlay(photo, anomaly_map, mask, vmax).save(tmp, format="PNG")
    os.replace(tmp, out_path)


def render_overlay(photo: Image.Image, anomaly_map: np.ndarray, mask: Optional[np.ndarray],
                   vmax: Optional[float]) -> Image.Image:
    """Draw ``anomaly_map`` (R, R) and the suspect-pixel mask's outline (R, R bool) over ``photo``, at the photo's
    size capped to :data:`MAX_OVERLAY_SIDE`; the map is divided by twice the image threshold (``vmax``) so that
    the middle of the colour scale is the pass/fail threshold on every image (``diffad detect`` and the app)."""
    photo = photo.copy()
    photo.thumbnail((MAX_OVERLAY_SIDE, MAX_OVERLAY_SIDE), Image.Resampling.BILINEAR)
    size = photo.size
    heat = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR)
    heat_np = np.asarray(heat, dtype=np.float32)
    if vmax is not None and vmax > 0:
        # Scale by the calibrated threshold so colours mean the same thing on every image:
        # 0.5 of the colour range is the pass/fail threshold.
        heat_np = np.clip(heat_np / (2.0 * vmax), 0.0, 1.0)
    outline = None
    if mask is not None:
        # The calibrated mask flags ~(1 - percentile) of the pixels of any image, mostly isolated ones;
        # outlining those would hide the photo, so only regions of at least 2 x 2 model pixels are drawn.
        mask = binary_opening(np.asarray(mask, dtype=bool), structure=np.ones((2, 2), dtype=bool))
        mask_img = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        outline = np.asarray(mask_img) > 127
    return overlay(np.asarray(photo, dtype=np.uint8), heat_np, mask_outline=outline)


def format_score(score: float) -> str:
    """A score as written to ``results.csv``: the shortest text that reads back as the same float32."""
    return str(np.float32(score))


def _check_options(pipe, model, method: str, anomaly_map: str, config: Optional[str]) -> None:
    """Refuse options the loaded model cannot honour, each with one line saying what to do."""
    _require_calibration(pipe, model)
    if anomaly_map not in pipe.map_names(method):
        if anomaly_map == "learned":
            raise ValueError(f"--anomaly-map learned needs a segmenter in {model}: train one with "
                             "training/train_segmenter.py, or use --anomaly-map multiscale")
        raise ValueError(f"--anomaly-map {anomaly_map} exists only with --method self_aware (it uses the mask "
                         f"stage's noise error); with --method {method} choose from "
                         f"{', '.join(pipe.map_names(method))}")
    key = threshold_key(method, anomaly_map)
    if pipe.calibration.threshold(key) is None:  # no threshold: no decision, never "ok"
        raise ValueError(f"{model} has no calibrated threshold for {key}: run "
                         f"`diffad calibrate --model {model} ...` (it fits one for every map)")
    fitted = pipe.calibration.sampling  # a diffad 0.1 calibration says to recalibrate
    if config is not None and fitted.preset_name != config:
        used = f"the {fitted.preset_name}" if fitted.preset_name else "a custom"
        raise ValueError(f"--config {config}: {model} was calibrated with {used} sampling config, and detect "
                         f"runs the calibration's; "
                         f"run `diffad calibrate --model {model} --config {config} ...` first, or drop --config")


def detect(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    anomaly_map: Optional[str] = None,
    method: str = "self_aware",
    seed: int = 0,
    config: Optional[str] = None,
    precision: Optional[str] = None,
    pipe=None,
    accelerator=None,
) -> DetectSummary:
    """Score ``inputs`` with the model, writing ``out_dir/results.csv`` and ``out_dir/overlays/*.png``.

    The model runs the sampling config of its calibration. Each image's noise generator is
    ``image_generator(seed, photo)`` and the pipeline is called with ``batch_size=1`` (torch's batched
    convolutions differ at 1e-7 between batch sizes), so a file's score is bit-identical whatever
    ``batch_size``, its position among the inputs, or a resumed run.

    Args:
        model: a model folder or Hub repo id (ignored when ``pipe`` is given).
        inputs: image files and/or folders (searched recursively).
        out_dir: the output folder; an existing ``results.csv`` there is resumed.
        batch_size: images read, scored and written per step (bounds memory; the UNet still runs one
            image at a time). Never changes a score.
        anomaly_map: one of ``MAP_NAMES``: ``"multiscale"``, ``"learned"`` (needs a segmenter), ``"noise_error"``
            or ``"combined"`` (``method="self_aware"`` only); None: the method's default (``combined`` for
            ``self_aware``, ``multiscale`` for ``denoise``).
        method: one of ``METHODS``: ``"self_aware"`` (default) or ``"denoise"``.
        seed: with each image's decoded pixels, seeds that image's diffusion noise.
        config: None, or the preset (``"fast"``/``"thesis"``) the calibration must have been made with: an
            assertion, never a switch (``diffad calibrate --config`` picks the sampler).
        precision: None, or ``"auto"``/``"fp32"``/``"bf16"``: the precision the calibration must have (an
            assertion too: ``diffad calibrate --precision`` picks it).
        pipe: an already loaded pipeline (tests, the demo).
        accelerator: an ``accelerate.Accelerator`` of several processes (``accelerate launch``): the files are
            split across them and the main process alone writes ``results.csv``, byte for byte what one process
            writes (:func:`_detect_ranks`); None: one process.

    Returns:
        A :class:`DetectSummary` (on every process: the counts of the whole run).

    Raises:
        FileNotFoundError / ValueError: bad model, inputs or options.
    """
    anomaly_map = _checked_arguments(batch_size, anomaly_map, method, config)
    paths, scan = _images_to_score(inputs, out_dir)
    ranks = accelerator is not None and accelerator.num_processes > 1
    if pipe is None:
        pipe = load_pipeline(model, device=accelerator.device if ranks else None)
    elif ranks and accelerator.device.type != "cpu":
        pipe = pipe.to(accelerator.device)  # each GPU rank on its own device
    _check_options(pipe, model, method, anomaly_map, config)
    check_precision(pipe, precision, str(model))

    out_dir = Path(out_dir)
    (out_dir / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
    identity = {"model": str(model), "calibration": calibration_hash(pipe), "method": method,
                "map": anomaly_map, "threshold": pipe.calibration.threshold(threshold_key(method, anomaly_map)),
                "seed": seed}
    if ranks:
        summary = _detect_ranks(accelerator, pipe, paths, out_dir, identity, batch_size, anomaly_map, method, seed)
    else:
        with _exclusive(out_dir):
            check_identity(out_dir / IDENTITY_NAME, identity, out_dir / RESULTS_NAME)
            summary = _detect_into(pipe, paths, out_dir, batch_size, anomaly_map, method, seed)
    summary.scan = scan
    return summary


def _checked_arguments(batch_size: int, anomaly_map: Optional[str], method: str, config: Optional[str]) -> str:
    """Check :func:`detect`'s options (``ValueError`` naming the flag and its choices) before anything is loaded;
    return the anomaly map to use (``anomaly_map``, or the method's default)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if anomaly_map is None:
        anomaly_map = SelfAwareInpaintPipeline.default_map(method)
    if anomaly_map not in MAP_NAMES:
        raise ValueError(f"--anomaly-map must be one of {', '.join(MAP_NAMES)}, got {anomaly_map!r}")
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if config is not None and config not in SAMPLING_PRESETS:
        raise ValueError(f"--config must be one of {', '.join(SAMPLING_PRESETS)}, got {config!r}")
    return anomaly_map


def _images_to_score(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[list[Path], ImageScan]:
    """The images under ``inputs`` (:func:`find_images`) outside ``out_dir`` (never our own overlays, when the
    output folder lies inside an input folder), and the scan; the files left out are logged.

    Raises:
        ValueError: no image to score.
    """
    out_root = Path(out_dir).resolve()
    paths, own = [], 0
    scan = find_images(inputs, exclude=out_root)
    for p in scan.images:  # never score our own overlays when --out lies inside an input folder
        if out_root == p.resolve().parent or out_root in p.resolve().parents:
            own += 1
        else:
            paths.append(p)
    if own:
        logger.info("left out %d files inside the output folder %s", own, out_dir)
    for path, reason in scan.skipped:
        logger.info("skipped %s: %s", path, reason)
    if not paths:
        raise ValueError(f"no images to score in {', '.join(map(str, inputs))} outside the output folder {out_dir}")
    return paths, scan


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir/.diffad-detect.lock`` (an OS lock, released even by a killed process) for the run: a second
    ``diffad detect`` into the same folder fails at once with one line instead of interleaving rows."""
    try:
        with file_lock(out_dir / LOCK_NAME, blocking=False):
            yield
    except BlockingIOError:
        raise ValueError(f"another diffad detect is writing to {out_dir}: wait for it to finish, or pass "
                         "another --out") from None


def _detect_into(pipe, paths: list[Path], out_dir: Path, batch_size: int, anomaly_map: str, method: str,
                 seed: int) -> DetectSummary:
    results_csv = out_dir / RESULTS_NAME
    summary = DetectSummary(results_csv=results_csv)
    with ResultsFile(results_csv, CSV_FIELDS) as table:
        done = table.done()
        todo = [p for p in paths if safe_cell(str(p)) not in done]
        summary.skipped_done = len(paths) - len(todo)
        if summary.skipped_done:
            logger.info("%d of %d images already in %s: skipped", summary.skipped_done, len(paths), results_csv)
        base = result_base(pipe, method, anomaly_map)
        for batch in _batches(todo, batch_size, summary, table, base):
            record_batch(pipe, batch, table, out_dir, method=method, anomaly_map=anomaly_map, seed=seed,
                         summary=summary)
            logger.info("scored %d/%d images", summary.scored + summary.failed, len(todo))
    return summary


class _OneProcessOrder:
    """The order in which one process writes rows (:func:`_detect_into`): fed every file's row in input order, it
    returns the rows due now. An unreadable file's row is written when the file is read; the rows of readable files
    when ``batch_size`` of them are judged, and at the end."""

    def __init__(self, batch_size: int):
        self.batch_size, self.pending = batch_size, []

    def feed(self, row: dict[str, str], read: bool) -> list[dict[str, str]]:
        """The rows due once the file of ``row`` has been read (``read``: it was decoded and judged)."""
        if not read:
            return [row]
        self.pending.append(row)
        if len(self.pending) < self.batch_size:
            return []
        due, self.pending = self.pending, []
        return due

    def finish(self) -> list[dict[str, str]]:
        """The last, short batch."""
        due, self.pending = self.pending, []
        return due


def _detect_ranks(accelerator, pipe, paths: list[Path], out_dir: Path, identity: dict, batch_size: int,
                  anomaly_map: str, method: str, seed: int) -> DetectSummary:
    """:func:`_detect_into` over several processes (``accelerate launch``), writing the same bytes.

    The main process alone takes the output lock, checks the run's identity and opens ``results.csv`` (resuming
    it: files already in it are skipped), then sends the files to do to every process. The files go in rounds of
    ``batch_size`` per process, each process reading and judging a contiguous share of the round (and writing its
    overlays); the rows are gathered and the main process writes them in :class:`_OneProcessOrder`. A failure on
    any process stops all of them at the end of the round, with its message.
    """
    main = accelerator.is_main_process
    results_csv = out_dir / RESULTS_NAME
    summary = DetectSummary(results_csv=results_csv)
    with contextlib.ExitStack() as stack:
        plan: list = [None, []]  # [the main process's error, or None; the files to do]
        table = None
        if main:
            try:
                stack.enter_context(_exclusive(out_dir))
                check_identity(out_dir / IDENTITY_NAME, identity, results_csv)
                table = stack.enter_context(ResultsFile(results_csv, CSV_FIELDS))
                done = table.done()
                plan = [None, [str(p) for p in paths if safe_cell(str(p)) not in done]]
            except (ValueError, OSError) as exc:
                broadcast_object_list([str(exc) or type(exc).__name__, []])
                raise
        broadcast_object_list(plan)
        if plan[0] is not None:
            raise SystemExit(EXIT_USAGE)  # the main process says why, on one line
        todo = [Path(p) for p in plan[1]]
        summary.skipped_done = len(paths) - len(todo)
        if summary.skipped_done and main:
            logger.info("%d of %d images already in %s: skipped", summary.skipped_done, len(paths), results_csv)
        base = result_base(pipe, method, anomaly_map)
        order = _OneProcessOrder(batch_size)
        step = batch_size * accelerator.num_processes
        for start in range(0, len(todo), step):
            with accelerator.split_between_processes(list(range(start, min(start + step, len(todo))))) as mine:
                share = _judge_share(pipe, [(i, todo[i]) for i in mine], out_dir, base, method, anomaly_map, seed)
            shares = gather_object([share])
            failures = [f"process {rank}: {error}" for rank, (error, _) in enumerate(shares) if error]
            if failures:
                if not main:
                    raise SystemExit(EXIT_FAILURE)  # the main process says why, on one line
                raise RuntimeError(f"detect failed on {'; '.join(failures)}")
            due: list[dict[str, str]] = []
            for _, read, row in sorted((r for _, records in shares for r in records), key=lambda r: r[0]):
                due += order.feed(row, read)
            _count(summary, due)
            if table is not None:
                table.write(due)
            if main:
                logger.info("scored %d/%d images", min(start + step, len(todo)), len(todo))
        due = order.finish()
        _count(summary, due)
        if table is not None:
            table.write(due)
    accelerator.wait_for_everyone()  # the main process has written and released the lock
    return summary


def _judge_share(pipe, files: list[tuple[int, Path]], out_dir: Path, base: dict[str, str], method: str,
                 anomaly_map: str, seed: int) -> tuple[Optional[str], list[tuple[int, bool, dict[str, str]]]]:
    """One process's share of a round: ``(None, [(index, read, row), ...])``, or ``(error, [])`` when it failed."""
    try:
        records, batch, indices = [], [], []
        for index, path in files:
            photo, row = _read(path, base)
            if row is not None:
                records.append((index, False, row))
            else:
                batch.append((path, photo))
                indices.append(index)
        if batch:
            rows = _judge(pipe, batch, out_dir, method=method, anomaly_map=anomaly_map, seed=seed)
            records += [(index, True, row) for index, row in zip(indices, rows)]
        return None, records
    except Exception as exc:  # every process must reach the gather: the error travels with it
        logger.exception("detect failed on this process")
        return f"{type(exc).__name__}: {exc}", []


def record_batch(pipe, batch: Sequence[tuple[Path, Image.Image]], table, out_dir: Path, *,
                 method: str, anomaly_map: str, seed: int, summary: DetectSummary) -> list[dict[str, str]]:
    """Judge decoded photos (:func:`~diffad.pipelines.self_aware_inpaint.inspect_photos`), write their overlays into
    ``out_dir`` and their rows, whole, to ``table`` (a :class:`diffad.results.ResultsFile`; each row with its map and
    threshold), count them in ``summary``; return the rows (``diffad detect`` and ``diffad watch``)."""
    rows = _judge(pipe, batch, out_dir, method=method, anomaly_map=anomaly_map, seed=seed)
    table.write(rows)  # the batch's rows, whole, on disk
    _count(summary, rows)
    return rows


def _judge(pipe, batch: Sequence[tuple[Path, Image.Image]], out_dir: Path, *, method: str, anomaly_map: str,
           seed: int) -> list[dict[str, str]]:
    """The rows of decoded photos, their overlays written into ``out_dir`` (nothing else written)."""
    base = result_base(pipe, method, anomaly_map)
    threshold = pipe.calibration.threshold(threshold_key(method, anomaly_map))  # the overlays' colour scale
    verdicts = inspect_photos(pipe, [img for _, img in batch], method=method, anomaly_map=anomaly_map, seed=seed)
    rows = []
    for (path, photo), verdict in zip(batch, verdicts):
        if verdict.error:
            # the model gave NaN/inf: no judgement is possible, so no decision (never "ok")
            logger.error("%s: %s", path, NONFINITE_ERROR)
            rows.append({**base, "file": str(path), "decision": "error", "error": NONFINITE_ERROR})
        else:
            name = _overlay_name(path)
            _save_overlay(photo, verdict.anomaly_map, verdict.inpaint_mask, threshold, out_dir / OVERLAY_DIR / name)
            rows.append({**base, "file": str(path), "score": format_score(verdict.score), "decision": verdict.decision,
                         "overlay": f"{OVERLAY_DIR}/{name}"})
    return rows


def register(subparsers) -> None:
    """Add ``diffad detect`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "detect", help="score photos: results.csv (file, score, decision) and an overlay PNG per image",
        description="Score images with a trained, calibrated model. Writes OUT/results.csv and "
                    "OUT/overlays/*.png; a re-run skips images already in the CSV; unreadable files are "
                    "reported and skipped. Exit code 0 when the run completed (the number of unreadable "
                    "files is printed), 2 for bad input or when no image could be read. Several processes or "
                    "machines: accelerate launch [...] -m diffad.cli detect <same arguments>; one results.csv, the "
                    "same bytes as one process writes.")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER",
                        help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="model folder or Hub repo id (org/name)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images read, scored and written per step (default: 8); bounds memory, never "
                             "changes a score: the UNet runs one image at a time")
    parser.add_argument("--anomaly-map", choices=MAP_NAMES, default=None,
                        help="the map scored and drawn (default: combined for self_aware, multiscale for "
                             "denoise): the multi-scale reconstruction error, the learned segmenter's map (needs a "
                             "segmenter), the mask stage's noise error, or combined, the mean of those two "
                             "(noise_error and combined: --method self_aware only)")
    parser.add_argument("--method", choices=METHODS, default="self_aware",
                        help="self-aware inpainting (default) or the basic denoising baseline")
    parser.add_argument("--config", choices=SAMPLING_PRESETS, default=None,
                        help="assert the sampling preset the model was calibrated with (detect always runs the "
                             "calibration's; `diffad calibrate --config` picks it): exit 2 when it differs")
    add_precision_assertion(parser, "detect")
    parser.add_argument("--seed", type=int, default=0,
                        help="with each image's pixels, seeds that image's diffusion noise (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad detect``; see the module docstring for the exit codes. Under ``accelerate launch`` with several
    processes, the main process alone prints (the others exit with the same code, silently)."""
    with launched_accelerator() as accelerator:  # several processes under `accelerate launch`, else None
        if accelerator is not None and not accelerator.is_main_process:
            logging.getLogger("diffad").setLevel(logging.WARNING)  # progress once, from the main process
        summary = detect(args.model, args.inputs, args.out, batch_size=args.batch_size,
                         anomaly_map=args.anomaly_map, method=args.method, seed=args.seed, config=args.config,
                         precision=args.precision, accelerator=accelerator)
    if accelerator is not None and not accelerator.is_main_process:
        return EXIT_USAGE if summary.nonfinite or (summary.scored == 0 and summary.skipped_done == 0) else EXIT_OK
    skipped = summary.scan.skipped_summary()
    print(f"scored {summary.scored} images ({summary.defective} defective), "
          f"{summary.failed} unreadable, {summary.skipped_done} already done"
          f"{'; not images, ' + skipped if skipped else ''}; results in {summary.results_csv}")
    if summary.nonfinite:
        raise ValueError(f"the model produced non-finite anomaly maps for {summary.nonfinite} images (error rows "
                         f"in {summary.results_csv}): check or retrain the model")
    if summary.scored == 0 and summary.skipped_done == 0:
        raise ValueError(f"none of the {summary.failed} input files could be read as an image")
    return 0
