"""`diffad detect`: CSV rows, overlays, unreadable files skipped, re-runs resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.cli import main
from tiny_components import saved_tiny_pipeline


@pytest.fixture(scope="module")
def calibrated_model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("detect") / "model")


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


def test_detect_writes_rows_overlays_and_skips_broken_files(calibrated_model, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["detect", "--model", str(calibrated_model), str(image_folder), "--out", str(out),
                 "--batch-size", "2"])
    assert code == 0
    assert "scored 3 images (" in capsys.readouterr().out
    rows = _rows(out / "results.csv")
    by_name = {Path(r["file"]).name: r for r in rows}
    assert sorted(by_name) == ["a.png", "b.png", "c.png", "notes.png", "truncated.png"]
    for name in ("a.png", "b.png", "c.png"):
        row = by_name[name]
        assert row["decision"] in ("ok", "defect") and row["error"] == ""
        assert np.isfinite(float(row["score"])) and float(row["score"]) >= 0
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
    assert a.scored == b.scored == 1
    assert _rows(a.results_csv)[0]["score"] == _rows(b.results_csv)[0]["score"]


def test_detect_no_readable_image_exits_2(calibrated_model, image_folder, tmp_path, capsys):
    code = main(["detect", "--model", str(calibrated_model), str(image_folder / "notes.png"),
                 str(image_folder / "truncated.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "diffad detect: error: none of the 2 input files could be read" in err


@pytest.mark.parametrize("args, message", [
    (["--model", "MISSING_DIR"], "no such folder, and not a Hub repo id"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
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


def test_detect_uncalibrated_model_is_refused(tmp_path, image_folder, capsys):
    saved_tiny_pipeline(tmp_path / "raw", calibrated=False)
    code = main(["detect", "--model", str(tmp_path / "raw"), str(image_folder), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "is not calibrated" in err and "diffad calibrate" in err


def test_find_images_recurses_and_filters_extensions(image_folder):
    from diffad.detect import find_images

    names = sorted(p.name for p in find_images([image_folder]))
    assert names == ["a.png", "b.png", "c.png", "notes.png", "truncated.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images([image_folder / "nope"])
