"""Issue 23: the app keeps users apart, outputs never lose or mix data, bombs are refused. Each test is one case
of the hostile probe (its number in the test's name), asserting the behaviour a user sees: exit codes, one-line
messages, the rows and files left behind."""

from __future__ import annotations

import csv
import fcntl
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.cli import main
from tiny_components import saved_tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("reliability") / "model")


@pytest.fixture(scope="module")
def pipe(model):
    from diffad.detect import load_pipeline

    return load_pipeline(model)


def _photo(folder: Path, name: str, seed: int = 0, size: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        path, format="PNG" if path.suffix.lower() not in (".gif", ".tif", ".tiff") else None)
    return path


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A few hundred bytes that claim ``width x height`` pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------ the app (cases 1, 2, 14, 20)


def _app(pipe, model):
    gr = pytest.importorskip("gradio")
    from diffad.app import Inspector, build_app

    demo = build_app(Inspector(pipe), model)
    handlers = {f.fn.__name__: f.fn for f in demo.fns.values() if getattr(f, "fn", None) is not None}
    states = [b for b in demo.blocks.values() if isinstance(b, gr.State)]
    return demo, handlers, states


def test_case1_two_app_sessions_never_see_each_others_rows(pipe, model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _demo, handlers, _states = _app(pipe, model)
    inspect, redecide = handlers["inspect"], handlers["redecide"]
    a = _photo(tmp_path / "a", "from_a.png", seed=1)
    b = _photo(tmp_path / "b", "from_b.png", seed=2)
    name = pipe.default_map("self_aware")
    threshold = pipe.calibration.threshold(f"self_aware/{name}")
    state_a, *_, csv_a, _, _, _ = inspect([str(a)], None, name, threshold)
    state_b, *_, csv_b, _, _, _ = inspect([str(b)], None, name, threshold)
    assert Path(csv_a) != Path(csv_b)
    _, _, csv_a2, *_ = redecide(state_a, name, threshold / 2)  # session A moves its threshold after B inspected
    assert [r["file"] for r in _rows(Path(csv_a2))] == ["from_a.png"]
    assert [r["file"] for r in _rows(Path(csv_b))] == ["from_b.png"]


def test_case1_session_folders_go_at_session_end_and_app_exit_and_a_build_leaves_none(pipe, model, tmp_path,
                                                                                     monkeypatch):
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(root))
    demo, handlers, states = _app(pipe, model)
    assert list(root.iterdir()) == []  # building the page (or failing to start it) leaves no folder behind
    name = pipe.default_map("self_aware")
    threshold = pipe.calibration.threshold(f"self_aware/{name}")
    session_a, *_, csv_a, _, _, _ = handlers["inspect"]([str(_photo(tmp_path / "p", "x.png"))], None, name, threshold)
    session_b, *_, csv_b, _, _, _ = handlers["inspect"]([str(_photo(tmp_path / "p", "y.png"))], None, name, threshold)
    assert Path(csv_a).is_file() and Path(csv_b).is_file()
    callbacks = [s.delete_callback for s in states if getattr(s, "delete_callback", None)]
    assert callbacks, "the session state has no delete_callback: nothing removes a session's files"
    callbacks[0](session_a)  # gradio calls it when session A ends
    assert not Path(csv_a).exists() and Path(csv_b).is_file()
    from diffad.app import close_app

    close_app(demo)  # what `diffad app` runs when it stops
    assert not Path(csv_b).exists() and list(root.iterdir()) == []


