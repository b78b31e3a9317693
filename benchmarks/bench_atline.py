"""Latency at the line: ``POST /inspect`` of ``diffad serve`` and ``diffad watch`` (photo written -> row in the CSV),
against the model's own time per photo, and whether batching requests would help.

Runs the real commands as child processes (``diffad serve`` on a free port, ``diffad watch`` on a temporary folder)
over the test photos of a calibrated model's category, and prints a markdown table (and ``--output`` JSON):

    python benchmarks/bench_atline.py --model runs/weave --photos data/weave/test --output bench_output/atline.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def _stats(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max_ms": 1000 * ordered[-1]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise RuntimeError(f"timed out waiting for {what}")


def model_time(model: str, photos: list[Path], rounds: int) -> dict:
    """Seconds per photo of the scoring call itself (inspect_photos, one photo per call), and batching's effect."""
    from diffad.data import read_image
    from diffad.detect import load_pipeline
    from diffad.pipelines.self_aware_inpaint import image_generator, inspect_photos

    pipe = load_pipeline(model)
    images = [read_image(p) for p in photos[:8]]
    inspect_photos(pipe, images[:1])  # warm-up
    single = []
    for _ in range(rounds):
        for image in images:
            start = time.perf_counter()
            inspect_photos(pipe, [image])
            single.append(time.perf_counter() - start)
    batched = {}
    for batch_size in (1, 8):
        per_image = []
        for _ in range(rounds):
            start = time.perf_counter()
            pipe(images, generator=[image_generator(0, im) for im in images], batch_size=batch_size, output_type="np")
            per_image.append((time.perf_counter() - start) / len(images))
        batched[batch_size] = 1000 * statistics.median(per_image)
    return {"inspect_photos": _stats(single), "pipe_ms_per_image_batch_1": batched[1],
            "pipe_ms_per_image_batch_8": batched[8]}


def serve_latency(model: str, photos: list[Path], requests: int, env: dict) -> dict:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "diffad.cli", "serve", "--model", model, "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        _wait(healthy, 120, "diffad serve")
        results = {}
        for label, query in (("raw body", ""), ("raw body, ?overlay=1", "?overlay=1")):
            seconds = []
            for i in range(requests + 3):
                data = photos[i % len(photos)].read_bytes()
                req = urllib.request.Request(f"{base}/inspect{query}", data=data, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
                start = time.perf_counter()
                with urllib.request.urlopen(req, timeout=60) as resp:
                    json.loads(resp.read())
                if i >= 3:  # warm-up
                    seconds.append(time.perf_counter() - start)
            results[label] = _stats(seconds)
        return results
    finally:
        proc.terminate()
        proc.wait(30)


def _unique_bytes(photo: Path, tag: str) -> bytes:
    """The photo's pixels as a PNG whose bytes are unique (a text chunk): the watcher skips contents it scored."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("bench", tag)
    buffer = io.BytesIO()
    with Image.open(photo) as image:
        image.save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def watch_latency(model: str, photos: list[Path], files: int, env: dict, settle: float) -> dict:
    work = Path(tempfile.mkdtemp(prefix="diffad-bench-watch-"))
    inbox, out = work / "inbox", work / "out"
    inbox.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "diffad.cli", "watch", "--model", model, str(inbox), "--out",
                             str(out), "--settle", str(settle)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    csv_path = out / "results.csv"

    def rows() -> int:
        if not csv_path.is_file():
            return 0
        with csv_path.open(newline="") as handle:
            return sum(1 for _ in csv.DictReader(handle))

    try:
        _wait(csv_path.is_file, 120, "diffad watch")
        time.sleep(1.0)
        results = {}
        for label in ("renamed into place", f"written in place (--settle {settle:g})"):
            seconds = []
            for i in range(files + 2):
                before = rows()
                target = inbox / f"{label.split()[0]}_{i:03d}.png"
                data = _unique_bytes(photos[i % len(photos)], f"{label} {i}")  # a scored content is skipped
                if label.startswith("renamed"):
                    tmp = target.with_name(target.name + ".part")
                    tmp.write_bytes(data)
                    start = time.perf_counter()
                    os.replace(tmp, target)
                else:
                    target.write_bytes(data)
                    start = time.perf_counter()
                _wait(lambda: rows() > before, 60, f"the row of {target.name}")
                if i >= 2:
                    seconds.append(time.perf_counter() - start)
            results[label] = _stats(seconds)
        return results
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a calibrated model folder")
    parser.add_argument("--photos", required=True, help="a folder of photos (searched recursively)")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--files", type=int, default=15)
    parser.add_argument("--settle", type=float, default=0.5)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    from diffad.detect import find_images

    photos = find_images([args.photos])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    import torch

    report = {"threads": torch.get_num_threads(), "model": args.model,
              "model_time": model_time(args.model, photos, rounds=3),
              "serve": serve_latency(args.model, photos, args.requests, env),
              "watch": watch_latency(args.model, photos, args.files, env, args.settle)}
    print(f"torch threads: {report['threads']}; the model's own time per photo (inspect_photos): "
          f"median {report['model_time']['inspect_photos']['median_ms']:.0f} ms; pipe() per image at batch 1: "
          f"{report['model_time']['pipe_ms_per_image_batch_1']:.0f} ms, at batch 8: "
          f"{report['model_time']['pipe_ms_per_image_batch_8']:.0f} ms\n")
    print("| path | n | median ms | p90 ms | max ms |\n|---|---|---|---|---|")
    for group in ("serve", "watch"):
        for label, s in report[group].items():
            print(f"| {group}: {label} | {s['n']} | {s['median_ms']:.0f} | {s['p90_ms']:.0f} | {s['max_ms']:.0f} |")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
