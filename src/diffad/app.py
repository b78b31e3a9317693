"""``diffad app``: a Gradio page for the inspection station.

Drop photos (or a zip of a folder) on the page and see, for each part, the heat map over the photo, the score and
PASS/FAIL; move the threshold and every decision is re-made from the stored scores, without running the model
again. Beside the threshold, a histogram of the held-out normal images' scores it was calibrated on (stored in the
calibration), the threshold line and the scores of the session's inspected images, and the expected false-positive
rate on normal parts at the threshold shown (the share of those held-out scores above it); a calibration made before
the scores were stored says so instead. Switch the map (``combined``, ``multiscale``, ...) the same way: one model
call returns every map. Results download as a CSV with ``diffad detect``'s columns. Images are read by the same
reader as ``detect`` (:func:`diffad.data.read_image`), scored with the same seeding rule (an image's noise from
``--seed`` and its pixels), so a file gets the score ``detect`` gives it; a file that cannot be read shows its error
in the table.

Users are kept apart: every browser session has its own state (:class:`Session`: its inspected files) and its
own temporary folder (a zip's extracted images, its ``results.csv``), deleted when the session ends and, with
every other session's, when the app stops (:func:`close_app`). A zip is extracted member by member, streamed,
within :data:`ZIP_MAX_MEMBERS`, :data:`ZIP_MAX_TOTAL_BYTES` and :data:`ZIP_MAX_RATIO` (a zip bomb gets an error
row, not the disk); every image is within the reader's pixel budget (:func:`diffad.data.max_image_pixels`). The
CSV is written by diffad's one results writer (:mod:`diffad.results`: no cell a spreadsheet would run), with the
map and threshold that decided each row. An error row names the upload as the user named it, in words.

The logic (:class:`Inspector`) is separate from the page (:func:`build_app`), so it is tested without a browser;
``tests/test_app_browser.py`` drives the page in headless Chromium.

Gradio is an optional extra: ``pip install 'diffad[app]'``.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np
from huggingface_hub.utils import HFValidationError, validate_repo_id

from diffad import __version__
from diffad.data import read_image
from diffad.detect import (CSV_FIELDS, NONFINITE_ERROR, format_score, load_pipeline, read_error_words,
                           render_overlay)
from diffad.figures import score_histogram
from diffad.inputs import skip_reason
from diffad.listen import check_listen_address
from diffad.model_folder import CARD_FILE, MODEL_INDEX, TRAINING_LOG, is_exported, require_model_folder
from diffad.files import atomic_write_text
from diffad.pipelines.self_aware_inpaint import image_generator, threshold_key
from diffad.precision import add_precision_assertion, check_precision
from diffad.results import csv_text

__all__ = ["Inspection", "Inspector", "Session", "SessionFolders", "Upload", "build_app",
           "close_app", "expand_uploads", "register", "register_space", "run", "write_space"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "the app needs Gradio: pip install 'diffad[app]'"


@dataclass
class Inspection:
    """One inspected file: every map's score (one model call), or the error that stopped it."""

    file: str
    scores: dict[str, float] = field(default_factory=dict)
    maps: dict[str, np.ndarray] = field(default_factory=dict)
    mask: Optional[np.ndarray] = None
    photo: Any = None
    error: str = ""
    seconds: float = 0.0


