"""`diffad detect`: CSV rows, overlays, unreadable files skipped, re-runs resume, scores bit-identical whatever the
batch, the position or an interruption, options checked against the model."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.cli import main
from diffad.detect import format_score, load_pipeline
from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline, image_generator
from tiny_components import saved_tiny_pipeline


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("detect") / "model")


@pytest.fixture(scope="module")
def pipe(calibrated_model) -> SelfAwareInpaintPipeline:
    return load_pipeline(calibrated_model)


def _pipeline_output(pipe, path: Path, *, method: str = "self_aware", seed: int = 0):
    """What the pipeline itself returns for one file: decoded as RGB, noise from its pixels, alone in its batch."""
    with Image.open(path) as img:
        photo = img.convert("RGB")
    return pipe(photo, method=method, generator=[image_generator(seed, photo)], batch_size=1)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 good PNGs (one in a sub-folder, one grayscale), a truncated PNG and a text file named .png."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8)).save(folder / "sub" / "c.png")
    data = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.png").write_text("not an image\n")
    (folder / "readme.txt").write_text("ignored: not an image extension\n")
    return folder


def _rows(csv_path: Path) -> list[dict]:
    with csv_path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_detect_writes_rows_overlays_and_skips_broken_files(calibrated_model, pipe, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["detect", "--model", str(calibrated_model), str(image_folder), "--out", str(out),
                 "--batch-size", "2"])
    assert code == 0
    assert "scored 3 images (" in capsys.readouterr().out
    rows = _rows(out / "results.csv")
    by_name = {Path(r["file"]).name: r for r in rows}
    assert sorted(by_name) == ["a.png", "b.png", "c.png", "notes.png", "truncated.png"]
    threshold = pipe.calibration.threshold("self_aware/combined")
    for name in ("a.png", "b.png", "c.png"):
        row = by_name[name]
        expected = _pipeline_output(pipe, Path(row["file"]))
        # by default the score is the maximum of that image's own combined map, to the last bit, and the decision
        # is that score against the calibrated threshold
        assert row["score"] == format_score(expected.anomaly_maps["combined"][0].max())
        assert row["score"] == format_score(expected.scores["combined"][0])
        assert row["decision"] == ("defect" if float(row["score"]) > threshold else "ok") and row["error"] == ""
        assert row["decision"] == ("defect" if expected.is_anomalous["combined"][0] else "ok")
        overlay = Image.open(out / row["overlay"])
        # drawn at the photo's own size
        assert overlay.size == Image.open(row["file"]).size and overlay.mode == "RGB"
    assert by_name["truncated.png"]["decision"] == "error" and "truncated" in by_name["truncated.png"]["error"]
    assert by_name["notes.png"]["decision"] == "error" and by_name["notes.png"]["score"] == ""
    assert len(list((out / "overlays").glob("*.png"))) == 3


def test_detect_rerun_skips_done_files_and_scores_new_ones(calibrated_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["detect", "--model", str(calibrated_model), str(image_folder / "a.png"), "--out", str(out)]) == 0
    first = _rows(out / "results.csv")
    assert len(first) == 1
    capsys.readouterr()
    assert main(["detect", "--model", str(calibrated_model), str(image_folder), "--out", str(out)]) == 0
    assert "1 already done" in capsys.readouterr().out
    rows = _rows(out / "results.csv")
    assert len(rows) == 5 and rows[0] == first[0]
    assert len({r["file"] for r in rows}) == 5  # nothing written twice
    capsys.readouterr()
    assert main(["detect", "--model", str(calibrated_model), str(image_folder), "--out", str(out)]) == 0
    assert "scored 0 images" in capsys.readouterr().out and len(_rows(out / "results.csv")) == 5


def test_detect_is_deterministic_for_a_seed(calibrated_model, image_folder, tmp_path):
    from diffad.detect import detect

    a = detect(calibrated_model, [image_folder / "b.png"], tmp_path / "a", seed=3)
    b = detect(calibrated_model, [image_folder / "b.png"], tmp_path / "b", seed=3)
    c = detect(calibrated_model, [image_folder / "b.png"], tmp_path / "c", seed=4)
    assert a.scored == b.scored == c.scored == 1
    assert _rows(a.results_csv)[0]["score"] == _rows(b.results_csv)[0]["score"]
    assert _rows(a.results_csv)[0]["score"] != _rows(c.results_csv)[0]["score"]  # the seed is used


def _photo_folder(root: Path) -> tuple[Path, list[str]]:
    """8 PNGs of two sizes; the three ``*_copy.png`` are one image, at sorted positions 0, 3 and 7."""
    folder = root / "photos"
    folder.mkdir()
    rng = np.random.default_rng(1)
    copy = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    names = ["a_copy", "b", "c", "d_copy", "e", "f", "g", "h_copy"]
    for name in names:
        pixels = copy if name.endswith("_copy") else rng.integers(0, 256, (40 + len(name), 36, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder, [f"{name}.png" for name in names]


def _scores(csv_path: Path) -> dict[str, str]:
    return {Path(r["file"]).name: r["score"] for r in _rows(csv_path)}


def test_scores_are_bit_identical_whatever_batch_position_or_resume(calibrated_model, tmp_path, monkeypatch, capsys):
    folder, names = _photo_folder(tmp_path)
    runs = {}
    for batch_size in (1, 3, 8):
        out = tmp_path / f"out{batch_size}"
        assert main(["detect", "--model", str(calibrated_model), str(folder), "--out", str(out),
                     "--batch-size", str(batch_size)]) == 0
        runs[f"batch {batch_size}"] = _scores(out / "results.csv")

    # an interrupted run (Ctrl-C during the second batch of 3), then resumed with another batch size
    out = tmp_path / "resumed"
    calls = []
    real_call = SelfAwareInpaintPipeline.__call__

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_call(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(SelfAwareInpaintPipeline, "__call__", interrupted)
        assert main(["detect", "--model", str(calibrated_model), str(folder), "--out", str(out),
                     "--batch-size", "3"]) == 1
    assert "diffad detect: error: interrupted" in capsys.readouterr().err
    assert len(_rows(out / "results.csv")) == 3  # the first batch was written before the interruption
    assert main(["detect", "--model", str(calibrated_model), str(folder), "--out", str(out),
                 "--batch-size", "2"]) == 0
    runs["resumed"] = _scores(out / "results.csv")

    reference = runs["batch 1"]
    assert sorted(reference) == sorted(names)
    for label, scores in runs.items():
        assert scores == reference, label  # string-equal: every digit of the float32 score
    copies = {reference[name] for name in names if name.endswith("_copy.png")}
    assert len(copies) == 1  # one image scores the same at positions 0, 3 and 7
    assert len(set(reference.values())) == len(names) - 2  # and the other images do not all score alike


def test_detect_other_method_and_maps_match_the_pipeline(calibrated_model, pipe, image_folder, tmp_path):
    from diffad.detect import detect

    for method, anomaly_map in (("denoise", "multiscale"), ("self_aware", "noise_error")):
        out = tmp_path / f"{method}-{anomaly_map}"
        summary = detect(calibrated_model, [image_folder / "b.png"], out, method=method, anomaly_map=anomaly_map)
        (row,) = _rows(summary.results_csv)
        expected = _pipeline_output(pipe, image_folder / "b.png", method=method)
        assert row["score"] == format_score(expected.scores[anomaly_map][0]), (method, anomaly_map)
        threshold = pipe.calibration.threshold(f"{method}/{anomaly_map}")
        assert row["decision"] == ("defect" if float(row["score"]) > threshold else "ok")


def test_detect_no_readable_image_exits_2(calibrated_model, image_folder, tmp_path, capsys):
    code = main(["detect", "--model", str(calibrated_model), str(image_folder / "notes.png"),
                 str(image_folder / "truncated.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffad detect: error: none of the 2 input files could be read" in err


@pytest.mark.parametrize("args, message", [
    (["--model", "MISSING_DIR"], "no such folder, and not a Hub repo id"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--anomaly-map", "learned"], "--anomaly-map learned needs a segmenter"),
    (["--anomaly-map", "noise_error", "--method", "denoise"], "--anomaly-map noise_error exists only with --method "
                                                              "self_aware"),
    # the tiny model is calibrated with a custom (cheap) config: --config asserts, it never switches
    (["--config", "fast"], "was calibrated with a custom sampling config"),
    (["--config", "thesis"], "run `diffad calibrate --model"),
])
def test_detect_bad_input_one_line_exit_2(calibrated_model, image_folder, tmp_path, capsys, args, message):
    base = {"--model": str(calibrated_model)}
    argv = ["detect", str(image_folder), "--out", str(tmp_path / "o")]
    opts = dict(base, **dict(zip(args[::2], args[1::2])))
    for key, value in opts.items():
        argv += [key, value]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("diffad detect: error: ") and message in err[0]
    if "--config" in args:
        assert f"--config {opts['--config']} ...` first" in err[0]
    assert not (tmp_path / "o" / "results.csv").exists()  # refused before scoring anything


def test_detect_uncalibrated_model_is_refused(tmp_path, image_folder, capsys):
    saved_tiny_pipeline(tmp_path / "raw", calibrated=False)
    code = main(["detect", "--model", str(tmp_path / "raw"), str(image_folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is not calibrated" in err and "diffad calibrate" in err


def test_find_images_recurses_and_filters_extensions(image_folder):
    from diffad.detect import find_images

    names = sorted(p.name for p in find_images([image_folder]).images)
    assert names == ["a.png", "b.png", "c.png", "notes.png", "truncated.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images([image_folder / "nope"])


def test_detect_refuses_a_map_with_no_calibrated_threshold(calibrated_model, image_folder, tmp_path):
    """A calibration made before the combined map existed has no threshold for it: detect must say to
    recalibrate, never write a row without a decision (fail closed)."""
    import torch

    from diffad.detect import detect
    from diffad.pipelines.self_aware_inpaint import AnomalyCalibration

    old = load_pipeline(calibrated_model)
    cal = old.calibration
    keep = [n for n in cal.config.threshold_names if n != "self_aware/combined"]
    stale = AnomalyCalibration(resolution=cal.config.resolution, sampling_config=cal.config.sampling_config,
                               threshold_names=keep, num_images=cal.config.num_images)
    stale.q_threshold.copy_(cal.q_threshold)
    stale.thresholds.copy_(torch.tensor([cal.threshold(n) for n in keep]))
    old.register_modules(calibration=stale)
    with pytest.raises(ValueError, match="no calibrated threshold for self_aware/combined.*diffad calibrate"):
        detect(calibrated_model, [image_folder], tmp_path / "out", pipe=old)
    assert not (tmp_path / "out" / "results.csv").exists()
    # the maps that do have a threshold still run
    summary = detect(calibrated_model, [image_folder], tmp_path / "out2", pipe=old, anomaly_map="multiscale")
    assert summary.results_csv.is_file()


# ------------------------------------------------------------------ several processes (accelerate launch, gloo)


def _rank_photos(root: Path) -> Path:
    """Six photos and two unreadable files, so that one process's batches of 3 straddle the ranks' shares and its
    rounds: the unreadable files' rows come before the rows of batches read around them."""
    root.mkdir()
    for i in (0, 1, 3, 4, 5, 7):
        Image.fromarray(np.random.default_rng(10 + i).integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(
            root / f"p{i}.png")
    (root / "p2_broken.png").write_text("not an image")
    (root / "p6_broken.png").write_bytes((root / "p0.png").read_bytes()[:60])
    return root


def _launch_two_ranks(*argv: str) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``diffad detect`` on two CPU processes (one gloo group), on a free port: the default
    one may be held by another launch on this machine, or still by the previous one."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "-m", "diffad.cli", "detect", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _overlays(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (out / "overlays").iterdir()}


def test_two_ranks_write_one_process_results_byte_for_byte(calibrated_model, tmp_path):
    photos = _rank_photos(tmp_path / "photos")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["detect", "--model", str(calibrated_model), str(photos), "--out", str(one), "--batch-size", "3"]) == 0
    proc = _launch_two_ranks("--model", str(calibrated_model), str(photos), "--out", str(two), "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = (one / "results.csv").read_bytes()
    assert (two / "results.csv").read_bytes() == expected
    # the row order is one process's, not the input order: the unreadable files' rows come first
    assert [Path(r["file"]).name for r in _rows(two / "results.csv")] == [
        "p2_broken.png", "p0.png", "p1.png", "p3.png", "p6_broken.png", "p4.png", "p5.png", "p7.png"]
    assert _overlays(two) == _overlays(one) and len(_overlays(one)) == 6
    assert (two / "results.json").read_bytes() == (one / "results.json").read_bytes()
    assert proc.stdout.count("scored 6 images") == 1, proc.stdout  # the main process reports, once


def test_two_ranks_respect_the_lock_and_resume_as_one_process(calibrated_model, tmp_path):
    from diffad.detect import LOCK_NAME
    from diffad.training_utils import file_lock

    photos = _rank_photos(tmp_path / "photos")
    first = [str(photos / "p0.png"), str(photos / "p3.png"), str(photos / "p6_broken.png")]
    one, two = tmp_path / "one", tmp_path / "two"
    for out in (one, two):  # an interrupted run: three files done
        assert main(["detect", "--model", str(calibrated_model), *first, "--out", str(out)]) == 0
    with file_lock(two / LOCK_NAME):  # another detect writes there: both ranks stop, none waits forever
        proc = _launch_two_ranks("--model", str(calibrated_model), str(photos), "--out", str(two))
    assert proc.returncode != 0
    assert proc.stderr.count("another diffad detect is writing to") == 1, proc.stderr[-3000:]
    assert main(["detect", "--model", str(calibrated_model), str(photos), "--out", str(one), "--batch-size", "2"]) == 0
    proc = _launch_two_ranks("--model", str(calibrated_model), str(photos), "--out", str(two), "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 already done" in proc.stdout, proc.stdout
    assert (two / "results.csv").read_bytes() == (one / "results.csv").read_bytes()
    assert len(_rows(two / "results.csv")) == 8


def test_commands_load_the_model_onto_the_gpu_when_there_is_one(calibrated_model, monkeypatch):
    """detect, calibrate and evaluate load through one loader: on a machine with a GPU the networks go there (they
    stayed on the CPU before). No GPU here: the device is faked and the pipeline's move recorded."""
    import torch

    import diffad.detect as detect_module

    moved = []
    monkeypatch.setattr(detect_module, "inference_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(SelfAwareInpaintPipeline, "to", lambda self, device: moved.append(str(device)) or self)
    load_pipeline(calibrated_model)
    assert moved == ["cuda"]
    load_pipeline(calibrated_model, device="cpu")  # asked for the CPU (export): nothing moves
    assert moved == ["cuda"]
    monkeypatch.setattr(detect_module, "inference_device", lambda: torch.device("cpu"))
    load_pipeline(calibrated_model)
    assert moved == ["cuda"]  # on the CPU nothing moves


def test_a_launched_process_ends_its_process_group_after_success_and_error(monkeypatch):
    """detect and evaluate join an ``accelerate launch`` through one helper, which destroys the process group on the
    way out: left to interpreter shutdown, a gloo group aborted a finished rank in CI (SIGABRT, a failed launch)."""
    import diffad.launch as launch

    ended = []

    class RecordingAccelerator:  # a real one would wait for the launch's other process
        def __init__(self, cpu: bool):
            self.cpu = cpu

        def end_training(self):
            ended.append(self.cpu)

    monkeypatch.setattr(launch, "Accelerator", RecordingAccelerator)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with launch.launched_accelerator() as accelerator:  # one process: no group at all
        assert accelerator is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    with launch.launched_accelerator() as accelerator:
        assert isinstance(accelerator, RecordingAccelerator) and accelerator.cpu  # no GPU here: one gloo group
    assert ended == [True]
    with pytest.raises(SystemExit):
        with launch.launched_accelerator():
            raise SystemExit(1)  # how a non-main rank leaves when another failed
    assert ended == [True, True]
