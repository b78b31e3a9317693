"""`diffad evaluate` end to end on a tiny random-weight pipeline, the figures, and the 2-process run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffad.evaluation import evaluate_pipeline, image_seed, main, markdown_table, resolve_model_dir
from diffad.figures import FigureRow, inspection_figure, overlay
from tiny_components import tiny_pipeline, tiny_unet

CATEGORY = "weave"
# few UNet passes per image, so that the tests stay fast on a busy 2-core CPU
FAST = ["--num-inpaint-steps", "2", "--resample-steps", "1", "--num-mask-timesteps", "2", "--denoise-steps", "2"]
PIPE_KWARGS = {"num_inpaint_steps": 2, "resample_steps": 1, "num_mask_timesteps": 2, "denoise_steps": 2}





@pytest.fixture(scope="module")
def small_data(synthetic_root, tmp_path_factory) -> Path:
    """A few files of the synthetic weave category in MVTec layout: 6 train, 3 good and 1 per defect type in test."""
    import shutil

    src, dst = synthetic_root / CATEGORY, tmp_path_factory.mktemp("small") / CATEGORY
    picks = sorted((src / "train" / "good").glob("*.png"))[:6] + sorted((src / "test" / "good").glob("*.png"))[:3]
    for defect in sorted(p for p in (src / "test").iterdir() if p.name != "good"):
        first = sorted(defect.glob("*.png"))[0]
        picks += [first, src / "ground_truth" / defect.name / f"{first.stem}_mask.png"]
    for path in picks:
        (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst / path.relative_to(src))
    return dst.parent


@pytest.fixture(scope="module")
def tiny_model(small_data, tmp_path_factory) -> Path:
    """A tiny random-weight pipeline, calibrated on the synthetic validation split and saved as <dir>/weave.

    Only ``self_aware`` gets an image threshold, so ``denoise`` decisions are ``unknown``.
    """
    from diffad import load_mvtec

    pipe = tiny_pipeline()
    train_good = load_mvtec(small_data, CATEGORY, resolution=32, validation_fraction=0.5)["validation"]
    pipe.calibrate([row["image"] for row in train_good], mask_timesteps=(300, 302), methods=("self_aware",),
                   generator=torch.Generator().manual_seed(0))
    models = tmp_path_factory.mktemp("models")
    pipe.save_pretrained(models / CATEGORY)
    return models


@pytest.fixture(scope="module")
def one_process_run(tiny_model, small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_1proc")
    rc = main(["--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
               "--out", str(out), "--batch-size", "2", "--seed", "3", *FAST])
    assert rc == 0
    return out


def test_outputs_written(one_process_run, small_data):
    out = one_process_run
    metrics = json.loads((out / "metrics.json").read_text())
    cat = metrics["categories"][CATEGORY]
    assert set(cat) == {"self_aware/multiscale", "denoise/multiscale"}
    for values in cat.values():
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold",
                    "seconds_per_image", "unet_passes_per_image"):
            assert np.isfinite(values[key])
        assert 0.0 <= values["image_auroc"] <= 1.0 and 0.0 <= values["aupro"] <= 1.0
        assert values["seconds_per_image"] > 0
    assert cat["self_aware/multiscale"]["unet_passes_per_image"] > 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    n_test = len(list((small_data / CATEGORY / "test").rglob("*.png")))
    assert len(rows) == 2 * n_test
    assert set(rows[0]) == {"file", "category", "defect_type", "label", "method", "map", "score", "decision"}
    assert {r["decision"] for r in rows if r["method"] == "self_aware"} <= {"defect", "ok"}
    assert {r["decision"] for r in rows if r["method"] == "denoise"} == {"unknown"}  # no threshold calibrated
    # the CSV reproduces the JSON: recompute image AUROC from its scores
    from diffad.metrics import image_auroc

    sa = [r for r in rows if r["method"] == "self_aware"]
    assert image_auroc([float(r["score"]) for r in sa], [int(r["label"]) for r in sa]) == pytest.approx(
        cat["self_aware/multiscale"]["image_auroc"])
    table = (out / "table.md").read_text()
    assert f"| {CATEGORY} |" in table and "**mean**" in table
    assert json.loads((out / "metrics" / f"{CATEGORY}.json").read_text())["metrics"] == cat
    with Image.open(out / "figures" / f"{CATEGORY}.png") as fig:
        assert fig.size[0] > 400 and fig.size[1] > 200


def test_same_numbers_with_other_batching(tiny_model, small_data, one_process_run):
    """Per-image seeds: the batch size does not change any score."""
    from diffad import SelfAwareInpaintPipeline, load_mvtec

    pipe = SelfAwareInpaintPipeline.from_pretrained(tiny_model / CATEGORY)
    split = load_mvtec(small_data, CATEGORY, resolution=32)["test"]
    result = evaluate_pipeline(pipe, split, methods=["self_aware"], batch_size=3, seed=3, progress=False,
                               pipeline_kwargs=PIPE_KWARGS)
    rows = [r for r in csv.DictReader((one_process_run / "per_image.csv").open()) if r["method"] == "self_aware"]
    assert [float(r["score"]) for r in result.records] == pytest.approx([float(r["score"]) for r in rows], rel=1e-6)


def test_two_processes_give_exactly_one_process_metrics(tiny_model, small_data, one_process_run, tmp_path):
    out = tmp_path / "eval_2proc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "-m", "diffad.evaluation",
           "--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
           "--out", str(out), "--batch-size", "2", "--seed", "3", *FAST]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    one = json.loads((one_process_run / "metrics.json").read_text())
    assert two["settings"]["num_processes"] == 2  # a real two-rank run, not two independent ones
    for key, values in one["categories"][CATEGORY].items():
        for metric in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold"):
            assert two["categories"][CATEGORY][key][metric] == values[metric], (key, metric)
    one_csv = (one_process_run / "per_image.csv").read_text()
    assert (out / "per_image.csv").read_text() == one_csv


def test_user_errors(tiny_model, small_data, tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope"), "--data", str(small_data), "--category", CATEGORY,
                 "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
                 "--anomaly-maps", "learned", "--out", str(tmp_path / "o")]) == 2
    assert "needs a segmenter" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="one model per category"):
        resolve_model_dir(tiny_model / CATEGORY, "nut", 2)
    assert resolve_model_dir(tiny_model, CATEGORY, 2) == tiny_model / CATEGORY
    assert resolve_model_dir(tiny_model / CATEGORY, CATEGORY, 1) == tiny_model / CATEGORY


def test_image_seed_depends_on_index_only():
    assert image_seed(0, 5) == image_seed(0, 5)
    assert len({image_seed(0, i) for i in range(100)} | {image_seed(1, i) for i in range(100)}) == 200


def test_markdown_table_form():
    per_category = {
        "bottle": {"self_aware/multiscale": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7,
                                             "seconds_per_image": 1.0, "unet_passes_per_image": 23.0}},
        "nut": {"self_aware/multiscale": {"image_auroc": 0.7, "pixel_auroc": 0.6, "aupro": 0.5,
                                          "seconds_per_image": 3.0, "unet_passes_per_image": 23.0}},
    }
    table = markdown_table(per_category)
    assert "| bottle | 0.900 (0.800 / 0.700) |" in table
    assert "| **mean** | **0.800 (0.700 / 0.600)** |" in table
    assert "| nut | 3.000 (23) |" in table


def test_overlay_and_figure(tmp_path):
    photo = np.full((40, 60, 3), 128, np.uint8)
    heat = np.zeros((20, 30), np.float32)
    heat[5:10, 5:10] = 1.0
    mask = np.zeros((20, 30), bool)
    mask[2:12, 2:12] = True
    img = overlay(photo, heat, mask_outline=mask)
    arr = np.asarray(img)
    assert img.size == (60, 40) and img.mode == "RGB"
    assert (arr[0, 0] != arr[15, 15]).any()  # hot pixels differ from cold ones
    assert tuple(arr[4, 10]) == (255, 255, 255)  # the outline (mask boundary at row 4 after upsampling)
    assert tuple(arr[12, 12]) != (255, 255, 255)  # inside the mask, not its boundary
    with pytest.raises(ValueError, match="uint8"):
        overlay(photo.astype(np.float32), heat)
    rows = [FigureRow(image=photo[:20, :20], reconstruction=photo[:20, :20] / 255.0, inpainting_mask=mask[:, :20],
                      multiscale_map=heat[:, :20], learned_map=None, ground_truth=mask[:, :20], title="x")] * 2
    inspection_figure(rows, tmp_path / "fig.png", suptitle="test")
    with Image.open(tmp_path / "fig.png") as fig:
        assert fig.size == (1000, 400 + 40)  # 5 columns (no learned map) x 2 rows of 2 inches at 100 dpi


def test_learned_map_columns(tiny_model, small_data, tmp_path):
    """With a segmenter, the learned map is evaluated beside the multi-scale one and gets its figure column;
    by default only the thesis's columns run (no denoise/learned: the segmenter learned self-aware reconstructions)."""
    from diffad import SelfAwareInpaintPipeline, load_mvtec

    pipe = SelfAwareInpaintPipeline.from_pretrained(tiny_model / CATEGORY)
    pipe.register_modules(segmenter=tiny_unet(1, seed=1, block_out_channels=(8, 16)))
    split = load_mvtec(small_data, CATEGORY, resolution=32)["test"]
    result = evaluate_pipeline(pipe, split, methods=["self_aware", "denoise"], batch_size=4, seed=3, progress=False,
                               pipeline_kwargs=PIPE_KWARGS, num_figure_rows=2)
    assert set(result.metrics) == {"self_aware/multiscale", "self_aware/learned", "denoise/multiscale"}
    explicit = evaluate_pipeline(pipe, split, methods=["denoise"], anomaly_maps=["learned"], batch_size=4, seed=3,
                                 progress=False, pipeline_kwargs=PIPE_KWARGS, num_figure_rows=0)
    assert set(explicit.metrics) == {"denoise/learned"}
    assert {r["map"] for r in result.records} == {"multiscale", "learned"}
    assert len(result.figure_rows) == 2
    learned = result.figure_rows[0].learned_map
    assert learned.shape == (32, 32) and 0.0 <= learned.min() and learned.max() <= 1.0  # mean-filtered probabilities
    inspection_figure(result.figure_rows, tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as fig:
        assert fig.size == (1200, 400)  # 6 columns: the learned map is there