class Inspector:
    """Scores photos as ``diffad detect`` does and re-decides them for any map and threshold.

    Args:
        pipe: a calibrated :class:`~diffad.pipelines.self_aware_inpaint.SelfAwareInpaintPipeline`.
        method: ``"self_aware"`` (default) or ``"denoise"``.
        seed: the seed of every image's noise (with its pixels), as ``detect --seed``.
    """

    def __init__(self, pipe, method: str = "self_aware", seed: int = 0):
        self.pipe, self.method, self.seed = pipe, method, seed
        self.model_calls = 0
        self._lock = threading.Lock()  # one model call at a time (the app's queue may run sessions in parallel)

    @property
    def map_names(self) -> tuple[str, ...]:
        """The maps with a calibrated threshold (the only ones that can decide)."""
        return tuple(m for m in self.pipe.map_names(self.method) if self.threshold(m) is not None)

    @property
    def default_map(self) -> str:
        return self.pipe.default_map(self.method)

    def threshold(self, name: str) -> Optional[float]:
        """The calibrated image threshold of map ``name``."""
        return self.pipe.calibration.threshold(threshold_key(self.method, name))

    def inspect(self, path: str | Path, name: Optional[str] = None) -> Inspection:
        """Read and score one file; a file that cannot be read (or judged) gives an :class:`Inspection` with its
        error, never an exception."""
        name = name or Path(path).name
        try:
            photo = read_image(path)
        except (OSError, ValueError) as exc:  # the upload as the user named it, and why, in words
            return Inspection(file=name, error=f"{name}: {read_error_words(exc)}")
        start = time.perf_counter()
        with self._lock:
            out = self.pipe([photo], method=self.method, generator=[image_generator(self.seed, photo)],
                            batch_size=1, output_type="np")
            self.model_calls += 1
        result = Inspection(file=name, photo=photo, mask=out.inpaint_masks[0], seconds=time.perf_counter() - start)
        for m in self.map_names:
            result.maps[m] = out.anomaly_maps[m][0]
            result.scores[m] = float(out.scores[m][0])
        if not all(np.isfinite(v) for v in result.scores.values()):
            result.error = NONFINITE_ERROR
        return result

    @staticmethod
    def decision(item: Inspection, name: str, threshold: float) -> str:
        """``"defect"``, ``"ok"`` or ``"error"`` (a NaN score is never ok)."""
        if item.error or name not in item.scores:
            return "error"
        return "ok" if item.scores[name] <= threshold else "defect"

    def rows(self, items: Sequence[Inspection], name: str, threshold: float) -> list[dict[str, str]]:
        """``detect``'s CSV rows for ``items`` at map ``name`` and ``threshold`` (both in every row)."""
        return [{"file": it.file, "score": "" if it.error else format_score(it.scores[name]),
                 "decision": self.decision(it, name, threshold),
                 "overlay": "" if it.error else f"overlay of {it.file}", "error": it.error, "map": name,
                 "threshold": format_score(threshold)} for it in items]

    def heldout_scores(self, name: str) -> Optional[np.ndarray]:
        """The scores of the held-out normal images the threshold of map ``name`` was fitted on (the calibration's),
        or None when the calibration stores none (made before diffad stored them)."""
        return self.pipe.calibration.heldout_scores_of(threshold_key(self.method, name))

    def false_positive_rate(self, name: str, threshold: float) -> Optional[float]:
        """The expected false-positive rate on normal parts at ``threshold``: the share of the held-out normal scores
        above it (decided as parts are: ``score > threshold``); None without stored scores."""
        scores = self.heldout_scores(name)
        return None if scores is None or not len(scores) else float(np.mean(scores > threshold))

    def false_positive_text(self, name: str, threshold: float) -> str:
        """Markdown for the page beside the threshold: the expected false-positive rate, or why there is none."""
        rate = self.false_positive_rate(name, threshold)
        if rate is None:
            return ("No histogram: this model's calibration stores no held-out scores (calibrated by an older "
                    "diffad); recalibrate it (`diffad calibrate`) to see them and the expected false-positive rate.")
        scores = self.heldout_scores(name)
        return (f"Expected false-positive rate on normal parts at {threshold:.4g}: **{rate:.1%}** "
                f"({int(np.sum(scores > threshold))} of {len(scores)} held-out normal images score above it).")

    def histogram(self, name: str, threshold: float, items: Sequence[Inspection] = ()):
        """:func:`diffad.figures.score_histogram` of map ``name``: the held-out normal scores, ``threshold`` and the
        scores of ``items`` (one session's inspected files)."""
        scores = [it.scores[name] for it in items if not it.error and name in it.scores]
        return score_histogram(self.heldout_scores(name), threshold, scores, title=f"{self.method}/{name} scores")

    def overlay(self, item: Inspection, name: str):
        """The heat map of ``name`` and the mask outline over the photo (colour scale: the calibrated threshold)."""
        return render_overlay(item.photo, item.maps[name], item.mask, self.threshold(name))


