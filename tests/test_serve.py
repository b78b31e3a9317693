"""`diffad serve` over real HTTP (uvicorn on a free port in a thread): POST /inspect gives detect's scores,
decisions and overlays for raw bodies and multipart files; /health, /model; 413 over the size limit, 422 for an
unreadable photo; the CLI's refusals and its warning for a non-local host."""

from __future__ import annotations

import base64
import csv
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.cli import main
from diffad.detect import detect, format_score, load_pipeline
from tiny_components import saved_tiny_pipeline

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An RGB PNG, a non-square JPEG, a 16-bit grayscale PNG (the reader scales it) and a truncated PNG."""
    folder = tmp_path_factory.mktemp("serve_photos")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(folder / "b.jpg", quality=90)
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(folder / "c16.png")
    data = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    return folder


@pytest.fixture(scope="module")
def service(model_dir):
    from diffad.serve import Service

    return Service(load_pipeline(model_dir), model_dir)


@pytest.fixture(scope="module")
def base_url(service):
    """uvicorn serving the API on a free port of 127.0.0.1, in a thread."""
    from diffad.serve import build_api

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_api(service), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = "diffadboundary7f3a"
    parts = []
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.fixture(scope="module")
def detect_rows(model_dir, photos, tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("serve_detect")
    detect(model_dir, [photos], out)
    with (out / "results.csv").open(newline="") as handle:
        return {Path(row["file"]).name: {**row, "out": out} for row in csv.DictReader(handle)}


def test_inspect_gives_detects_scores_decisions_and_overlays(base_url, photos, detect_rows, service):
    readable = ("a.png", "b.jpg", "c16.png")
    for name in readable:
        status, result = _request(f"{base_url}/inspect?overlay=1", (photos / name).read_bytes(),
                                  {"Content-Type": "application/octet-stream"})
        row = detect_rows[name]
        assert status == 200, result
        assert format_score(result["score"]) == row["score"]  # every bit of detect's float32 score
        assert result["decision"] == row["decision"] and result["decision"] in ("ok", "defect")
        assert result["map"] == "combined" and result["method"] == "self_aware" and result["error"] == ""
        assert result["threshold"] == service.pipe.calibration.threshold("self_aware/combined")
        # the overlay is detect's overlay file, byte for byte
        assert base64.b64decode(result["overlay_png"]) == (row["out"] / row["overlay"]).read_bytes()
    # several files in one multipart request: one answer each, in order, the same scores; no overlay unless asked
    body, headers = _multipart([(n, (photos / n).read_bytes()) for n in (*readable, "truncated.png")])
    status, answer = _request(f"{base_url}/inspect", body, headers)
    assert status == 200
    results = answer["results"]
    assert [r["file"] for r in results] == [*readable, "truncated.png"]
    for r in results[:3]:
        assert format_score(r["score"]) == detect_rows[r["file"]]["score"] and "overlay_png" not in r
    assert results[3]["decision"] == "error" and results[3]["score"] is None and "truncated" in results[3]["error"]


def test_errors_and_size_limit(base_url, photos, service):
    status, result = _request(f"{base_url}/inspect", (photos / "truncated.png").read_bytes())
    assert status == 422 and result["decision"] == "error" and result["score"] is None
    status, result = _request(f"{base_url}/inspect", b"not an image at all")
    assert status == 422 and "not a readable image" in result["error"]
    assert _request(f"{base_url}/inspect", b"")[0] == 400
    limit = service.max_upload_bytes
    service.max_upload_bytes = 1000
    try:
        big = (photos / "a.png").read_bytes()
        assert len(big) > 1000
        status, result = _request(f"{base_url}/inspect", big)
        assert status == 413 and "exceeds 1000 bytes" in result["detail"]
        body, headers = _multipart([("a.png", big)])
        assert _request(f"{base_url}/inspect", body, headers)[0] == 413
    finally:
        service.max_upload_bytes = limit


def test_health_and_model(base_url, service, model_dir):
    assert _request(f"{base_url}/health") == (200, {"status": "ok"})
    status, facts = _request(f"{base_url}/model")
    cal = service.pipe.calibration
    assert status == 200
    assert facts["model"] == str(model_dir) and facts["resolution"] == service.pipe.resolution
    assert (facts["tile_size"], facts["tiles"]) == (service.pipe.tile_size, service.pipe.num_tiles)
    assert facts["map"] == "combined" and facts["threshold"] == cal.threshold("self_aware/combined")
    assert facts["unet_passes"] == cal.sampling.unet_passes("self_aware")
    assert facts["calibration_images"] == cal.config.num_images
    assert set(facts["heldout_false_positive_rates"]) == set(cal.config.threshold_names)
    assert facts["card"].startswith("**Model**")


def test_cli_refusals_and_host_warning(model_dir, tmp_path, monkeypatch, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "diffad serve: error:" in capsys.readouterr().err
    assert main(["serve", "--model", str(model_dir), "--port", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--anomaly-map", "learned"]) == 2  # no segmenter: detect's line
    assert "learned needs a segmenter" in capsys.readouterr().err
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    assert main(["serve", "--model", str(model_dir), "--host", "0.0.0.0", "--port", "8123"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("WARNING")] == [
        "WARNING: --host 0.0.0.0: the API is reachable from other machines; it has no login"]
    assert calls == [{"host": "0.0.0.0", "port": 8123, "log_level": "warning"}]
    assert main(["serve", "--model", str(model_dir)]) == 0
    assert "WARNING" not in capsys.readouterr().out and calls[-1]["host"] == "127.0.0.1"


def test_a_busy_port_is_named_before_the_model_loads(model_dir, monkeypatch, capsys, busy_port):
    import diffad.serve

    loaded = []
    monkeypatch.setattr(diffad.serve, "load_pipeline", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: pytest.fail("uvicorn started on a busy port"))
    port = busy_port
    code = main(["serve", "--model", str(model_dir), "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 2 and f"--port {port}: 127.0.0.1:{port} is in use" in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "http://" not in captured.out and not loaded
