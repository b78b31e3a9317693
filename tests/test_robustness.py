"""Issue 13: diffad fails closed. Each test is a case that gave a silent wrong result (or a misleading message)
before, with an assertion on the exit code, the one-line message and that nothing was lost."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffad.cli import main
from diffad.data import MVTecDataError, load_mvtec, read_image
from diffad.detect import detect, load_pipeline
from diffad.pipelines.self_aware_inpaint import MIN_IMAGE_SIDE, SelfAwareInpaintPipeline, rgb_array
from tiny_components import saved_tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("robust") / "model")


def _photo(seed: int = 0, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _one_photo(tmp_path: Path, seed: int = 0) -> Path:
    """A folder ``photos/`` holding one readable photo, ``a.png``."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(seed)).save(photos / "a.png")
    return photos


def _rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------ 1. corrupted weights never pass a part


def _corrupt(model: Path, tmp_path: Path) -> Path:
    import shutil

    bad = tmp_path / "bad_model"
    shutil.copytree(model, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.numel() > 100)
    tensors[name].view(-1)[:50] = float("nan")
    save_file(tensors, weights)
    return bad


def test_nan_weights_are_refused_at_load_naming_the_file(model, tmp_path, capsys):
    bad = _corrupt(model, tmp_path)
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors holds 50 NaN or infinite"):
        SelfAwareInpaintPipeline.from_pretrained(bad)
    code = main(["detect", "--model", str(bad), str(_one_photo(tmp_path)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "NaN or infinite weights" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.csv").exists()


def test_a_nan_score_is_never_ok_in_the_pipeline_or_detect(model, tmp_path, capsys):
    pipe = load_pipeline(model)
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[:10] = float("nan")  # corrupted in memory, after loading
    out = pipe(torch.zeros(1, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    name = pipe.default_map("self_aware")
    assert not np.isfinite(out.scores[name]).all() and out.is_anomalous[name].all()
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo()).save(photos / "a.png")
    summary = detect(model, [photos], tmp_path / "out", pipe=pipe)
    row = _rows(tmp_path / "out" / "results.csv")[0]
    assert summary.nonfinite == 1 and summary.scored == 0
    assert row["decision"] == "error" and "non-finite" in row["error"] and row["score"] == ""


# ------------------------------------------------------------------ 3. one image reader, every mode


def _modes(rgb: np.ndarray) -> dict[str, Image.Image]:
    gray = rgb.mean(axis=-1).round().astype(np.uint8)
    base = Image.fromarray(rgb)
    return {
        "RGB": base, "L": Image.fromarray(gray), "LA": Image.fromarray(gray).convert("LA"),
        "P": base.convert("P"), "RGBA": base.convert("RGBA"), "CMYK": base.convert("CMYK"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257), "I": Image.fromarray(gray.astype(np.int32) * 257),
        "F": Image.fromarray(gray.astype(np.float32) / 255.0),
    }


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F"])
def test_every_mode_reads_to_the_same_rgb(mode):
    rgb = _photo(1)
    image = _modes(rgb)[mode]
    arr = rgb_array(image)
    assert arr.shape == (40, 40, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    gray = rgb.mean(axis=-1).round() / 255.0
    if mode in ("L", "LA", "I;16", "I", "F"):
        np.testing.assert_allclose(arr[..., 0], gray, atol=1e-6)  # 16-bit scaled, not saturated to white
    elif mode in ("RGB", "RGBA", "CMYK"):
        np.testing.assert_allclose(arr, rgb / 255.0, atol=1e-6)
    else:  # palette: quantised colours, close
        assert np.abs(arr - rgb / 255.0).mean() < 0.1


def test_a_16_bit_png_scores_as_its_8_bit_copy_in_detect_and_the_pipeline(model, tmp_path):
    rgb = _photo(2)
    gray = rgb.mean(axis=-1).round().astype(np.uint8)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(gray).save(photos / "eight.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(photos / "sixteen.png")
    assert Image.open(photos / "sixteen.png").mode.startswith("I")
    pipe = load_pipeline(model)
    a, b = read_image(photos / "eight.png"), read_image(photos / "sixteen.png")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(pipe.preprocess([Image.open(photos / "sixteen.png")]),
                                  pipe.preprocess([Image.open(photos / "eight.png")]))
    detect(model, [photos], tmp_path / "out", pipe=pipe)
    rows = {Path(r["file"]).name: r for r in _rows(tmp_path / "out" / "results.csv")}
    assert rows["eight.png"]["score"] == rows["sixteen.png"]["score"] != ""


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, :20] = 255  # left half white, 40 wide x 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # stored as is; shown rotated 90 degrees clockwise
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "rotated.jpg")
    assert image.size == (20, 40)  # width and height swapped: now 20 wide x 40 high
    arr = np.asarray(image)
    assert arr[:15].mean() > 200 and arr[25:].mean() < 50  # the white left half is now on top


# ------------------------------------------------------------------ 10. tiny images and broken links


def _mvtec(root: Path, n: int = 6) -> Path:
    good = root / "part" / "train" / "good"
    good.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(_photo(i, 16)).save(good / f"{i:03d}.png")
    return root


def test_an_image_below_the_minimum_size_is_refused_naming_the_file(tmp_path):
    root = _mvtec(tmp_path)
    Image.fromarray(_photo(9, 1)).save(root / "part" / "train" / "good" / "tiny.png")
    with pytest.raises(MVTecDataError, match=rf"tiny.png: the image is 1x1 px; diffad needs at least {MIN_IMAGE_SIDE}"):
        load_mvtec(root, "part", resolution=16)
    with pytest.raises(ValueError, match="image 0: the image is 1x1 px"):
        SelfAwareInpaintPipeline.preprocess(load_pipeline_stub(), [Image.new("RGB", (1, 1))])


def load_pipeline_stub():
    from tiny_components import tiny_pipeline

    return tiny_pipeline()


def test_a_broken_symlink_in_a_data_folder_is_named_in_a_warning(tmp_path, caplog):
    root = _mvtec(tmp_path)
    os.symlink(tmp_path / "nowhere.png", root / "part" / "train" / "good" / "link.png")
    with caplog.at_level(logging.WARNING, logger="diffad.data"):
        data = load_mvtec(root, "part", resolution=16)
    assert len(data["train"]) + len(data["validation"]) == 6
    assert any("link.png" in r.message and "broken symbolic link" in r.message for r in caplog.records)


# ------------------------------------------------------------------ 6. decisions never depend on the batch


def test_detect_csv_is_identical_at_batch_sizes_1_and_8(model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(9):
        Image.fromarray(_photo(10 + i)).save(photos / f"{i}.png")
    pipe = load_pipeline(model)
    detect(model, [photos], tmp_path / "b1", pipe=pipe, batch_size=1)
    detect(model, [photos], tmp_path / "b8", pipe=pipe, batch_size=8)
    assert (tmp_path / "b1" / "results.csv").read_bytes() == (tmp_path / "b8" / "results.csv").read_bytes()


# ------------------------------------------------------------------ 7, 8. a missing calibration or UNet file


@pytest.mark.parametrize("component, expected", [
    ("calibration", r"calibration/diffusion_pytorch_model.safetensors is missing .*diffad calibrate --model"),
    ("unet", r"unet/diffusion_pytorch_model.safetensors is missing .*retrain"),
])
def test_a_missing_component_names_its_file_and_the_fix(model, tmp_path, capsys, component, expected):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    if component == "calibration":
        shutil.rmtree(broken / "calibration")
    else:
        (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=expected):
        SelfAwareInpaintPipeline.from_pretrained(broken)
    code = main(["detect", "--model", str(broken), str(_one_photo(tmp_path)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "is missing" in err and ".bin" not in err and "unsafe" not in err.lower()


# ------------------------------------------------------------------ 9. a one-class test split fails before the model


def test_evaluate_on_a_one_class_test_split_fails_before_running_the_model(model, tmp_path, capsys, monkeypatch):
    root = _mvtec(tmp_path / "data")
    test_good = root / "part" / "test" / "good"
    test_good.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(_photo(30 + i, 16)).save(test_good / f"{i:03d}.png")
    calls = []
    original = SelfAwareInpaintPipeline.__call__
    monkeypatch.setattr(SelfAwareInpaintPipeline, "__call__", lambda *a, **k: calls.append(1) or original(*a, **k))
    code = main(["evaluate", "--model", str(model), "--data", str(root), "--category", "part",
                 "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert code == 2 and "only good images (3)" in err and "Traceback" not in err
    assert calls == []


# ------------------------------------------------------------------ 4. --out inside the input folder


def test_out_inside_the_input_folder_never_scores_its_own_overlays(model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.fromarray(_photo(40 + i)).save(photos / f"{i}.png")
    out = photos / "inspection"
    for _ in range(2):  # a second run over the same folder finds the first run's overlays there
        assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    rows = _rows(out / "results.csv")
    assert sorted(Path(r["file"]).name for r in rows) == ["0.png", "1.png"]
    assert len(list((out / "overlays").iterdir())) == 2


# ------------------------------------------------------------------ 2. --overwrite_output_dir and resume


def test_overwrite_clears_old_checkpoints_and_resume_refuses_another_runs_checkpoint(tmp_path):
    from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset
    from diffad.training import train_ddpm
    from diffad.training_utils import CHECKPOINT_MARKER, latest_checkpoint, list_checkpoints

    import json

    data = make_synthetic_dataset(tmp_path / "data", resolution=32, num_train=10, num_test_good=2,
                                  num_test_defect_per_type=1, categories=[SYNTHETIC_CATEGORIES[0]])
    out = tmp_path / "run"

    def train(*extra: str):
        return train_ddpm.main(train_ddpm.parse_args([
            "--data_dir", str(data), "--category", SYNTHETIC_CATEGORIES[0], "--preset", "tiny", "--resolution", "32",
            "--train_batch_size", "4", "--report_to", "none", "--output_dir", str(out), "--checkpointing_steps", "1",
            "--num_epochs", "100", *extra]))

    train("--seed", "0", "--learning_rate", "1e-3", "--max_train_steps", "3")
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    outside = tmp_path / "keep-me"
    outside.mkdir()
    (out / "checkpoint-99").symlink_to(outside, target_is_directory=True)  # never followed out of the folder
    # a new run in the same folder: the old run's checkpoints go, so `latest` can only find the new run's own
    train("--seed", "1", "--learning_rate", "1e-4", "--max_train_steps", "1", "--overwrite_output_dir")
    assert [c.name for c in list_checkpoints(out)] == ["checkpoint-1"] and outside.is_dir()
    saved = json.loads((latest_checkpoint(out) / CHECKPOINT_MARKER).read_text())
    assert saved["log"]["config"]["seed"] == 1
    # resuming it with other settings is refused in one line, before any tensor is loaded
    with pytest.raises(ValueError, match=r"belongs to a run with learning_rate=0.0001, this run has "
                                         r"learning_rate=0.001") as err:
        train("--seed", "1", "--learning_rate", "1e-3", "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400
    with pytest.raises(ValueError, match="pass only one of them"):
        train("--seed", "1", "--max_train_steps", "2", "--overwrite_output_dir", "--resume_from_checkpoint", "latest")


# ------------------------------------------------------------------ 12. two detect runs into one folder


def test_a_second_detect_into_the_same_folder_fails_at_once(model, tmp_path, capsys):
    import fcntl

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(50)).save(photos / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    with (out / ".diffad-detect.lock").open("a") as held:  # what a running detect holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = main(["detect", "--model", str(model), str(photos), "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "another diffad detect is writing to" in err
        assert not (out / "results.csv").exists()
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0  # released: it runs
    assert len(_rows(out / "results.csv")) == 1


# ------------------------------------------------------------------ 5. push: an allow-list, no links, no local paths


def test_push_uploads_an_allow_list_never_through_links_and_runs_no_folder_code(model, tmp_path):
    import json
    import shutil

    from diffad.hub import assemble_hub_folder

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "README.md").write_text("# card\n")
    (folder / "notes.txt").write_text("private notes")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "x.json").write_text("{}")
    (folder / "unet" / "notes.txt").write_text("private")
    (folder / "training_log.json").write_text(json.dumps({"config": {"data_dir": "/home/me/secret/bottle",
                                                                     "seed": 0}}))
    marker = tmp_path / "ran.txt"
    (folder / "pipeline.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")  # must never run
    files = assemble_hub_folder(folder, tmp_path / "hub")
    assert "notes.txt" not in files and "unet/notes.txt" not in files
    assert not any(".ipynb" in f for f in files)
    assert json.loads((tmp_path / "hub" / "training_log.json").read_text())["config"]["data_dir"] == "bottle"
    from diffad.pipelines.self_aware_inpaint import pipeline as own

    assert (tmp_path / "hub" / "pipeline.py").read_bytes() == Path(own.__file__).read_bytes()
    assert not marker.exists()
    # a link out of the folder is refused, naming it
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    (folder / "unet" / "config.json").unlink()
    (folder / "unet" / "config.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"unet/config.json is a symbolic link"):
        assemble_hub_folder(folder, tmp_path / "hub2")


# ------------------------------------------------------------------ property: any image gives finite maps or a clear error

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_MODES = ("RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1")


def _random_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.int32))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32) * rng.choice([1.0, 255.0, 60000.0]))
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def loaded(model):
    return load_pipeline(model)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(_MODES), width=st.integers(1, 80), height=st.integers(1, 80),
       seed=st.integers(0, 2**16))
def test_any_image_gives_finite_maps_and_scores_or_a_clear_error(loaded, mode, width, height, seed):
    image = _random_image(mode, width, height, seed)
    if min(width, height) < MIN_IMAGE_SIDE:
        with pytest.raises(ValueError, match=f"at least {MIN_IMAGE_SIDE} px"):
            loaded([image], generator=torch.Generator().manual_seed(0))
        return
    out = loaded([image], generator=torch.Generator().manual_seed(0))
    for name, m in out.anomaly_maps.items():
        assert np.isfinite(m).all() and m.min() >= 0, name
        assert np.isfinite(out.scores[name]).all() and out.is_anomalous[name].dtype == bool


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mode=st.sampled_from(("RGB", "L", "RGBA", "P", "I;16", "1")), side=st.sampled_from((1, 5, 8, 33)),
       seed=st.integers(0, 2**16))
def test_detect_never_shows_a_traceback(model, tmp_path_factory, capsys, mode, side, seed):
    folder = tmp_path_factory.mktemp("prop")
    _random_image(mode, side, side, seed).save(folder / "x.png")
    code = main(["detect", "--model", str(model), str(folder), "--out", str(folder / "out")])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    row = _rows(folder / "out" / "results.csv")[0]
    if side < MIN_IMAGE_SIDE:
        assert code == 2 and row["decision"] == "error" and f"at least {MIN_IMAGE_SIDE} px" in row["error"]
    else:
        assert code == 0 and row["decision"] in ("ok", "defect") and np.isfinite(float(row["score"]))


def test_precision_auto_falls_back_to_fp32_without_cpu_bf16(monkeypatch, caplog):
    from diffad import precision

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_precision("auto") == "fp32"
    with caplog.at_level(logging.WARNING, logger="diffad.precision"):
        assert precision.resolve_precision("bf16") == "fp32"
    assert [r.message for r in caplog.records] == ["this CPU has no native bf16 (AVX512-BF16/AMX): running fp32"]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_precision("auto") == "bf16" and precision.resolve_precision("fp32") == "fp32"


def test_detect_refuses_another_precision_than_the_calibrations(model, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(_photo(60)).save(photos / "a.png")
    # the fixture is calibrated in fp32
    code = main(["detect", "--model", str(model), str(photos), "--out", str(tmp_path / "o"), "--precision", "bf16"])
    err = capsys.readouterr().err
    from diffad.precision import cpu_has_bf16

    if cpu_has_bf16():
        assert code == 2 and "was calibrated in fp32; recalibrate" in err
    else:  # bf16 resolves to fp32 here: the same precision
        assert code == 0
    assert main(["detect", "--model", str(model), str(photos), "--out", str(tmp_path / "o2"), "--precision",
                 "fp32"]) == 0


def test_a_time_budget_progress_bar_counts_seconds_of_the_budget_not_a_made_up_step_total(capsys):
    """issue 14: with only --max_train_minutes the bar showed `0/1000000 [1142:02:50]`."""
    from diffad.training_utils import TrainingProgress

    bar = TrainingProgress(max_steps=None, time_budget=120.0, desc="steps")
    bar.step(1, 30.4, loss="0.1")
    assert bar.bar.total == 120 and bar.bar.n == 30 and bar.bar.unit == "s"
    bar.step(2, 500.0)
    assert bar.bar.n == 120  # never past the budget
    bar.close()
    steps = TrainingProgress(max_steps=50, time_budget=120.0, initial_steps=10)
    steps.step(11, 1.0)
    assert steps.bar.total == 50 and steps.bar.n == 11
    steps.close()


# ------------------------------------------------------------------ clean cases worth keeping


def test_unicode_and_spaces_in_paths_and_a_6000_px_photo(model, tmp_path):
    photos = tmp_path / "fotos de piezas ü"
    photos.mkdir()
    Image.fromarray(_photo(70)).save(photos / "pièce 1.png")
    Image.new("RGB", (6000, 40), (120, 130, 140)).save(photos / "wide.png")
    out = tmp_path / "résultats"
    assert main(["detect", "--model", str(model), str(photos), "--out", str(out)]) == 0
    rows = {Path(r["file"]).name: r for r in _rows(out / "results.csv")}
    assert set(rows) == {"pièce 1.png", "wide.png"} and all(r["decision"] in ("ok", "defect") for r in rows.values())
    assert max(Image.open(out / rows["wide.png"]["overlay"]).size) <= 512  # overlays stay small


@pytest.mark.parametrize("damage", ["model_index", "safetensors"])
def test_corrupt_json_or_safetensors_is_one_line(model, tmp_path, capsys, damage):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(model, broken)
    if damage == "model_index":
        (broken / "model_index.json").write_text("{not json")
    else:
        weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    code = main(["detect", "--model", str(broken), str(_one_photo(tmp_path)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "results.csv").exists()


# ------------------------------------------------------------------ 11. no pickle in a checkpoint


def test_checkpoints_hold_no_pickle_and_resume_the_ema(tmp_path):
    import json

    import torch
    from safetensors.torch import load_file

    from diffad.synthetic import SYNTHETIC_CATEGORIES, make_synthetic_dataset
    from diffad.training import train_ddpm
    from diffad.training_utils import CHECKPOINT_MARKER, STATE_TENSORS, latest_checkpoint

    data = make_synthetic_dataset(tmp_path / "data", resolution=32, num_train=10, num_test_good=2,
                                  num_test_defect_per_type=1, categories=[SYNTHETIC_CATEGORIES[0]])

    def train(out: Path, steps: int, *extra: str):
        return train_ddpm.main(train_ddpm.parse_args([
            "--data_dir", str(data), "--category", SYNTHETIC_CATEGORIES[0], "--preset", "tiny", "--resolution", "32",
            "--train_batch_size", "4", "--report_to", "none", "--output_dir", str(out), "--checkpointing_steps", "2",
            "--num_epochs", "100", "--use_ema", "--seed", "3", "--max_train_steps", str(steps), *extra]))

    train(tmp_path / "a", 2)
    checkpoint = latest_checkpoint(tmp_path / "a")
    assert not list(checkpoint.rglob("*.pkl")), sorted(p.name for p in checkpoint.iterdir())
    saved = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    assert saved["ema"]["optimization_step"] == 2 and len(load_file(str(checkpoint / STATE_TENSORS))) > 0
    # resumed to 4 steps, the final EMA weights equal an uninterrupted 4-step run's
    train(tmp_path / "a", 4, "--resume_from_checkpoint", "latest")
    train(tmp_path / "b", 4)
    a = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