#: A zip upload may hold at most this many entries (files and folders).
ZIP_MAX_MEMBERS = 10_000
#: The most bytes a zip upload may extract, all members together (2 GiB: hundreds of photos).
ZIP_MAX_TOTAL_BYTES = 2 << 30
#: The most a zip member may grow when extracted (photos compress 1-10x; a zip bomb's members ~1000x).
ZIP_MAX_RATIO = 200
_CHUNK = 1 << 20


class Upload(NamedTuple):
    """One uploaded file as the app inspects it: its name as the user knows it, the file to read (None when it was
    refused), and why it was refused (words; empty when it is read)."""

    name: str
    path: Optional[Path]
    error: str = ""


def expand_uploads(paths: Sequence[str], workdir: Path) -> list[Upload]:
    """Every uploaded file as an :class:`Upload`; a zip contributes its members by diffad's one rule (images are
    extracted into ``workdir``, every other member is an error row naming it), within the zip caps."""
    uploads: list[Upload] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() != ".zip":
            uploads.append(Upload(path.name, path))
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                uploads += _extract_zip(archive, path.name, workdir)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            logger.warning("%s: not a readable zip archive (%s)", path, exc)
            uploads.append(Upload(path.name, None, f"{path.name}: not a readable zip archive"))
    return uploads


def _extract_zip(archive: zipfile.ZipFile, zip_name: str, workdir: Path) -> list[Upload]:
    """The members of ``archive`` as uploads: caps checked on the headers first, then each member streamed into
    ``workdir`` under a short name of diffad's, counting the bytes it really holds (a header can lie)."""
    members = archive.infolist()
    if len(members) > ZIP_MAX_MEMBERS:
        return [Upload(zip_name, None, f"{zip_name}: refused, it holds {len(members)} files, over the limit of "
                                       f"{ZIP_MAX_MEMBERS}: send it in parts")]
    workdir.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="zip-", dir=workdir))
    uploads: list[Upload] = []
    total = 0
    for index, member in enumerate(members):
        if member.is_dir():
            continue
        inner = PurePosixPath(member.filename)
        shown = f"{zip_name}/{inner.as_posix()}"
        reason = "a path outside the archive" if inner.is_absolute() or ".." in inner.parts else skip_reason(inner.name)
        if reason is not None:
            uploads.append(Upload(shown, None, f"{shown}: skipped, {reason}"))
            continue
        ratio = member.file_size / max(member.compress_size, 1)
        if ratio > ZIP_MAX_RATIO:
            uploads.append(Upload(shown, None, f"{shown}: refused, a compression ratio of {ratio:.0f}:1 is over "
                                               f"the limit of {ZIP_MAX_RATIO}:1 (a zip bomb?)"))
            continue
        if total + member.file_size > ZIP_MAX_TOTAL_BYTES:
            uploads.append(Upload(shown, None, f"{shown}: refused, {_OVER_TOTAL}"))
            continue
        dest = target / f"{index:05d}{inner.suffix.lower()}"  # a short name of ours: fits any file system
        try:
            total += _stream_member(archive, member, dest, ZIP_MAX_TOTAL_BYTES - total)
        except ValueError as exc:
            dest.unlink(missing_ok=True)
            uploads.append(Upload(shown, None, f"{shown}: refused, {exc}"))
            continue
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
            dest.unlink(missing_ok=True)
            logger.warning("%s: cannot extract (%s)", shown, exc)
            uploads.append(Upload(shown, None, f"{shown}: damaged or encrypted in the archive, cannot extract it"))
            continue
        uploads.append(Upload(shown, dest))
    return uploads


