"""`diffad watch`: photos appearing while it runs (written slowly, renamed into place, in a sub-folder) are scored
once, complete, exactly as `diffad detect` scores them, and POSTed to a webhook; a killed watcher restarts without
re-scoring (content hashes), with the polling observer, and stops on SIGTERM with exit 0; a stop request finishes the
photo in hand; a dead or flaky webhook never blocks and never loses a row."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.cli import main
from diffad.detect import detect, load_pipeline
from tiny_components import saved_tiny_pipeline

pytest.importorskip("watchdog")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("watch") / "model")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return load_pipeline(model_dir)


def _photo(seed: int, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (36 + seed, 40, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _wait(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.calls += 1
        if server.calls <= server.fail_first:
            self.send_response(503)
        else:
            server.received.append(body)
            self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def sink():
    """A local webhook receiver; ``sink.fail_first = N`` answers 503 to the first N POSTs."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    server.received, server.calls, server.fail_first = [], 0, 0
    server.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connections are refused
    return f"http://127.0.0.1:{port}/hook"


def _start(model_dir, pipe, input_dir, out, **kwargs):
    from diffad.watch import watch

    stop, rows, result = threading.Event(), [], {}

    def target():
        result["summary"] = watch(model_dir, input_dir, out, pipe=pipe, stop=stop, on_row=rows.append, **kwargs)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return stop, rows, result, thread