def test_case2_csv_cells_that_start_a_formula_are_neutralised_everywhere(pipe, model, tmp_path, monkeypatch):
    from diffad.evaluation import CategoryEvaluation, write_outputs

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _demo, handlers, _ = _app(pipe, model)
    names = ["=1+2.png", "@SUM(A1).png", "+cmd.png", "-2+3.png"]
    uploads = [str(_photo(tmp_path / "up", n, seed=i)) for i, n in enumerate(names)]
    name = pipe.default_map("self_aware")
    *_, csv_path, _, _, _ = handlers["inspect"](uploads, None, name, 1.0)
    cells = [r["file"] for r in _rows(Path(csv_path))]
    assert cells == ["'" + n for n in names]
    # detect: the same writer, and a re-run still knows these files are done
    photos = tmp_path / "up"
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert len(rows) == 4 and not any(v[:1] in "=+-@\t\r" for r in rows for v in r.values() if v)
    # evaluate: a category named like a formula
    record = {"file": "test/good/000.png", "category": "=HYPERLINK(\"x\")", "defect_type": "good", "label": 0,
              "method": "self_aware", "map": "combined", "score": "0.5", "decision": "ok", "threshold": "0.7"}
    write_outputs([CategoryEvaluation(category="weave", records=[record], metrics={})], tmp_path / "eval", {})
    assert _rows(tmp_path / "eval" / "per_image.csv")[0]["category"] == "'=HYPERLINK(\"x\")"