_OVER_TOTAL = (f"the archive's files would take more than {ZIP_MAX_TOTAL_BYTES >> 20} MiB uncompressed "
               "(a zip bomb?): send it in parts")


def _stream_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, dest: Path, budget: int) -> int:
    """Copy ``member`` to ``dest`` in chunks, stopping (``ValueError``) as soon as it holds more than its header
    says, more than :data:`ZIP_MAX_RATIO` times its compressed size, or more than ``budget`` bytes; returns the
    bytes written."""
    written = 0
    with archive.open(member) as source, dest.open("wb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > budget:
                raise ValueError(_OVER_TOTAL)
            if written > member.file_size or written > ZIP_MAX_RATIO * max(member.compress_size, 1):
                raise ValueError("it holds more than its zip header says (a zip bomb?)")
            sink.write(chunk)
    return written


class SessionFolders:
    """The app's temporary folders: one root per app (``diffad-app-*``, made at the first session, never at
    start-up) and one folder per session inside it. :meth:`close` deletes them all (when the app stops, and at
    exit)."""

    def __init__(self) -> None:
        self.root: Optional[Path] = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def ensure_root(self) -> Path:
        """The app's root folder, made now if needed."""
        with self._lock:
            if self.root is None or not self.root.is_dir():
                self.root = Path(tempfile.mkdtemp(prefix="diffad-app-"))
            return self.root

    def new_folder(self) -> Path:
        """A new, empty folder for one session."""
        return Path(tempfile.mkdtemp(prefix="session-", dir=self.ensure_root()))

    def close(self) -> None:
        """Delete every session's folder and the root."""
        with self._lock:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None


@dataclass
class Session:
    """One browser session's state: its inspected files and its own temporary folder."""

    folder: Path
    items: list[Inspection] = field(default_factory=list)
    uploads: list[Path] = field(default_factory=list)  # gradio's copies of this session's uploads

    @property
    def results_csv(self) -> Path:
        return self.folder / "results.csv"

    def close(self) -> None:
        """Delete the session's folder, and gradio's copies of its uploads where they lie in the app's folder
        (gradio calls this when the session ends)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        app_root = self.folder.parent.resolve()
        for upload in self.uploads:
            if upload.resolve().is_relative_to(app_root):
                upload.unlink(missing_ok=True)

    def __deepcopy__(self, memo) -> "Session":  # gradio may copy states: a session stays one object
        return self


def _end_session(session: Optional[Session]) -> None:
    if isinstance(session, Session):
        session.close()


def close_app(demo) -> None:
    """Delete every session folder of the page ``demo`` (built by :func:`build_app`): run when the app stops."""
    folders = getattr(demo, "diffad_session_folders", None)
    if folders is not None:
        folders.close()


def _card_table(lines: list[str], header: str) -> list[str]:
    """The first markdown table of ``lines`` whose header row contains ``header``: header, separator and rows."""
    for i, line in enumerate(lines):
        if line.startswith("|") and header in line and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            end = i
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            return lines[i:end]
    return []


def model_summary(model: str | Path, inspector: Inspector) -> str:
    """Markdown: the model (a local folder by its name only: the page shows no path of this machine), category,
    resolution, sampler, precision, UNet passes, and the card's measured metrics."""
    pipe = inspector.pipe
    sampling = pipe.calibration.sampling
    shown = Path(model).name if Path(model).is_dir() else str(model)  # a folder's name, never its local path
    lines = [f"**Model** `{shown}`: {pipe.resolution} px, sampling config `{sampling.preset_name or 'custom'}` "
             f"({sampling.unet_passes(inspector.method)} UNet passes per image, {sampling.precision}), method "
             f"`{inspector.method}`."]
    log = Path(model) / TRAINING_LOG
    category = json.loads(log.read_text()).get("config", {}).get("category", "") if log.is_file() else ""
    if category:
        lines.append(f"**Category** `{category}`.")
    card = Path(model) / CARD_FILE
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace").splitlines()
        table = _card_table(text, "Image AUROC")
        if table:
            lines += ["", "Measured (model card):", "", *table[:9]]
    return "\n".join(lines)


def _session_views(inspector: Inspector, session: Optional[Session], name: str, threshold: float) -> tuple:
    """Everything the threshold and map decide for ``session``'s inspections: ``(gallery, table, CSV path, status,
    false-positive rate, histogram)``, the outputs of the page's ``views`` (the CSV is rewritten)."""
    if session is None:
        return ([], [], None, "Nothing inspected yet.", inspector.false_positive_text(name, threshold),
                inspector.histogram(name, threshold))
    items = session.items
    rows = inspector.rows(items, name, threshold)
    gallery = [(inspector.overlay(it, name), f"{it.file}: {it.scores[name]:.4g} "
                f"{'PASS' if row['decision'] == 'ok' else 'FAIL'}")
               for it, row in zip(items, rows) if not it.error]
    table = [[r[k] for k in CSV_FIELDS] for r in rows]
    csv_path = session.results_csv
    atomic_write_text(csv_path, csv_text(rows, CSV_FIELDS))
    scored = [it for it in items if not it.error]
    seconds = np.mean([it.seconds for it in scored]) if scored else float("nan")
    failed = sum(r["decision"] == "defect" for r in rows)
    status = (f"{len(items)} files inspected since the page opened: {failed} FAIL, "
              f"{sum(r['decision'] == 'ok' for r in rows)} PASS, {sum(r['decision'] == 'error' for r in rows)} "
              f"errors. Model calls: {inspector.model_calls}; {seconds:.3f} s per image.")
    return (gallery, table, str(csv_path), status, inspector.false_positive_text(name, threshold),
            inspector.histogram(name, threshold, items))


def build_app(inspector: Inspector, model: str | Path = "", folders: Optional["SessionFolders"] = None):
    """The Gradio Blocks page over ``inspector`` (see the module docstring); ``folders`` holds the sessions'
    folders (default: new ones, made when the first session needs one)."""
    try:
        import gradio as gr
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc

    names = list(inspector.map_names)
    first = inspector.default_map if inspector.default_map in names else names[0]
    folders = folders or SessionFolders()  # nothing is made on disk before a session needs it

    def slider_for(name: str):
        t = inspector.threshold(name)
        return gr.Slider(minimum=0.0, maximum=float(3 * t) if t > 0 else 1.0, value=float(t), step=float(t) / 200 or 1e-3,
                         label=f"threshold ({name}; calibrated {t:.4g})")

    views = functools.partial(_session_views, inspector)  # (session, map, threshold) -> the outputs

    def inspect(files, session, name, threshold, progress=gr.Progress()):
        session = session if isinstance(session, Session) else Session(folders.new_folder())
        paths = [getattr(f, "name", f) for f in (files or [])]
        session.uploads += [Path(p) for p in paths]
        uploads = expand_uploads(paths, session.folder)
        for i, upload in enumerate(uploads):
            progress((i, len(uploads)), desc=f"inspecting {upload.name}")
            session.items.append(Inspection(file=upload.name, error=upload.error) if upload.path is None
                                 else inspector.inspect(upload.path, upload.name))
        return (session, *views(session, name, threshold))

    def redecide(session, name, threshold):
        return views(session, name, threshold)

    def change_map(session, name):
        slider = slider_for(name)
        return (slider, *views(session, name, inspector.threshold(name)))

    # delete_cache: gradio's own copies of uploads and downloads go after an hour, and all of them at a restart
    with gr.Blocks(title="diffad inspection", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# diffad inspection\nDrop photos of parts (or a zip of a folder): each gets a heat map, a "
                    "score and PASS/FAIL. The threshold re-decides from the stored scores; the model does not run "
                    "again.")
        gr.Markdown(model_summary(model, inspector), elem_id="model-summary")
        items = gr.State(None, delete_callback=_end_session)  # one Session per browser session
        with gr.Row():
            files = gr.File(label="photos or a .zip", file_count="multiple", elem_id="uploads")
            with gr.Column():
                map_choice = gr.Dropdown(choices=names, value=first, label="anomaly map", elem_id="map")
                threshold = slider_for(first)
                threshold.elem_id = "threshold"
                fpr = gr.Markdown(inspector.false_positive_text(first, inspector.threshold(first)), elem_id="fpr")
                with gr.Row():
                    run_button = gr.Button("Inspect", variant="primary", elem_id="inspect")
                    stop_button = gr.Button("Stop", elem_id="stop")
        status = gr.Markdown("Nothing inspected yet.", elem_id="status")
        histogram = gr.Plot(inspector.histogram(first, inspector.threshold(first)), elem_id="histogram",
                            label="scores: held-out normal images (the calibration's), threshold, inspected here")
        gallery = gr.Gallery(label="overlays", columns=4, elem_id="gallery")
        table = gr.Dataframe(headers=list(CSV_FIELDS), label="results (same columns as diffad detect)",
                             elem_id="results", interactive=False)
        download = gr.File(label="results.csv", elem_id="csv")
        shown = [gallery, table, download, status, fpr, histogram]  # what views() returns
        event = run_button.click(inspect, [files, items, map_choice, threshold], [items, *shown],
                                 concurrency_limit=1)
        stop_button.click(None, None, None, cancels=[event])
        threshold.change(redecide, [items, map_choice, threshold], shown)
        map_choice.change(change_map, [items, map_choice], [threshold, *shown])
    demo.diffad_session_folders = folders  # close_app(demo) deletes them
    return demo


def register(subparsers) -> None:
    """Add ``diffad app`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "app", help="a web page for the inspection station: drop photos, see heat maps, scores and PASS/FAIL",
        description="Serve a Gradio page over a trained, calibrated model (local folder or Hub id). Binds to "
                    "127.0.0.1 unless --host says otherwise; never opens a public share link.")
    parser.add_argument("--model", required=True, help="model folder or Hub repo id (org/name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    parser.add_argument("--method", choices=("self_aware", "denoise"), default="self_aware")
    parser.add_argument("--seed", type=int, default=0, help="seeds each image's noise with its pixels (default: 0)")
    add_precision_assertion(parser, "the app")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad app`` (blocks until interrupted)."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    check_listen_address(args.host, args.port, "the app")  # before the model loads, and before a URL is printed
    pipe = load_pipeline(args.model)
    check_precision(pipe, args.precision, str(args.model))
    inspector = Inspector(pipe, method=args.method, seed=args.seed)
    folders = SessionFolders()
    gradio_cache = os.environ.get("GRADIO_TEMP_DIR")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops the app as Ctrl+C does: folders deleted
    try:
        # gradio's own copies (uploads, downloads, gallery images) live in the app's folder too, and go with it
        os.environ["GRADIO_TEMP_DIR"] = str(folders.ensure_root() / "gradio")
        demo = build_app(inspector, args.model, folders=folders)
        print(f"diffad app on http://{args.host}:{args.port} (Ctrl+C to stop)", flush=True)
        demo.queue().launch(server_name=args.host, server_port=args.port, share=False, show_error=False, quiet=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        folders.close()
        if gradio_cache is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = gradio_cache
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


# ------------------------------------------------------------------ a Hugging Face Space running the same app

SPACE_APP = '''"""diffad inspection app for {repo_id} (written by `diffad space`)."""
import os

from diffad.app import Inspector, build_app
from diffad.detect import load_pipeline

MODEL = os.environ.get("DIFFAD_MODEL", "{repo_id}")  # a local folder in the Hub's form works too
demo = build_app(Inspector(load_pipeline(MODEL)), MODEL)

if __name__ == "__main__":
    demo.queue().launch()
'''

#: The Space README's body; its front matter is built by huggingface_hub's ``SpaceCardData`` from data (a category
#: name holding a colon or a newline cannot add keys).
SPACE_README = '''
# {title}

Visual inspection with [diffad](https://github.com/diffad/diffad): drop photos of `{category}` parts and get,
for each, the anomaly heat map over the photo, the score and PASS/FAIL from the model
[{repo_id}](https://huggingface.co/{repo_id}). Move the threshold to re-decide without running the model again.
Runs on the Space's CPU; the model card gives the measured accuracy and the speed per image.
'''


def space_readme(category: str, repo_id: str, gradio_version: str) -> str:
    """The Space's README.md: YAML front matter from ``SpaceCardData`` (safe for any category name), then the body."""
    from huggingface_hub import SpaceCardData

    title = " ".join(f"diffad {category or repo_id.split('/')[-1]}".split())  # one line, whatever the name holds
    data = SpaceCardData(title=title, emoji="🔍", colorFrom="blue", colorTo="green", sdk="gradio",
                         sdk_version=gradio_version, app_file="app.py", pinned=False, models=[repo_id])
    body = SPACE_README.format(title=title, repo_id=repo_id, category=" ".join((category or "your").split()))
    return f"---\n{data.to_yaml()}\n---\n{body}"


def write_space(model: str | Path, repo_id: str, out: str | Path, force: bool = False) -> list[Path]:
    """Write a Space folder (``app.py``, ``requirements.txt``, ``README.md`` with the Space front matter) that
    loads the pushed model ``repo_id`` and serves :func:`build_app`; returns the files written.

    Raises:
        ValueError: ``out`` is a model folder (its README.md is the model card), or is not empty and ``force`` is
            False.
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ValueError(f"--repo-id {repo_id!r} is not a valid Hub repo id (ORG/NAME): {exc}") from None
    model = require_model_folder(model, name=f"--model {model}")
    try:
        import gradio

        gradio_version = gradio.__version__
    except ImportError:
        gradio_version = "5.0.0"
    log = model / TRAINING_LOG
    category = json.loads(log.read_text()).get("config", {}).get("category", "") if log.is_file() else ""
    out = Path(out)
    if (out / MODEL_INDEX).exists():
        raise ValueError(f"--out {out} is a model folder: its README.md is the model card and a Space would overwrite "
                         "it; pass a new folder for the Space")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty: pass a new folder, or --force to overwrite its app.py, "
                         "requirements.txt and README.md")
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "app.py": SPACE_APP.format(repo_id=repo_id),
        # an exported model (`diffad export`) runs its networks with OpenVINO or onnxruntime
        "requirements.txt": f"diffad[{'app,openvino' if is_exported(model) else 'app'}]>={__version__}"
                            "\ntorch\n",
        "README.md": space_readme(category, repo_id, gradio_version),
    }
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return [out / name for name in files]


def register_space(subparsers) -> None:
    """Add ``diffad space`` to the ``diffad`` command."""
    parser = subparsers.add_parser("space", help="write a Hugging Face Space folder that serves `diffad app`",
                                   description="Write app.py, requirements.txt and README.md (Space front matter) "
                                               "into --out: a Gradio Space over the pushed model --repo-id.")
    parser.add_argument("--model", required=True, help="the local model folder (for its category)")
    parser.add_argument("--repo-id", required=True, help="the model's Hub id (ORG/NAME), as pushed by diffad push")
    parser.add_argument("--out", required=True, help="the Space folder to write (new or empty)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, overwriting its app.py, requirements.txt and README.md "
                             "(never into a model folder)")
    parser.set_defaults(func=lambda args: print("\n".join(
        str(p) for p in write_space(args.model, args.repo_id, args.out, force=args.force))) or 0)
