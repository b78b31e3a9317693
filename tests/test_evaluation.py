"""`diffad evaluate` end to end on a tiny random-weight pipeline, the figures, and the 2-process run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from diffad.evaluation import evaluate_pipeline, main, markdown_table, mask_statistics, resolve_model_dir
from diffad.figures import FigureRow, inspection_figure, overlay
from diffad.pipelines.self_aware_inpaint import MAP_NAMES, METHODS
from tiny_components import CHEAP_CONFIG, tiny_pipeline, tiny_unet

CATEGORY = "weave"


@pytest.fixture(scope="module")
def small_data(synthetic_root, tmp_path_factory) -> Path:
    """A few files of the synthetic weave category in MVTec layout: 8 train, 3 good and 1 per defect type in test."""
    import shutil

    src, dst = synthetic_root / CATEGORY, tmp_path_factory.mktemp("small") / CATEGORY
    picks = sorted((src / "train" / "good").glob("*.png"))[:8] + sorted((src / "test" / "good").glob("*.png"))[:3]
    for defect in sorted(p for p in (src / "test").iterdir() if p.name != "good"):
        first = sorted(defect.glob("*.png"))[0]
        picks += [first, src / "ground_truth" / defect.name / f"{first.stem}_mask.png"]
    for path in picks:
        (dst / path.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst / path.relative_to(src))
    return dst.parent


@pytest.fixture(scope="module")
def tiny_model(small_data, tmp_path_factory) -> Path:
    """A tiny random-weight pipeline, calibrated with the cheap sampling config on the synthetic validation split
    and saved as <dir>/weave.

    Only ``self_aware`` gets image thresholds, so ``denoise`` decisions are ``unknown``.
    """
    from diffad import load_mvtec

    pipe = tiny_pipeline()
    train_good = load_mvtec(small_data, CATEGORY, resolution=32, validation_fraction=0.5)["validation"]
    pipe.calibrate([row["image"] for row in train_good], config=CHEAP_CONFIG, methods=("self_aware",),
                   generator=torch.Generator().manual_seed(0))
    models = tmp_path_factory.mktemp("models")
    pipe.save_pretrained(models / CATEGORY)
    return models


@pytest.fixture(scope="module")
def one_process_run(tiny_model, small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_1proc")
    rc = main(["--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
               "--out", str(out), "--batch-size", "2", "--seed", "3"])
    assert rc == 0
    return out


def test_outputs_written(one_process_run, small_data):
    out = one_process_run
    metrics = json.loads((out / "metrics.json").read_text())
    cat = metrics["categories"][CATEGORY]
    # by default every map the model returns (no segmenter here): noise_error and combined for self_aware only
    assert set(cat) == {"self_aware/multiscale", "self_aware/noise_error", "self_aware/combined",
                        "denoise/multiscale"}
    assert metrics["settings"]["sampling"][CATEGORY] == CHEAP_CONFIG.to_dict()  # the calibration's sampler ran
    for values in cat.values():
        for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "image_f1_threshold",
                    "seconds_per_image", "unet_passes_per_image"):
            assert np.isfinite(values[key])
        assert values["seconds_per_image"] > 0
    # one reconstruction per method: its maps share its time and passes
    for key in ("seconds_per_image", "unet_passes_per_image", "mask_normal_share", "mask_defect_recall",
                "mask_precision"):
        assert cat["self_aware/multiscale"][key] == cat["self_aware/noise_error"][key], key
    assert not any(k.startswith("mask_") for k in cat["denoise/multiscale"])
    # CHEAP_CONFIG: denoise makes exactly its 2 steps; self_aware 1 mask pass, plus 2 x 1 where the mask is not empty
    assert cat["denoise/multiscale"]["unet_passes_per_image"] == CHEAP_CONFIG.unet_passes("denoise") == 2
    assert 1 <= cat["self_aware/multiscale"]["unet_passes_per_image"] <= CHEAP_CONFIG.unet_passes("self_aware")
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    n_test = len(list((small_data / CATEGORY / "test").rglob("*.png")))
    assert len(rows) == 4 * n_test
    assert set(rows[0]) == {"file", "category", "defect_type", "label", "method", "map", "score", "decision",
                            "threshold"}
    assert all(float(r["threshold"]) > 0 for r in rows if r["method"] == "self_aware")  # what decided the row
    assert {r["threshold"] for r in rows if r["method"] == "denoise"} == {""}
    assert {r["decision"] for r in rows if r["method"] == "self_aware"} <= {"defect", "ok"}
    assert {r["decision"] for r in rows if r["method"] == "denoise"} == {"unknown"}  # no threshold calibrated
    # the CSV reproduces the JSON: image AUROC recomputed by scikit-learn from the per-image scores
    for key, values in cat.items():
        method, kind = key.split("/")
        picked = [r for r in rows if (r["method"], r["map"]) == (method, kind)]
        assert len(picked) == n_test
        expected = roc_auc_score([int(r["label"]) for r in picked], [float(r["score"]) for r in picked])
        assert values["image_auroc"] == pytest.approx(expected, abs=1e-12), key
    table = (out / "table.md").read_text()
    assert f"| {CATEGORY} |" in table and "**mean**" in table and "| category | self_aware | denoise |" in table
    assert json.loads((out / "metrics" / f"{CATEGORY}.json").read_text())["metrics"] == cat
    with Image.open(out / "figures" / f"{CATEGORY}.png") as fig:
        assert fig.size[0] > 400 and fig.size[1] > 200


def test_same_numbers_with_other_batching_and_order(tiny_model, small_data, one_process_run):
    """Noise seeded from each image's pixels: neither the batch size nor the image order changes any score."""
    from diffad import SelfAwareInpaintPipeline, load_mvtec

    pipe = SelfAwareInpaintPipeline.from_pretrained(tiny_model / CATEGORY)
    split = load_mvtec(small_data, CATEGORY, resolution=32)["test"]
    rows = [r for r in csv.DictReader((one_process_run / "per_image.csv").open()) if r["method"] == "self_aware"]
    expected = {(r["file"], r["map"]): float(r["score"]) for r in rows}
    result = evaluate_pipeline(pipe, split, methods=["self_aware"], batch_size=3, seed=3, progress=False,
                               num_figure_rows=0)
    assert [float(r["score"]) for r in result.records] == pytest.approx([float(r["score"]) for r in rows], rel=1e-6)
    reversed_split = split.select(list(reversed(range(len(split)))))
    result = evaluate_pipeline(pipe, reversed_split, methods=["self_aware"], batch_size=2, seed=3, progress=False,
                               num_figure_rows=0)
    got = {(r["file"], r["map"]): float(r["score"]) for r in result.records}
    assert got.keys() == expected.keys()
    assert [got[k] for k in expected] == pytest.approx([expected[k] for k in expected], rel=1e-6)
    other_seed = evaluate_pipeline(pipe, split, methods=["self_aware"], anomaly_maps=["multiscale"], batch_size=3,
                                   seed=4, progress=False, num_figure_rows=0)
    assert [float(r["score"]) for r in other_seed.records] != pytest.approx(
        [float(r["score"]) for r in rows if r["map"] == "multiscale"], rel=1e-6)  # the seed does matter