def test_case14_every_results_csv_carries_map_and_threshold(pipe, model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    photos = tmp_path / "photos"
    _photo(photos, "a.png")
    assert main(["detect", "--model", str(model), str(photos), "--out", str(tmp_path / "out")]) == 0
    row = _rows(tmp_path / "out" / "results.csv")[0]
    name = pipe.default_map("self_aware")
    assert row["map"] == name and float(row["threshold"]) == pytest.approx(
        pipe.calibration.threshold(f"self_aware/{name}"), rel=1e-6)
    _demo, handlers, _ = _app(pipe, model)
    session, *_ = handlers["inspect"]([str(photos / "a.png")], None, name, 1.0)
    _, _, moved, *_ = handlers["redecide"](session, name, -1.0)  # the user drags the threshold below every score
    row = _rows(Path(moved))[0]
    assert row["decision"] == "defect" and row["map"] == name and float(row["threshold"]) == -1.0


def test_case20_app_error_rows_name_the_upload_in_words(pipe, model, tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    gradio_cache = tmp_path / "gradio" / "0123456789abcdef"
    gradio_cache.mkdir(parents=True)
    (gradio_cache / "broken.png").write_text("not an image")
    _demo, handlers, _ = _app(pipe, model)
    *_, csv_path, _, _, _ = handlers["inspect"]([str(gradio_cache / "broken.png")], None, "combined", 1.0)
    row = _rows(Path(csv_path))[0]
    assert row["file"] == "broken.png" and row["decision"] == "error"
    assert str(tmp_path) not in row["error"] and "Error" not in row["error"] and "broken.png" in row["error"]
    assert "not an image" in row["error"]


def test_case20_the_page_shows_a_model_folder_by_its_name_not_a_local_path(pipe, model):
    from diffad.app import Inspector, model_summary

    text = model_summary(model, Inspector(pipe))
    assert f"**Model** `{model.name}`" in text and str(model.parent) not in text


# ------------------------------------------------------------------ bombs (cases 3, 4)


def test_case3_zip_bombs_are_refused_member_by_member_before_extraction(tmp_path, monkeypatch):
    from diffad import app

    archive = tmp_path / "bomb.zip"
    good = _photo(tmp_path / "src", "good.png")
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(good, "parts/good.png")
        z.writestr("parts/zeros.bmp", b"\0" * (8 << 20))  # 8 MiB that deflate to ~8 KiB: a ratio of ~1000
    work = tmp_path / "work"
    work.mkdir()
    uploads = app.expand_uploads([str(archive)], work)
    by_name = {u[0]: u for u in uploads}
    assert set(by_name) == {"bomb.zip/parts/good.png", "bomb.zip/parts/zeros.bmp"}
    bomb = by_name["bomb.zip/parts/zeros.bmp"]
    assert bomb[1] is None and "compression ratio" in bomb[2]
    assert sum(p.stat().st_size for p in work.rglob("*") if p.is_file()) < (1 << 20)  # never extracted
    # the total and member caps (small here: the defaults are in the README)
    monkeypatch.setattr(app, "ZIP_MAX_TOTAL_BYTES", good.stat().st_size + 10)
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as z:
        z.write(good, "a.png")
        z.write(good, "b.png")
    rows = app.expand_uploads([str(tmp_path / "two.zip")], work)
    assert [r[2] for r in rows][0] == "" and "uncompressed" in rows[1][2]
    monkeypatch.setattr(app, "ZIP_MAX_MEMBERS", 1)
    rows = app.expand_uploads([str(tmp_path / "two.zip")], work)
    assert len(rows) == 1 and rows[0][1] is None and "2 files" in rows[0][2]


def test_case4_a_decompression_bomb_is_refused_before_decoding(model, tmp_path, monkeypatch, capsys):
    from diffad.data import read_image

    photos = tmp_path / "photos"
    photos.mkdir()
    _png_header_only(photos / "bomb.png", 12500, 12500)
    _photo(photos, "fine.png")
    with pytest.raises(ValueError, match=r"bomb.png: 12500x12500 px is over the pixel budget") as err:
        read_image(photos / "bomb.png")
    assert "DIFFAD_MAX_IMAGE_PIXELS" in str(err.value)
    assert main(["detect", "--model", str(model), str(photos), "--out", str(tmp_path / "out")]) == 0
    rows = {Path(r["file"]).name: r for r in _rows(tmp_path / "out" / "results.csv")}
    assert rows["bomb.png"]["decision"] == "error" and "pixel budget" in rows["bomb.png"]["error"]
    assert rows["fine.png"]["decision"] in ("ok", "defect")
    monkeypatch.setenv("DIFFAD_MAX_IMAGE_PIXELS", "1000")  # configurable
    with pytest.raises(ValueError, match="40x40 px is over the pixel budget of 1000"):
        read_image(photos / "fine.png")


# ------------------------------------------------------------------ detect's results (cases 8, 9, 15, 17)


def test_case8_a_torn_last_row_is_repaired_on_resume(model, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(3):
        _photo(photos, f"{i}.png", seed=i)
    out = tmp_path / "out"
    assert main(["detect", "--model", str(model), str(photos / "0.png"), str(photos / "1.png"), "--out",
                 str(out)]) == 0
    text = (out / "results.csv").read_text(encoding="utf-8")
    (out / "results.csv").write_text(text[: len(text) - 12], encoding="utf-8")  # the disk filled up mid-row
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert sorted(Path(r["file"]).name for r in rows) == ["0.png", "1.png", "2.png"]
    assert all(r["decision"] in ("ok", "defect") and np.isfinite(float(r["score"])) for r in rows)


def test_case8_a_row_that_cannot_be_written_whole_is_not_written_at_all(tmp_path, monkeypatch):
    import errno
    import os

    from diffad import results

    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:  # half of the row reaches the disk, then ENOSPC
            real_write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    path = tmp_path / "results.csv"
    with results.ResultsFile(path, ("file", "score")) as table:
        table.write([{"file": "a.png", "score": "1"}])
        monkeypatch.setattr(results.os, "write", full_disk)
        with pytest.raises(OSError, match="No space left"):
            table.write([{"file": "b.png", "score": "2"}])
    assert _rows(path) == [{"file": "a.png", "score": "1"}]


def test_case9_detect_refuses_to_append_under_another_map_method_seed_or_calibration(model, tmp_path, capsys):
    import shutil

    photos = tmp_path / "photos"
    _photo(photos, "a.png")
    out = tmp_path / "out"
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    identity = json.loads((out / "results.json").read_text())
    assert identity["map"] == "combined" and identity["method"] == "self_aware" and identity["calibration"]
    capsys.readouterr()
    for extra, what in ((["--anomaly-map", "multiscale"], "map"), (["--method", "denoise"], "method"),
                        (["--seed", "3"], "seed")):
        assert main(["detect", "--model", str(model), str(photos), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{what} " in err and "another --out" in err, err
    other = tmp_path / "other_model"
    shutil.copytree(model, other)
    _photo(photos, "b.png", seed=1)  # the same calibration in a moved folder is the same model: it resumes
    assert main(["detect", "--model", str(other), str(photos), "--out", str(out)]) == 0
    assert len(_rows(out / "results.csv")) == 2
    from diffad.detect import load_pipeline
    from tiny_components import calibrate_cheaply, random_images

    repiped = calibrate_cheaply(load_pipeline(other), random_images(4, seed=9))
    repiped.save_pretrained(str(other))
    assert main(["detect", "--model", str(other), str(photos), "--out", str(out)]) == 2
    assert "calibration" in capsys.readouterr().err
    assert len(_rows(out / "results.csv")) == 2


def test_case15_a_250_character_file_name_is_scored(model, tmp_path):
    photos = tmp_path / "photos"
    _photo(photos, "é" * 2 + "a" * 240 + ".png")  # 246 characters, 248 bytes: near NAME_MAX
    out = tmp_path / "out"
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    row = _rows(out / "results.csv")[0]
    assert row["decision"] in ("ok", "defect") and (out / row["overlay"]).is_file()
    assert len((out / row["overlay"]).name.encode()) <= 255


def test_case17_one_walking_rule_follows_links_takes_gifs_and_names_every_skipped_file(model, tmp_path, capsys):
    photos = tmp_path / "photos"
    _photo(photos, "a.png")
    _photo(photos, "b.gif", seed=1)
    _photo(tmp_path / "elsewhere", "c.png", seed=2)
    (photos / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (photos / "notes.txt").write_text("not an image")
    pages = [Image.fromarray(np.full((40, 40, 3), v, dtype=np.uint8)) for v in (10, 200)]
    pages[0].save(photos / "two_pages.tif", save_all=True, append_images=pages[1:])
    out = tmp_path / "out"
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    rows = {Path(r["file"]).name: r for r in _rows(out / "results.csv")}
    assert set(rows) == {"a.png", "b.gif", "c.png", "two_pages.tif"}
    assert rows["b.gif"]["decision"] in ("ok", "defect") and rows["c.png"]["decision"] in ("ok", "defect")
    assert rows["two_pages.tif"]["decision"] == "error" and "2 pages" in rows["two_pages.tif"]["error"]
    assert "1 skipped" in stdout and "notes.txt" in stdout
    from diffad.app import expand_uploads
    from diffad.data import IMAGE_EXTENSIONS as data_formats
    from diffad.detect import IMAGE_EXTENSIONS as detect_formats

    assert ".gif" in data_formats and set(data_formats) == set(detect_formats)
    with zipfile.ZipFile(tmp_path / "u.zip", "w") as z:
        z.write(photos / "b.gif", "b.gif")
        z.write(photos / "notes.txt", "notes.txt")
    uploads = expand_uploads([str(tmp_path / "u.zip")], tmp_path)
    assert [(u[0], bool(u[2])) for u in uploads] == [("u.zip/b.gif", False), ("u.zip/notes.txt", True)]


# ------------------------------------------------------------------ training's output folder (cases 5, 6)


def _train_args(data: Path, out: Path, *extra: str):
    from diffad.synthetic import SYNTHETIC_CATEGORIES
    from diffad.training import train_ddpm

    return train_ddpm.parse_args(["--data_dir", str(data), "--category", SYNTHETIC_CATEGORIES[0], "--preset", "tiny",
                                  "--resolution", "32", "--train_batch_size", "4", "--report_to", "none",
                                  "--output_dir", str(out), "--max_train_steps", "1", *extra])


def test_case5_a_second_train_into_the_same_output_dir_fails_at_once(tmp_path):
    from diffad.training import train_ddpm

    out = tmp_path / "run"
    out.mkdir()
    with (out / ".diffad-train.lock").open("a") as held:  # what a running `diffad train` holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=r"another diffad training run is writing to .*run: wait for it"):
            train_ddpm.main(_train_args(tmp_path / "no-data-needed", out))
    assert not (out / "model_index.json").exists()


def test_case6_training_deletes_only_what_diffad_wrote_and_says_so(tmp_path, caplog):
    import logging

    from accelerate import Accelerator
    import torch

    from diffad.files import incomplete_path, remove_incomplete
    from diffad.training_utils import clear_checkpoints, save_checkpoint

    out = tmp_path / "run"
    out.mkdir()
    (out / ".bashrc.old-2023").write_text("mine")
    (out / ".thesis.incomplete").mkdir()
    (out / ".thesis.incomplete" / "chapter1.tex").write_text("mine")
    leftover = incomplete_path(out / "checkpoint-7")
    leftover.mkdir()
    with caplog.at_level(logging.INFO):
        removed = remove_incomplete(out)
    assert removed == [leftover] and (out / ".bashrc.old-2023").is_file() and (out / ".thesis.incomplete").is_dir()
    assert str(leftover) in caplog.text
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    checkpoint = save_checkpoint(accelerator, out, 1999, {"state": {}, "log": {}}, None, None)
    (checkpoint / "important.txt").write_text("mine")
    clear_checkpoints(out)
    kept = [p for p in out.rglob("important.txt")]
    assert len(kept) == 1 and kept[0].read_text() == "mine"
    assert not (out / "checkpoint-1999").exists()  # no longer a checkpoint a resume could pick up
    assert not any(p.suffix == ".safetensors" for p in out.rglob("*")), "diffad's own files are deleted"
    del model


def test_case16_a_run_that_cannot_fit_in_memory_is_refused_in_one_line_before_its_folder_exists(
        tmp_path, capsys, monkeypatch):
    import diffad.training_utils as training_utils
    from diffad.presets import unet_kwargs
    from diffad.training import train_ddpm

    monkeypatch.setattr(training_utils, "available_memory", lambda device=None: 256 * 2**20)  # a small machine
    out = tmp_path / "big-run"
    code = main(["train", "--preset", "tiny", "--resolution", "256", "--data_dir", str(tmp_path / "no-data-needed"),
                 "--report_to", "none", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "diffad train: error: training on 8 x 256 px images (tiny preset) needs about" in err
    assert "0.2 GiB is available" in err and all(flag in err for flag in ("--resolution", "--crop_size",
                                                                         "--train_batch_size", "--skip_memory_check"))
    assert not out.exists(), "nothing is written before the refusal"
    # what fits starts (the tiny preset at its own 32 px), and anything does with --skip_memory_check
    train_ddpm.check_memory(train_ddpm.parse_args(["--preset", "tiny", "--output_dir", str(out)]))
    with pytest.raises(ValueError, match="no-data-needed"):  # past the check: the data is read
        train_ddpm.main(train_ddpm.parse_args(["--preset", "tiny", "--resolution", "256", "--skip_memory_check",
                                               "--data_dir", str(tmp_path / "no-data-needed"), "--output_dir",
                                               str(out), "--report_to", "none"]))
    # the run (tiny, --resolution 4096: killed by the kernel at 22.8 GB) is estimated above that
    needed = training_utils.estimate_training_memory(unet_kwargs("tiny", resolution=4096), crop_size=4096,
                                                     resolution=4096, batch_size=8, eval_batch_size=16, use_ema=False)
    assert needed > 22.8e9
    # and the estimate grows with the batch and the crop
    small = training_utils.estimate_training_memory(unet_kwargs("tiny", resolution=64), crop_size=64, resolution=64,
                                                    batch_size=1, eval_batch_size=1, use_ema=False)
    assert small < training_utils.estimate_training_memory(unet_kwargs("tiny", resolution=64), crop_size=64,
                                                           resolution=64, batch_size=2, eval_batch_size=1,
                                                           use_ema=False) < needed


# ------------------------------------------------------------------ diffad space (case 7)


def test_case7_space_refuses_a_non_empty_out(model, tmp_path, capsys):
    pytest.importorskip("gradio")
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# my card\n")
    code = main(["space", "--model", str(folder), "--repo-id", "acme/part", "--out", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "is a model folder" in err and err.count("\n") == 1
    assert (folder / "README.md").read_text().endswith("# my card\n") and not (folder / "app.py").exists()
    space = tmp_path / "space"
    space.mkdir()
    (space / "README.md").write_text("my notes")
    assert main(["space", "--model", str(folder), "--repo-id", "acme/part", "--out", str(space)]) == 2
    assert "is not empty" in capsys.readouterr().err and (space / "README.md").read_text() == "my notes"
    assert main(["space", "--model", str(folder), "--repo-id", "acme/part", "--out", str(space), "--force"]) == 0
    assert main(["space", "--model", str(folder), "--repo-id", "acme/part", "--out", str(tmp_path / "new")]) == 0


# ------------------------------------------------------------------ calibrate's split is training's (case 10, 11)


def test_case10_calibrate_takes_the_training_split_and_refuses_another(model, tmp_path, capsys, monkeypatch):
    import shutil

    import diffad.calibration
    from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset

    category = SYNTHETIC_CATEGORIES[0]
    data = make_synthetic_dataset(tmp_path / "data", resolution=32, num_train=10, num_test_good=1,
                                  num_test_defect_per_type=1, categories=[category])
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "training_log.json").write_text(json.dumps({"config": {"validation_fraction": 0.5, "seed": 3,
                                                                     "category": category}}))
    for flags, message in ((["--validation-fraction", "0.2"], "trained with --validation-fraction 0.5"),
                           (["--seed", "0"], "trained with --seed 3")):
        code = main(["calibrate", "--model", str(folder), "--data", str(data), "--category", category, *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, err
    code = main(["calibrate", "--model", str(folder), "--data", str(data), "--category", "nut"])
    assert code == 2 and f"was trained on {category!r}" in capsys.readouterr().err
    seen = {}
    real = diffad.calibration.load_mvtec

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffad.calibration, "load_mvtec", spy)
    assert main(["calibrate", "--model", str(folder), "--data", str(data), "--category", category]) == 0
    assert seen["validation_fraction"] == 0.5 and seen["seed"] == 3


# ------------------------------------------------------------------ properties: any name, size or format; sessions


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_NAME_CHARS = st.sampled_from(list("ab=+-@,\"' \t;é漢") + ["\n"])
_FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "bmp": "BMP", "tif": "TIFF", "webp": "WEBP", "txt": None}


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stem=st.text(_NAME_CHARS, min_size=1, max_size=40), long=st.booleans(), side=st.sampled_from((3, 9, 40)),
       suffix=st.sampled_from(sorted(_FORMATS)), seed=st.integers(0, 2**16))
def test_any_name_size_or_format_never_crashes_detect_or_the_app(model, pipe, tmp_path_factory, capsys, stem, long,
                                                                 side, suffix, seed):
    from diffad.app import Inspector, expand_uploads
    from diffad.results import safe_cell

    folder = tmp_path_factory.mktemp("names")
    name = (stem + "x" * 200 if long else stem) + "." + suffix
    path = folder / "photos" / name
    path.parent.mkdir()
    if _FORMATS[suffix] is None:
        path.write_text("not an image")
    else:
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            path, format=_FORMATS[suffix])
    code = main(["detect", "--model", str(model), str(path), "--out", str(folder / "out")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out and code in (0, 2)
    rows = _rows(folder / "out" / "results.csv")
    assert [r["file"] for r in rows] == [safe_cell(str(path.resolve()))]
    assert (rows[0]["decision"] in ("ok", "defect")) == (code == 0)
    inspector = Inspector(pipe)
    items = [inspector.inspect(u.path, u.name) for u in expand_uploads([str(path)], folder / "work")]
    row = inspector.rows(items, "combined", 1.0)[0]
    assert row["file"] == name and (row["decision"] == "error") == (code == 2)
    if row["error"]:
        assert str(folder) not in row["error"] and row["error"].startswith(name)


def test_case1_concurrent_sessions_never_see_each_others_rows(pipe, model, tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _demo, handlers, _ = _app(pipe, model)
    name = pipe.default_map("self_aware")
    seen: dict[str, list[list[str]]] = {"a": [], "b": []}
    last: dict[str, Path] = {}
    errors: list[BaseException] = []

    def user(who: str) -> None:
        try:
            session = None
            for i in range(3):
                photo = _photo(tmp_path / who, f"{who}{i}.png", seed={"a": 10, "b": 20}[who] + i)
                session, *_, csv_path, _, _, _ = handlers["inspect"]([str(photo)], session, name, 1.0)
                _, _, csv_path, *_ = handlers["redecide"](session, name, 0.5 + i)
                seen[who].append([r["file"] for r in _rows(Path(csv_path))])
            last[who] = Path(csv_path)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=user, args=(who,)) for who in seen]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for who, downloads in seen.items():
        assert downloads == [[f"{who}{j}.png" for j in range(i + 1)] for i in range(3)]
        # what each user downloads once both are done: their own rows only
        assert [r["file"] for r in _rows(last[who])] == [f"{who}{j}.png" for j in range(3)]


# ------------------------------------------------------------------ the app on a busy port (case 18, third part)


def test_case18_the_app_on_a_busy_port_names_port_before_any_url(model, capsys, busy_port):
    pytest.importorskip("gradio")
    port = busy_port
    code = main(["app", "--model", str(model), "--port", str(port)])
    captured = capsys.readouterr()
    assert code == 2 and f"--port {port}: 127.0.0.1:{port} is in use" in captured.err and "another --port" in captured.err
    assert "http://" not in captured.out and "GRADIO_SERVER_PORT" not in captured.err


# ------------------------------------------------------------------ the data identified by content (cases 12, 11)


def test_case12_a_resume_on_other_images_under_the_same_folder_name_is_refused_and_case11_calibrate_refuses(
        tmp_path, caplog, capsys):
    import logging
    import shutil

    from diffad.calibration import calibrate_model
    from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset
    from diffad.training import train_ddpm

    def data(seed: int) -> Path:
        shutil.rmtree(tmp_path / "data", ignore_errors=True)
        return make_synthetic_dataset(tmp_path / "data", seed=seed, resolution=32, num_train=20, num_test_good=1,
                                      num_test_defect_per_type=1, categories=[SYNTHETIC_CATEGORIES[0]])

    out = tmp_path / "run"
    train_ddpm.main(_train_args(data(0), out, "--checkpointing_steps", "1", "--seed", "0"))
    recorded = json.loads((out / "training_log.json").read_text())["config"]["data_source"]  # for diffad card (19)
    assert recorded["dataset"] == "diffad-synthetic" and recorded["license"] == "apache-2.0"
    other = data(1)  # the same folder names, other images
    with pytest.raises(ValueError, match="was trained on other images"):
        train_ddpm.main(_train_args(other, out, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"))
    # case 11: calibrating on another category's (here: other) images is refused in one line, naming --data and
    # the override; nothing is written
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()  # the training runs' progress bars
    code = main(["calibrate", "--model", str(out), "--data", str(other), "--category", SYNTHETIC_CATEGORIES[0]])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"--data {other}:" in err and "content differs" in err
    assert "--allow-other-data" in err and sorted(p.name for p in out.iterdir()) == before
    with caplog.at_level(logging.WARNING, logger="diffad.calibration"):  # the explicit override calibrates, loudly
        calibrate_model(out, other, SYNTHETIC_CATEGORIES[0], config="fast", validation_fraction=None,
                        allow_other_data=True)
    assert "are not the ones" in caplog.text and "content differs" in caplog.text
