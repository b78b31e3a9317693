"""SelfAwareInpaintPipeline mechanics with tiny random components (32 px): shapes, invariants, calibration, errors."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from diffad.pipelines.self_aware_inpaint import (
    AnomalyCalibration,
    SelfAwareInpaintPipeline,
    default_mean_filter_size,
    multiscale_anomaly_map,
    predict_noise,
    segmenter_logits,
)

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "self_aware_inpaint" / "pipeline.py"
# Small levers keep every test to a few dozen UNet passes.
QUICK = dict(inpaint_timesteps=6, num_inpaint_steps=3, resample_steps=2, num_mask_timesteps=2)


def tiny_unet(seed: int = 0, out_channels: int = 3) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=32, in_channels=6, out_channels=out_channels, block_out_channels=(16, 32),
                       layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def make_pipe(segmenter: bool = False) -> SelfAwareInpaintPipeline:
    pipe = SelfAwareInpaintPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=1000,
                                                                              beta_schedule="sigmoid"),
                                    segmenter=tiny_unet(1, out_channels=1) if segmenter else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth random images in [-1, 1], (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.fixture(scope="module")
def calibrated() -> SelfAwareInpaintPipeline:
    pipe = make_pipe()
    return pipe.calibrate(images(6, seed=1), mask_timesteps=(300, 303), generator=torch.Generator().manual_seed(0),
                          **{"mode": "fast"})


def set_mask(pipe: SelfAwareInpaintPipeline, value: float) -> None:
    """Force every mask empty (+inf) or full (-1) through Q_p."""
    pipe.calibration.q_threshold.fill_(value)


def test_pipeline_file_imports_only_torch_diffusers_numpy():
    tree = ast.parse(PIPELINE_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "pipeline.py must not use relative imports (it ships alone)"
            roots.add(node.module.split(".")[0])
    stdlib = {"__future__", "dataclasses", "typing", "json", "os", "shutil"}
    assert roots - stdlib <= {"torch", "diffusers", "numpy"}, roots


def test_predict_noise_and_segmenter_logits_shapes():
    unet, seg = tiny_unet(0), tiny_unet(1, out_channels=1)
    x = images(2)
    with torch.no_grad():
        eps = predict_noise(unet, x, torch.tensor([10, 20]))
        eps_zero = predict_noise(unet, x, torch.tensor([10, 20]), torch.zeros_like(x))
        logits = segmenter_logits(seg, x, x)
    assert eps.shape == (2, 3, 32, 32) and torch.equal(eps, eps_zero)
    assert logits.shape == (2, 1, 32, 32)


def test_multiscale_map_values():
    x = images(2)
    assert multiscale_anomaly_map(x, x, mean_filter_size=5).abs().max() == 0
    shifted = x.clone()
    shifted[:, 0] += 0.3  # one of three channels off by 0.3 -> error 0.1 at every pixel and scale
    m = multiscale_anomaly_map(x, shifted, mean_filter_size=3)
    assert m.shape == (2, 32, 32)
    torch.testing.assert_close(m, torch.full_like(m, 0.1), atol=1e-5, rtol=0)
    # a local defect scores higher at its centre than far away
    local = x.clone()
    local[:, :, 12:20, 12:20] = 1.0
    m = multiscale_anomaly_map(x, local, mean_filter_size=5)
    assert m[:, 16, 16].min() > 5 * m[:, 2, 2].max()
    assert default_mean_filter_size(64) == 9 and default_mean_filter_size(32) == 5 and default_mean_filter_size(16) == 3


def test_calibration_contents(calibrated):
    cal = calibrated.calibration
    assert calibrated.is_calibrated and isinstance(cal, AnomalyCalibration)
    assert cal.q_threshold.shape == (32, 32) and torch.isfinite(cal.q_threshold).all()
    assert list(cal.config.mask_timesteps) == [300, 301, 302, 303]
    assert set(cal.config.threshold_names) == {"self_aware/multiscale", "denoise/multiscale"}
    assert cal.config.mean_filter_size == 5 and cal.config.resolution == 32
    # Q_p is the 0.8 per-pixel quantile: about 20% of each calibration image's pixels exceed it (same seeds)
    x = images(6, seed=1)
    out = calibrated(x, generator=torch.Generator().manual_seed(0), num_mask_timesteps=4, **{
        k: v for k, v in QUICK.items() if k != "num_mask_timesteps"})
    assert 0.1 < out.masks.mean() < 0.3
    # the image threshold is the 1 - 0.05 quantile of calibration scores (method 'higher'): nobody above it
    scores = calibrated(x, generator=torch.Generator().manual_seed(0)).scores
    assert np.isclose(cal.threshold("self_aware/multiscale"), scores.max(), atol=1e-6)


def test_output_shapes_and_types(calibrated):
    x = images(2, seed=3)
    out = calibrated(x, generator=torch.Generator().manual_seed(0), **QUICK)
    assert out.anomaly_maps.shape == (2, 32, 32) and out.anomaly_maps.dtype == np.float32
    assert out.scores.shape == (2,) and out.is_anomalous.dtype == bool and out.masks.dtype == bool
    assert out.reconstructions.shape == (2, 32, 32, 3)
    assert 0 <= out.reconstructions.min() and out.reconstructions.max() <= 1
    np.testing.assert_allclose(out.scores, out.anomaly_maps.reshape(2, -1).max(1))
    pt = calibrated(x, generator=torch.Generator().manual_seed(0), output_type="pt", **QUICK)
    assert pt.reconstructions.shape == (2, 3, 32, 32) and pt.masks.dtype == torch.bool
    np.testing.assert_allclose(pt.anomaly_maps.numpy(), out.anomaly_maps, atol=1e-6)
    tup = calibrated(x, generator=torch.Generator().manual_seed(0), return_dict=False, **QUICK)
    assert isinstance(tup, tuple) and np.array_equal(tup[0], out.anomaly_maps)


def test_outside_mask_pixels_unchanged(calibrated):
    x = images(3, seed=4)
    out = calibrated(x, generator=torch.Generator().manual_seed(0), output_type="pt", **QUICK)
    expected = (x / 2 + 0.5).clamp(0, 1)
    keep = ~out.masks.unsqueeze(1).expand_as(expected)
    assert out.masks.any() and keep.any()
    assert torch.equal(out.reconstructions[keep], expected[keep])
    assert not torch.allclose(out.reconstructions, expected)  # the masked pixels were redrawn


def test_empty_mask_returns_input_and_full_mask_redraws():
    pipe = make_pipe().calibrate(images(3, seed=1), mask_timesteps=(300, 301), methods=("self_aware",))
    x = images(2, seed=5)
    set_mask(pipe, float("inf"))
    for skip in (True, False):
        out = pipe(x, output_type="pt", skip_empty_masks=skip, **QUICK)
        assert not out.masks.any()
        assert torch.equal(out.reconstructions, (x / 2 + 0.5).clamp(0, 1))
        mask_passes = 2 * pipe.calibration.config.mask_noise_draws  # 2 timesteps x the calibrated noise draws
        assert (out.anomaly_maps == 0).all() and out.num_unet_passes == (mask_passes if skip else mask_passes + 3 * 2)
    set_mask(pipe, -1.0)
    out = pipe(x, output_type="pt", **QUICK)
    assert out.masks.all() and (out.reconstructions - (x / 2 + 0.5)).abs().mean() > 0.05


def test_same_seed_same_output_other_seed_differs(calibrated):
    x = images(2, seed=6)
    a = calibrated(x, generator=torch.Generator().manual_seed(7), **QUICK)
    b = calibrated(x, generator=torch.Generator().manual_seed(7), **QUICK)
    c = calibrated(x, generator=torch.Generator().manual_seed(8), **QUICK)
    for field in ("anomaly_maps", "masks", "reconstructions", "scores"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert not np.array_equal(a.reconstructions, c.reconstructions)


@pytest.mark.parametrize("method", ["self_aware", "denoise"])
def test_batch_equals_one_by_one(calibrated, method):
    x = images(3, seed=9)
    seeds = [11, 12, 13]
    batch = calibrated(x, method=method, generator=[torch.Generator().manual_seed(s) for s in seeds], **QUICK)
    chunked = calibrated(x, method=method, batch_size=2,
                         generator=[torch.Generator().manual_seed(s) for s in seeds], **QUICK)
    for i, s in enumerate(seeds):
        one = calibrated(x[i:i + 1], method=method, generator=[torch.Generator().manual_seed(s)], **QUICK)
        assert np.array_equal(one.masks[0], batch.masks[i])
        np.testing.assert_allclose(one.reconstructions[0], batch.reconstructions[i], atol=1e-5)
        np.testing.assert_allclose(one.scores[0], batch.scores[i], atol=1e-5)
    np.testing.assert_allclose(chunked.reconstructions, batch.reconstructions, atol=1e-5)
    # a single generator also gives batch-size-independent results (one derived seed per image)
    single = calibrated(x, method=method, generator=torch.Generator().manual_seed(3), **QUICK)
    single_chunked = calibrated(x, method=method, batch_size=1, generator=torch.Generator().manual_seed(3), **QUICK)
    np.testing.assert_allclose(single.reconstructions, single_chunked.reconstructions, atol=1e-5)


def test_denoise_needs_no_calibration_but_self_aware_does():
    pipe = make_pipe()
    x = images(1)
    out = pipe(x, method="denoise", denoise_steps=3, inpaint_timesteps=6)
    assert out.is_anomalous is None and out.scores.shape == (1,) and out.num_unet_passes == 3
    assert not out.masks.any()
    with pytest.raises(ValueError, match="not calibrated"):
        pipe(x)
    with pytest.raises(ValueError, match="segmenter"):
        pipe(x, method="denoise", anomaly_map="learned")


def test_segmenter_learned_map_and_threshold():
    pipe = make_pipe(segmenter=True).calibrate(images(4, seed=1), mask_timesteps=(300, 301),
                                                methods=("self_aware",), **{"mode": "fast"})
    assert set(pipe.calibration.config.threshold_names) == {"self_aware/multiscale", "self_aware/learned"}
    x = images(2, seed=2)
    out = pipe(x, anomaly_map="learned", **QUICK)
    assert out.anomaly_maps.shape == (2, 32, 32) and 0 <= out.anomaly_maps.min() and out.anomaly_maps.max() <= 1
    no_threshold = make_pipe().calibrate(images(3, seed=1), mask_timesteps=(300, 301), methods=())
    assert no_threshold(x, **QUICK).is_anomalous is None  # Q_p but no image threshold: maps and scores only
    q_before = pipe.calibration.q_threshold.clone()
    pipe.calibrate_threshold(images(4, seed=3), anomaly_map="learned", target_false_positive_rate=0.5)
    assert torch.equal(pipe.calibration.q_threshold, q_before)
    assert pipe.calibration.config.target_false_positive_rate == 0.05  # Q_p's settings kept
    assert pipe.calibration.threshold("self_aware/learned") is not None
    pipe.calibrate_threshold(images(4, seed=3), method="denoise", anomaly_map="multiscale")
    assert "denoise/multiscale" in pipe.calibration.config.threshold_names
    assert pipe(x, method="denoise").is_anomalous is not None


def test_preprocess_pil_and_tensor_resizing():
    pipe = make_pipe()
    gray = Image.fromarray(np.full((48, 40), 255, dtype=np.uint8), mode="L")
    rgb = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    x = pipe.preprocess([gray, rgb])
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.ones(3, 32, 32)) and torch.allclose(x[1], -torch.ones(3, 32, 32))
    assert pipe.preprocess(gray).shape == (1, 3, 32, 32)
    assert pipe.preprocess(torch.zeros(3, 64, 64)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 1, 32, 32), "3 channels"),
    (torch.zeros(1, 4, 32, 32), "3 channels"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN or inf"),
    (torch.full((1, 3, 32, 32), float("inf")), "NaN or inf"),
    (torch.zeros(0, 3, 32, 32), "empty"),
    ([], "no images"),
    (torch.full((1, 3, 32, 32), 2.0), r"\[-1, 1\]"),
    ("image.png", "unsupported type"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        make_pipe()(bad, method="denoise")


def test_bad_empty_pil_image():
    with pytest.raises(ValueError, match="empty"):
        make_pipe().preprocess(Image.new("RGB", (0, 0)))


@pytest.mark.parametrize("kwargs, match", [
    ({"percentile": 0.0}, "percentile"),
    ({"percentile": 1.0}, "percentile"),
    ({"percentile": 80}, "percentile"),
    ({"mask_timesteps": (0, 10)}, "mask_timesteps"),
    ({"mask_timesteps": (300, 1000)}, "mask_timesteps"),
    ({"mask_timesteps": (350, 300)}, "ordered"),
    ({"target_false_positive_rate": 1.5}, "target_false_positive_rate"),
    ({"mean_filter_size": 4}, "mean_filter_size"),
    ({"methods": ("other",)}, "methods"),
])
def test_bad_calibration_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pipe().calibrate(images(2), **kwargs)


def test_calibration_at_another_resolution_is_an_error(calibrated):
    pipe = make_pipe()
    pipe.register_modules(calibration=AnomalyCalibration(resolution=64, threshold_names=("self_aware/multiscale",)))
    with pytest.raises(ValueError, match="resolution 64"):
        pipe(images(1))


def test_progress_bar_disabled(calibrated, capsys):
    calibrated(images(1), **QUICK)
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err


@pytest.mark.slow
def test_trained_tiny_model_on_synthetic_default(synthetic_root, tmp_path):
    """End to end on the embedded default: train briefly, calibrate on validation, score the test split.

    The quality figures (self_aware against denoise) come from ``benchmarks/pipeline_quality.py`` with longer
    training; here the trained folder must load, calibrate, and give finite, ranked scores and exact invariants.
    """
    from sklearn.metrics import roc_auc_score

    from diffad.data import load_mvtec
    from diffad.training.train_ddpm import main, parse_args

    out = main(parse_args(["--data_dir", str(synthetic_root), "--category", "nut", "--output_dir",
                           str(tmp_path / "model"), "--preset", "tiny", "--resolution", "32", "--max_train_steps",
                           "40", "--report_to", "none"]))
    pipe = SelfAwareInpaintPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    data = load_mvtec(synthetic_root, "nut", resolution=32)
    val = pipe.preprocess([row["image"] for row in data["validation"]])
    test = data["test"]
    x = pipe.preprocess([row["image"] for row in test])
    labels = np.array(test["label"])
    pipe.calibrate(val, generator=torch.Generator().manual_seed(0))
    aurocs = {}
    for method in ("self_aware", "denoise"):
        res = pipe(x, method=method, generator=torch.Generator().manual_seed(0), output_type="pt")
        assert torch.isfinite(res.scores).all() and res.is_anomalous is not None
        if method == "self_aware":
            keep = ~res.masks.unsqueeze(1).expand_as(x)
            assert torch.equal(res.reconstructions[keep], ((x / 2 + 0.5).clamp(0, 1))[keep])
            assert res.num_unet_passes <= 25
        aurocs[method] = roc_auc_score(labels, res.scores.numpy())
    assert all(0.0 <= v <= 1.0 for v in aurocs.values()), aurocs