def test_photos_appearing_while_it_runs_are_scored_as_detect_scores_them(model_dir, pipe, tmp_path, sink):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "before.png").write_bytes(_photo(0))  # there before the watcher starts
    stop, rows, result, thread = _start(model_dir, pipe, inbox, out, webhook=sink.url, settle=0.3)
    _wait(lambda: len(rows) == 1, what="the photo already there")
    data = _photo(1)
    with (inbox / "slow.png").open("wb") as handle:  # written in two parts, 0.1 s apart (< --settle)
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(0.1)
        handle.write(data[len(data) // 2:])
    (inbox / "renamed.png.part").write_bytes(_photo(2))  # not an image name: ignored until renamed into place
    os.replace(inbox / "renamed.png.part", inbox / "renamed.png")
    (inbox / "sub" / "deep.jpg").write_bytes(_photo(3, "JPEG"))
    (inbox / "notes.txt").write_text("not a photo")
    _wait(lambda: len(rows) == 4, what="4 rows")
    time.sleep(0.5)  # nothing else comes: each photo once
    stop.set()
    thread.join(30)
    assert not thread.is_alive() and result["summary"].scored == 4
    written = _rows(out / "results.csv")
    assert written == rows  # on_row saw exactly what is on disk
    assert sorted(Path(r["file"]).name for r in written) == ["before.png", "deep.jpg", "renamed.png", "slow.png"]
    # detect over the same files: the same rows (scores to the last bit, decisions) and the same overlay files
    reference = tmp_path / "detect"
    detect(model_dir, [inbox], reference, pipe=pipe)
    expected = {r["file"]: r for r in _rows(reference / "results.csv")}
    for row in written:
        assert row == expected[row["file"]] and row["decision"] in ("ok", "defect")
        assert (out / row["overlay"]).read_bytes() == (reference / row["overlay"]).read_bytes()
    _wait(lambda: len(sink.received) == 4, timeout=10, what="the webhook's 4 POSTs")
    assert sorted(sink.received, key=lambda r: r["file"]) == sorted(written, key=lambda r: r["file"])


def test_killed_watcher_restarts_without_rescoring_and_stops_on_sigterm(model_dir, tmp_path):
    from diffad.watch import HASHES_NAME

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "diffad.cli", "watch", "--model", str(model_dir), str(inbox), "--out", str(out),
           "--settle", "0.2"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        (inbox / "a.png").write_bytes(_photo(4))
        (inbox / "b.png").write_bytes(_photo(5))
        hashes = out / HASHES_NAME  # written right after each row: a kill between the two re-scores that photo
        _wait(lambda: len(_rows(out / "results.csv")) == 2 and hashes.is_file()
              and len(hashes.read_text().splitlines()) == 2, what="the first watcher's 2 rows and hashes")
    finally:
        first.kill()  # SIGKILL: no clean-up at all
        first.communicate()
    (inbox / "c.png").write_bytes(_photo(6))  # arrives while no watcher runs
    (inbox / "a_copy.png").write_bytes((inbox / "a.png").read_bytes())  # content already scored
    second = subprocess.Popen(cmd + ["--poll", "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        _wait(lambda: len(_rows(out / "results.csv")) == 3, what="c.png scored after the restart")
        (inbox / "d.png").write_bytes(_photo(7))  # seen by the polling observer
        _wait(lambda: len(_rows(out / "results.csv")) == 4, what="d.png scored")
        time.sleep(0.6)
        second.send_signal(signal.SIGTERM)
        stdout, stderr = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    assert second.returncode == 0, stderr[-2000:]
    assert "stopped: scored 2 images" in stdout and "3 already scored" in stdout
    names = [Path(r["file"]).name for r in _rows(out / "results.csv")]
    assert sorted(names) == ["a.png", "b.png", "c.png", "d.png"]  # each once: a.png and a_copy.png not re-scored


class _StopWhileScoring:
    """The pipeline, with a stop request arriving while the first photo is in hand."""

    def __init__(self, pipe, stop: threading.Event):
        self._pipe, self._stop = pipe, stop

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, *args, **kwargs):
        self._stop.set()
        return self._pipe(*args, **kwargs)


def test_stop_finishes_the_photo_in_hand(model_dir, pipe, tmp_path):
    from diffad.watch import watch

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"{i}.png").write_bytes(_photo(10 + i))
    stop = threading.Event()
    summary = watch(model_dir, inbox, out, pipe=_StopWhileScoring(pipe, stop), stop=stop, settle=0.0)
    rows = _rows(out / "results.csv")
    assert summary.scored == 1 and len(rows) == 1 and rows[0]["decision"] in ("ok", "defect")
    assert (out / rows[0]["overlay"]).is_file()


def test_dead_webhook_never_blocks_scoring_nor_loses_a_row(model_dir, pipe, tmp_path):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"{i}.png").write_bytes(_photo(20 + i))
    stop, rows, result, thread = _start(model_dir, pipe, inbox, out, webhook=_closed_port_url(), settle=0.0,
                                        webhook_options={"attempts": 50, "backoff": 1.0, "queue_size": 1})
    _wait(lambda: len(rows) == 3, timeout=30, what="3 rows despite the dead webhook")
    stop.set()
    thread.join(30)
    assert not thread.is_alive() and len(_rows(out / "results.csv")) == 3


def test_webhook_retries_and_bounds_its_queue(sink):
    from diffad.webhook import Webhook

    sink.fail_first = 2  # 503 twice, then 200: the first row is delivered on its third try
    hook = Webhook(sink.url, attempts=4, backoff=0.05)
    for i in range(3):
        hook.send({"file": f"{i}.png", "score": "0.5", "decision": "ok", "overlay": "", "error": ""})
    _wait(lambda: len(sink.received) == 3, timeout=10, what="3 deliveries")
    hook.close()
    assert [r["file"] for r in sink.received] == ["0.png", "1.png", "2.png"] and hook.delivered == 3
    dead = Webhook(_closed_port_url(), attempts=3, backoff=0.2, queue_size=2)
    start = time.monotonic()
    for i in range(10):
        dead.send({"file": f"{i}.png"})
    assert time.monotonic() - start < 0.5  # send never waits for the network
    dead.close(timeout=10)
    assert dead.delivered == 0 and dead.dropped >= 6 and dead.failed + dead.dropped == 10


def test_refusals(model_dir, tmp_path, capsys):
    from diffad.detect import LOCK_NAME
    from diffad.files import file_lock
    from diffad.watch import watch

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert main(["watch", "--model", str(model_dir), str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "INPUT_DIR" in capsys.readouterr().err
    assert main(["watch", "--model", str(model_dir), str(inbox), "--out", str(tmp_path / "o"), "--poll", "0"]) == 2
    assert main(["watch", "--model", str(model_dir), str(inbox), "--out", str(tmp_path / "o"),
                 "--webhook", "ftp://mes/x"]) == 2
    assert "--webhook 'ftp://mes/x' is not an http(s) URL" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    with file_lock(tmp_path / "busy" / LOCK_NAME):
        with pytest.raises(ValueError, match="another diffad detect or watch is writing"):
            watch(model_dir, inbox, tmp_path / "busy")
