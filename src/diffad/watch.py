"""``diffad watch``: score every photo that appears in a folder (a camera's drop folder, an FTP or network share).

A photo is scored once it is complete: when it is renamed into place (the atomic way cameras and ``rsync`` write),
or when its size and modification time stay the same for ``--settle`` seconds. Each photo is scored exactly as
``diffad detect`` scores it (:func:`diffad.detect.read_or_record` and :func:`diffad.detect.record_batch`: the same
reader, seeding, decision, overlay and error rows): its row is appended to ``OUT/results.csv`` (detect's columns)
and flushed to disk before anything else happens, and its overlay is written to ``OUT/overlays/``.

``--webhook URL`` also POSTs each row as JSON from a background thread (:class:`diffad.webhook.Webhook`: retries
with backoff, a bounded queue): a dead webhook never holds up scoring and never loses a row (the row is in the CSV).

Restarts: the SHA-256 of every photo scored is appended to ``OUT/.diffad-watch-sha256`` after its row; on start the
photos already in the folder are checked, and a photo whose content was scored before is skipped (a file rewritten
with new content under the same name is scored again). A kill between a row and its hash re-scores that one photo.

Folder events come from ``watchdog`` (inotify on Linux, FSEvents, ReadDirectoryChangesW); ``--poll S`` uses its
polling observer instead, listing the folder every S seconds: for network shares (NFS, SMB) where the OS sends no
events. SIGTERM or Ctrl-C stops after the photo in hand, its row written.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from diffad.detect import (CSV_FIELDS, IMAGE_EXTENSIONS, LOCK_NAME, OVERLAY_DIR, RESULTS_NAME, DetectSummary,
                           load_pipeline, read_or_record, record_batch, result_base)
from diffad.results import ResultsFile

__all__ = ["HASHES_NAME", "INSTALL_HINT", "watch", "register", "run"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "diffad watch needs watchdog: pip install 'diffad[serve]'"
#: One ``<sha256> <file>`` line per photo scored: what a restart skips.
HASHES_NAME = ".diffad-watch-sha256"
#: How often pending files are checked for completeness, seconds.
TICK_S = 0.05


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_hashes(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.split(" ", 1)[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


class _Pending:
    """Files seen by the observer, each with its last (size, mtime) and when it last changed; thread-safe."""

    def __init__(self, input_dir: Path, out_dir: Path):
        self.input_dir, self.out_dir = input_dir, out_dir
        self._files: dict[Path, tuple[Optional[tuple[int, int]], float]] = {}
        self._ready: list[Path] = []
        self._lock = threading.Lock()

    def _wanted(self, path: Path) -> bool:
        return (path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
                and self.out_dir not in path.parents)

    def seen(self, raw: str) -> None:
        """A file was created or written: check it until it is stable."""
        path = Path(raw).resolve()
        if self._wanted(path):
            with self._lock:
                self._files[path] = (None, time.monotonic())

    def renamed(self, raw: str) -> None:
        """A file was renamed into place: complete now."""
        path = Path(raw).resolve()
        if self._wanted(path):
            with self._lock:
                self._files.pop(path, None)
                if path not in self._ready:
                    self._ready.append(path)

    def take_ready(self, settle: float) -> list[Path]:
        """The files complete by now (renamed in, or unchanged for ``settle`` seconds), oldest first."""
        now = time.monotonic()
        with self._lock:
            ready, self._ready = self._ready, []
            for path, (signature, since) in list(self._files.items()):
                try:
                    stat = path.stat()
                except OSError:  # gone (renamed away, deleted)
                    del self._files[path]
                    continue
                current = (stat.st_size, stat.st_mtime_ns)
                if current != signature:
                    self._files[path] = (current, now)
                elif now - since >= settle and stat.st_size > 0:
                    del self._files[path]
                    ready.append(path)
        return ready


def _observer(input_dir: Path, pending: _Pending, poll: Optional[float]):
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver
    except ImportError:
        raise ValueError(INSTALL_HINT) from None

    class Handler(FileSystemEventHandler):
        def on_created(self, event):
            if not event.is_directory:
                pending.seen(event.src_path)

        def on_modified(self, event):
            if not event.is_directory:
                pending.seen(event.src_path)

        def on_closed(self, event):  # inotify: the writer closed the file
            if not event.is_directory:
                pending.seen(event.src_path)

        def on_moved(self, event):
            if not event.is_directory:
                pending.renamed(event.dest_path)

    observer = PollingObserver(timeout=poll) if poll else Observer()
    observer.schedule(Handler(), str(input_dir), recursive=True)
    return observer


def _checked_arguments(input_dir: Path, poll: Optional[float], settle: float, anomaly_map: Optional[str],
                       method: str) -> str:
    """Check :func:`watch`'s folder and options (one-line errors naming the flag); return the anomaly map to use
    (``anomaly_map``, or the method's default)."""
    from diffad.pipelines.self_aware_inpaint import MAP_NAMES, SelfAwareInpaintPipeline

    if not input_dir.is_dir():
        raise FileNotFoundError(f"INPUT_DIR {input_dir} is not a folder: pass the folder the camera writes into")
    if poll is not None and not poll > 0:
        raise ValueError(f"--poll must be > 0 seconds, got {poll}")
    if not settle >= 0:
        raise ValueError(f"--settle must be >= 0 seconds, got {settle}")
    anomaly_map = anomaly_map or SelfAwareInpaintPipeline.default_map(method)
    if anomaly_map not in MAP_NAMES:
        raise ValueError(f"--anomaly-map must be one of {', '.join(MAP_NAMES)}, got {anomaly_map!r}")
    return anomaly_map


def _start_watching(input_dir: Path, pending: _Pending, poll: Optional[float]):
    """Start the observer of ``input_dir`` (:func:`_observer`), then hand ``pending`` every file already there: a
    photo arriving meanwhile is seen by one or the other. Returns the started observer (the caller stops it)."""
    observer = _observer(input_dir, pending, poll)
    try:
        observer.start()  # before listing the folder: a photo arriving meanwhile is seen by one or the other
    except OSError as exc:  # e.g. the inotify watch limit
        raise ValueError(f"cannot watch {input_dir} for events ({exc}): pass --poll 2 to list it every 2 s "
                         "instead") from None
    for path in sorted(input_dir.rglob("*")):
        if path.is_file():
            pending.seen(str(path))
    return observer


def watch(
    model: str | os.PathLike,
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    webhook: Optional[str] = None,
    poll: Optional[float] = None,
    settle: float = 0.5,
    anomaly_map: Optional[str] = None,
    method: str = "self_aware",
    seed: int = 0,
    pipe=None,
    stop: Optional[threading.Event] = None,
    on_row: Optional[Callable[[dict[str, str]], None]] = None,
    webhook_options: Optional[dict] = None,
) -> DetectSummary:
    """Score the photos of ``input_dir`` as they appear, until ``stop`` is set (see the module docstring).

    Args:
        model: a model folder or Hub id (ignored when ``pipe`` is given).
        input_dir: the folder to watch (recursively); photos already there are scored too, unless their content
            was scored before.
        out_dir: ``results.csv``, ``overlays/`` and the hash list (may not lie inside ``input_dir``'s photos:
            files under it are never scored).
        webhook: an http(s) URL each row is POSTed to as JSON.
        poll: list the folder every ``poll`` seconds instead of waiting for OS events (network shares).
        settle: seconds a written file must stay unchanged before it is scored.
        anomaly_map, method, seed: as ``diffad detect``'s.
        pipe: an already loaded pipeline (tests).
        stop: set it to stop after the photo in hand (the CLI sets it on SIGTERM/SIGINT).
        on_row: called with each row after it is on disk (tests, embedding).
        webhook_options: keyword arguments of :class:`diffad.webhook.Webhook` (queue size, attempts, backoff).

    Returns:
        A :class:`diffad.detect.DetectSummary` of this run (``skipped_done``: photos skipped by content hash).
    """
    from diffad.detect import _check_options
    from diffad.files import file_lock

    input_dir, out_dir = Path(input_dir).resolve(), Path(out_dir).resolve()
    anomaly_map = _checked_arguments(input_dir, poll, settle, anomaly_map, method)
    from diffad.webhook import Webhook, check_url

    if webhook is not None:
        check_url(webhook)
    if pipe is None:
        pipe = load_pipeline(model)
    _check_options(pipe, model, method, anomaly_map, None)
    stop = stop or threading.Event()
    (out_dir / OVERLAY_DIR).mkdir(parents=True, exist_ok=True)
    try:
        with file_lock(out_dir / LOCK_NAME, blocking=False):
            pending = _Pending(input_dir, out_dir)
            observer = _start_watching(input_dir, pending, poll)
            poster = Webhook(webhook, **(webhook_options or {})) if webhook else None
            try:
                return _score_until_stopped(pipe, pending, out_dir, stop, settle, poster, on_row,
                                            method=method, anomaly_map=anomaly_map, seed=seed)
            finally:
                observer.stop()
                observer.join(5)
                if poster is not None:
                    poster.close()
    except BlockingIOError:
        raise ValueError(f"another diffad detect or watch is writing to {out_dir}: stop it, or pass another --out"
                         ) from None


def _score_until_stopped(pipe, pending: _Pending, out_dir: Path, stop: threading.Event, settle: float, poster,
                         on_row, *, method: str, anomaly_map: str, seed: int) -> DetectSummary:
    results_csv, hashes_path = out_dir / RESULTS_NAME, out_dir / HASHES_NAME
    summary = DetectSummary(results_csv=results_csv)
    done = _read_hashes(hashes_path)
    base = result_base(pipe, method, anomaly_map)
    # diffad's one results writer: whole rows, formula-safe cells, a torn last row cut off
    with ResultsFile(results_csv, CSV_FIELDS) as table, hashes_path.open("a", encoding="utf-8") as hashes:
        logger.info("watching for photos; results in %s", results_csv)
        while not stop.is_set():
            ready = pending.take_ready(settle)
            if not ready:
                stop.wait(TICK_S)
                continue
            for path in ready:
                if stop.is_set():
                    break
                try:
                    digest = _sha256(path)
                except OSError as exc:  # removed or unreadable before its turn: the reader will say so
                    digest = None
                    logger.debug("%s: %s", path, exc)
                if digest is not None and digest in done:
                    summary.skipped_done += 1
                    logger.info("%s: already scored (same content), skipped", path)
                    continue
                photo, row = read_or_record(path, table, summary, base)
                rows = [row] if photo is None else record_batch(
                    pipe, [(path, photo)], table, out_dir, method=method, anomaly_map=anomaly_map, seed=seed,
                    summary=summary)
                if digest is not None:
                    done.add(digest)
                    hashes.write(f"{digest} {path}\n")
                    hashes.flush()
                for r in rows:
                    logger.info("%s: %s %s", r["file"], r["decision"], r["score"] or r["error"])
                    if poster is not None:
                        poster.send(r)
                    if on_row is not None:
                        on_row(r)
    return summary


def register(subparsers) -> None:
    """Add ``diffad watch`` to the ``diffad`` command."""
    from diffad.pipelines.self_aware_inpaint import MAP_NAMES, METHODS

    parser = subparsers.add_parser(
        "watch", help="score every photo that appears in a folder: results.csv rows, overlays, a webhook",
        description="Watch INPUT_DIR (recursively) and score each new photo once it is complete (renamed into "
                    "place, or unchanged for --settle seconds), exactly as diffad detect: a row appended to "
                    "OUT/results.csv and an overlay in OUT/overlays/. Photos whose content was already scored are "
                    "skipped, so a restart resumes. SIGTERM or Ctrl-C stops after the photo in hand.")
    parser.add_argument("input_dir", metavar="INPUT_DIR", help="the folder the camera writes into")
    parser.add_argument("--model", required=True, help="model folder or Hub repo id (org/name)")
    parser.add_argument("--out", required=True, help="output folder (results.csv, overlays/)")
    parser.add_argument("--webhook", default=None,
                        help="POST each row as JSON to this http(s) URL (retries, bounded queue; never blocks)")
    parser.add_argument("--poll", type=float, default=None, metavar="S",
                        help="list the folder every S seconds instead of OS events: for network shares (NFS, SMB)")
    parser.add_argument("--settle", type=float, default=0.5, metavar="S",
                        help="seconds a written file must stay unchanged before it is scored (default: 0.5); "
                             "files renamed into place are scored at once")
    parser.add_argument("--anomaly-map", choices=MAP_NAMES, default=None,
                        help="the map scored and drawn (default: the method's, as diffad detect)")
    parser.add_argument("--method", choices=METHODS, default="self_aware")
    parser.add_argument("--seed", type=int, default=0, help="seeds each image's noise with its pixels (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad watch`` until SIGTERM or Ctrl-C; exit 0 after a clean stop."""
    stop = threading.Event()

    def request_stop(signum, frame) -> None:
        logger.info("%s: stopping after the photo in hand", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = watch(args.model, args.input_dir, args.out, webhook=args.webhook, poll=args.poll,
                        settle=args.settle, anomaly_map=args.anomaly_map, method=args.method, seed=args.seed,
                        stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"stopped: scored {summary.scored} images ({summary.defective} defective), {summary.failed} unreadable, "
          f"{summary.skipped_done} already scored; results in {summary.results_csv}", flush=True)
    return 0