def test_two_processes_give_exactly_one_process_metrics(tiny_model, small_data, one_process_run, tmp_path):
    out = tmp_path / "eval_2proc"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "-m", "diffad.evaluation",
           "--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
           "--out", str(out), "--batch-size", "2", "--seed", "3"]
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
    def error_of(*argv: str) -> str:
        assert main(["--model", str(tiny_model), "--data", str(small_data), "--category", CATEGORY,
                     "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert main(["--model", str(tmp_path / "nope"), "--data", str(small_data), "--category", CATEGORY,
                 "--out", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert "needs a segmenter" in error_of("--anomaly-maps", "learned")
    assert "unknown map 'edges'" in error_of("--anomaly-maps", "multiscale,edges")
    assert "returns none of the anomaly maps noise_error" in error_of("--methods", "denoise",
                                                                      "--anomaly-maps", "noise_error")
    # the model was calibrated with CHEAP_CONFIG: neither preset is what it runs
    for preset in ("thesis", "fast"):
        assert f"recalibrate with `diffad calibrate --config {preset}" in error_of("--config", preset)
    assert "unknown sampling preset 'reference'" in error_of("--config", "reference")
    assert not (tmp_path / "o").exists()  # every error came before any output
    with pytest.raises(FileNotFoundError, match="one model per category"):
        resolve_model_dir(tiny_model / CATEGORY, "nut", 2)
    assert resolve_model_dir(tiny_model, CATEGORY, 2) == tiny_model / CATEGORY
    assert resolve_model_dir(tiny_model / CATEGORY, CATEGORY, 1) == tiny_model / CATEGORY


def test_markdown_table_form():
    per_category = {
        "bottle": {"self_aware/multiscale": {"image_auroc": 0.9, "pixel_auroc": 0.8, "aupro": 0.7,
                                             "seconds_per_image": 1.0, "unet_passes_per_image": 23.0,
                                             "mask_normal_share": 0.2, "mask_defect_recall": 0.5,
                                             "mask_precision": None}},
        "nut": {"self_aware/multiscale": {"image_auroc": 0.7, "pixel_auroc": 0.6, "aupro": 0.5,
                                          "seconds_per_image": 3.0, "unet_passes_per_image": 23.0,
                                          "mask_normal_share": 0.4, "mask_defect_recall": 0.7,
                                          "mask_precision": 0.25}},
    }
    table = markdown_table(per_category)
    assert "| bottle | 0.900 (0.800 / 0.700) |" in table
    assert "| **mean** | **0.800 (0.700 / 0.600)** |" in table
    assert "| nut | 3.000 (23) |" in table
    assert "| bottle | 0.200 | 0.500 | - |" in table and "| nut | 0.400 | 0.700 | 0.250 |" in table
    from diffad.evaluation import mean_metrics

    mean = mean_metrics(per_category)["self_aware/multiscale"]
    assert mean["mask_normal_share"] == pytest.approx(0.3) and mean["mask_precision"] == 0.25  # None left out


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
    rows[0] = FigureRow(**{**rows[0].__dict__, "noise_error_map": heat[:, :20] * 2})
    figure = inspection_figure(rows)
    assert [ax.get_title() for ax in figure.axes[:6]] == ["original", "reconstruction", "noise error Q/Q_p",
                                                         "inpainting mask", "multi-scale map", "ground truth"]


class CountingPipe:
    """The real pipeline behind a wrapper that records every call (method, number of images)."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, images, **kwargs):
        self.calls.append((kwargs["method"], len(images)))
        return self.pipe(images, **kwargs)


@pytest.fixture(scope="module")
def pipe_with_segmenter(tiny_model):
    from diffad import SelfAwareInpaintPipeline

    pipe = SelfAwareInpaintPipeline.from_pretrained(tiny_model / CATEGORY)
    pipe.register_modules(segmenter=tiny_unet(1, seed=1, block_out_channels=(8, 16)))
    return pipe


def test_each_method_runs_once_per_batch_and_gives_every_map(pipe_with_segmenter, small_data, tmp_path):
    """With a segmenter, by default every map of every method is evaluated, from ONE call per method and batch;
    the figure gets the noise-error and learned columns."""
    from diffad import load_mvtec

    split = load_mvtec(small_data, CATEGORY, resolution=32)["test"]
    counting = CountingPipe(pipe_with_segmenter)
    result = evaluate_pipeline(counting, split, batch_size=4, seed=3, progress=False, num_figure_rows=2)
    n = len(split)
    batch_sizes = [min(4, n - i) for i in range(0, n, 4)]
    assert counting.calls == [(m, b) for b in batch_sizes for m in METHODS]
    assert set(result.metrics) == {f"{m}/{a}" for m in METHODS for a in pipe_with_segmenter.map_names(m)} == {
        "self_aware/multiscale", "self_aware/learned", "self_aware/noise_error", "self_aware/combined",
        "denoise/multiscale", "denoise/learned"}
    assert {r["map"] for r in result.records} == set(MAP_NAMES)
    assert len(result.records) == 6 * n
    assert len(result.figure_rows) == 2
    row = result.figure_rows[0]
    assert row.learned_map.shape == row.noise_error_map.shape == (32, 32)
    inspection_figure(result.figure_rows, tmp_path / "fig.png")
    with Image.open(tmp_path / "fig.png") as fig:
        assert fig.size == (1400, 400)  # 7 columns: the noise-error and learned maps are there
    # asked for one map: only that one, still one call per method and batch
    counting.calls.clear()
    explicit = evaluate_pipeline(counting, split, methods=["denoise"], anomaly_maps=["learned"], batch_size=4, seed=3,
                                 progress=False, num_figure_rows=0)
    assert set(explicit.metrics) == {"denoise/learned"}
    assert counting.calls == [("denoise", b) for b in batch_sizes]
    # the same image and seed give the same learned score whichever maps were asked for
    assert [r["score"] for r in explicit.records] == [r["score"] for r in result.records
                                                      if (r["method"], r["map"]) == ("denoise", "learned")]


class OraclePipe:
    """A stand-in pipeline whose maps are the ground truth (looked up by the image's pixels), so every metric is
    known: ``multiscale`` = the defect mask (perfect), ``noise_error`` = a constant ``1 - defect share`` (the
    wrong ordering), the inpainting mask = the defect plus the top 4 rows."""

    resolution = 32
    segmenter = None
    is_calibrated = True
    calibration = SimpleNamespace(sampling=CHEAP_CONFIG, threshold=lambda key: None)  # no image thresholds
    band = 4

    def __init__(self, split, seed):
        from diffad.evaluation import _mask_array
        from diffad.pipelines.self_aware_inpaint import image_generator

        self.truth = {row["image"].convert("RGB").tobytes(): _mask_array(row["mask"], 32) for row in split}
        self.seed, self.image_generator, self.calls = seed, image_generator, []

    def map_names(self, method):
        return ("multiscale", "noise_error") if method == "self_aware" else ("multiscale",)

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, images, method, config, generator, batch_size, output_type):
        self.calls.append(method)
        assert output_type == "np" and batch_size == len(images) and config is None
        # the one seeding rule: each image's generator comes from its pixels
        assert [g.initial_seed() for g in generator] == [self.image_generator(self.seed, im).initial_seed()
                                                        for im in images]
        gt = np.stack([self.truth[im.tobytes()] for im in images])
        maps = {"multiscale": gt.astype(np.float32)}
        if method == "self_aware":
            maps["noise_error"] = np.broadcast_to(1 - gt.mean(axis=(1, 2), keepdims=True), gt.shape).astype(np.float32)
        masks = gt.copy()
        masks[:, :self.band] = True
        if method == "denoise":
            masks[:] = False
        scores = {k: v.reshape(len(v), -1).max(axis=1) for k, v in maps.items()}
        decisions = {"multiscale": scores["multiscale"] > 0.5, "noise_error": None}
        return SimpleNamespace(anomaly_maps=maps, scores=scores, is_anomalous={k: decisions[k] for k in maps},
                               inpaint_masks=masks, reconstructions=np.zeros((len(images), 32, 32, 3), np.float32),
                               unet_passes=np.full(len(images), 5 if method == "self_aware" else 2))


def test_metrics_of_known_maps(small_data):
    """Perfect maps score 1 everywhere, inverted ones 0; the mask statistics are the exact pixel counts."""
    from diffad import load_mvtec
    from diffad.evaluation import _mask_array

    split = load_mvtec(small_data, CATEGORY, resolution=32)["test"]
    oracle = OraclePipe(split, seed=7)
    result = evaluate_pipeline(oracle, split, batch_size=3, seed=7, progress=False, num_figure_rows=1)
    n = len(split)
    assert oracle.calls == [m for _ in range(0, n, 3) for m in METHODS]
    perfect = result.metrics["self_aware/multiscale"]
    assert perfect["image_auroc"] == 1.0 and perfect["pixel_auroc"] == 1.0 and perfect["image_f1_max"] == 1.0
    assert perfect["aupro"] == pytest.approx(1.0)
    assert result.metrics["self_aware/noise_error"]["image_auroc"] == 0.0
    assert result.metrics["denoise/multiscale"]["image_auroc"] == 1.0
    assert perfect["unet_passes_per_image"] == 5 and result.metrics["denoise/multiscale"]["unet_passes_per_image"] == 2
    labels = np.array(split["label"])
    gt = np.stack([_mask_array(m, 32) for m in split["mask"]])
    band = np.zeros((32, 32), bool)
    band[:OraclePipe.band] = True
    assert perfect["mask_normal_share"] == pytest.approx(band.mean())  # normal images: only the band
    assert perfect["mask_defect_recall"] == 1.0  # every defect pixel is in the mask
    masked = (gt | band)[labels == 1].sum()
    assert perfect["mask_precision"] == pytest.approx(gt.sum() / masked)
    assert 0.0 < perfect["mask_precision"] < 1.0
    assert "mask_precision" not in result.metrics["denoise/multiscale"]
    decisions = {r["file"]: r["decision"] for r in result.records if r["map"] == "multiscale"
                 and r["method"] == "self_aware"}
    assert decisions == {f: ("defect" if label else "ok") for f, label in zip(split["file_name"], labels)}
    assert {r["decision"] for r in result.records if r["map"] == "noise_error"} == {"unknown"}
    # a config other than the calibration's is refused before anything runs
    with pytest.raises(ValueError, match="recalibrate with `diffad calibrate --config thesis"):
        evaluate_pipeline(oracle, split, config="thesis", progress=False)


def test_mask_statistics_edge_cases():
    stats = mask_statistics([10, 0, 4], [0, 0, 3], [0, 0, 6], [0, 0, 1], 100)
    assert stats == {"mask_normal_share": pytest.approx(0.05), "mask_defect_recall": 0.5, "mask_precision": 0.75}
    assert mask_statistics([0, 0], [0, 0], [0, 5], [0, 1], 100) == {
        "mask_normal_share": 0.0, "mask_defect_recall": 0.0, "mask_precision": None}
    assert mask_statistics([3], [0], [0], [1], 100) == {
        "mask_normal_share": None, "mask_defect_recall": None, "mask_precision": 0.0}
