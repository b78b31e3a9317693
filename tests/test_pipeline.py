"""SelfAwareInpaintPipeline with tiny components (32 px): the stages against diffusers, the sampler's config,
calibration, invariants of a call, and errors."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from diffad.pipelines.self_aware_inpaint import (
    AnomalyCalibration,
    SamplingConfig,
    SelfAwareInpaintPipeline,
    default_mean_filter_size,
    NoiseSchedule,
    denoise,
    inpaint,
    mean_filter,
    multiscale_anomaly_map,
    noise_error,
    per_pixel_quantile,
    predict_noise,
    segmenter_logits,
)
from diffad.pipelines.self_aware_inpaint.folder import CODE_FILES, COMPONENT_MODULES
from diffad.results import calibration_hash, folder_calibration_hash
from tiny_components import tiny_pipeline, tiny_unet

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "self_aware_inpaint" / "pipeline.py"
#: 2 mask passes + 3 steps x 2 resamplings from T = 6; denoise 3 steps: a few dozen UNet passes per test.
QUICK = SamplingConfig(mask_timesteps=(300, 303), mask_noise_draws=1, inpaint_start=6, reconstruction_steps=3,
                       resample_steps=2, denoise_steps=3, reconstruction="inpaint")


def images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth random images in [-1, 1], (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


def gens(*seeds: int):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def calibrated() -> SelfAwareInpaintPipeline:
    return tiny_pipeline().calibrate(images(6, seed=1), config=QUICK, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid").alphas_cumprod)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """The top-level packages ``path`` imports, and the siblings it imports relatively."""
    roots, siblings = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module, f"{path.name}: only `from .module import name` (diffusers' form)"
            siblings.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    return roots, siblings


def test_the_shipped_files_import_torch_diffusers_numpy_and_each_other_as_remote_code_needs():
    """Every file a saved folder carries imports only torch, diffusers, numpy and the standard library; pipeline.py
    imports each of its siblings itself (diffusers copies a local folder's remote code by pipeline.py's relative
    imports alone) and the calibration's module none (the Hub serves a component folder nothing else)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name in CODE_FILES:
        roots, siblings = _imports(PIPELINE_FILE.parent / name)
        assert roots - stdlib <= {"torch", "diffusers", "numpy"}, (name, roots)
        assert {f"{s}.py" for s in siblings} <= set(CODE_FILES), (name, siblings)
    assert {f"{s}.py" for s in _imports(PIPELINE_FILE)[1]} == set(CODE_FILES) - {"pipeline.py"}
    for module in COMPONENT_MODULES.values():
        assert not _imports(PIPELINE_FILE.parent / f"{module}.py")[1], module


def test_pipeline_file_reads_stages_then_pipeline():
    """The file's top-level order is the thesis's: the stage functions, then the pipeline that runs them."""
    tree = ast.parse(PIPELINE_FILE.read_text())
    order = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    stages = ["NoiseSchedule", "noise_error", "inpaint", "denoise"]
    assert [order.index(s) for s in stages] == sorted(order.index(s) for s in stages)
    assert max(order.index(s) for s in stages) < order.index("SelfAwareInpaintPipeline")
    assert len(PIPELINE_FILE.read_text().splitlines()) <= 600  # issue 21 (the plumbing is in its siblings)


# ------------------------------------------------------------------ the stages against diffusers


@pytest.mark.parametrize("start", [1, 6, 50, 1000])
def test_strided_timesteps_start_at_t_minus_one_for_every_step_count(start):
    for n in sorted({1, min(2, start), min(3, start), min(10, start), start}):
        pairs = NoiseSchedule.timesteps(start, n)
        steps = [t for t, _ in pairs]
        assert steps[0] == start - 1 and steps[-1] == (0 if n > 1 else start - 1), (start, n, steps)
        assert len(steps) == n and steps == sorted(set(steps), reverse=True)
        assert [t_prev for _, t_prev in pairs] == steps[1:] + [-1]
    with pytest.raises(ValueError, match="num_steps"):
        NoiseSchedule.timesteps(6, 7)


def test_posterior_step_equals_ddpm_scheduler_step(schedule):
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid")
    assert scheduler.config.variance_type == "fixed_small"
    timesteps = [t for t, _ in NoiseSchedule.timesteps(50, 6)]
    scheduler.set_timesteps(timesteps=timesteps)
    x_t, eps = images(2, seed=1), images(2, seed=2)
    for t in timesteps:
        t_prev = scheduler.previous_timestep(t)
        expected = scheduler.step(eps, t, x_t, generator=gens(5, 6)).prev_sample
        noise = randn_tensor(x_t.shape, generator=gens(5, 6)) if t_prev >= 0 else None
        ours = schedule.step(x_t, schedule.estimate_x0(x_t, eps, t), t, int(t_prev), noise)
        torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-5)


def test_denoise_equals_a_plain_scheduler_loop(schedule):
    unet = tiny_unet(seed=3).eval()
    x = images(2, seed=4)
    with torch.no_grad():
        ours = denoise(unet, schedule, x, start=50, num_steps=5, generators=gens(1, 2))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid")
        scheduler.set_timesteps(timesteps=[t for t, _ in NoiseSchedule.timesteps(50, 5)])
        g = gens(1, 2)
        x_t = scheduler.add_noise(x, randn_tensor(x.shape, generator=g), torch.tensor([49]))
        x0 = None
        for t in scheduler.timesteps:
            out = scheduler.step(predict_noise(unet, x_t, int(t), x0), t, x_t, generator=g)
            x_t, x0 = out.prev_sample, out.pred_original_sample
    torch.testing.assert_close(ours, x_t.clamp(-1, 1), atol=2e-5, rtol=1e-5)


class _RecordingUNet(torch.nn.Module):
    """Wraps a UNet and records the noisy half (x_t) of every input."""

    def __init__(self, unet: UNet2DModel):
        super().__init__()
        self.unet, self.inputs = unet, []

    def forward(self, sample, t):
        self.inputs.append(sample[:, :3].clone())
        return self.unet(sample, t)


@pytest.mark.parametrize("renoise", ["fixed", "fresh"])
def test_fixed_renoising_reuses_the_start_eps(schedule, renoise):
    unet = _RecordingUNet(tiny_unet(seed=1).eval())
    x = images(1, seed=2)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    with torch.no_grad():
        inpaint(unet, schedule, x, mask, start=50, num_steps=1, resample_steps=3, renoise=renoise, generators=gens(0))
    first, second, third = unet.inputs
    known = (mask == 0).expand_as(x)
    # the known pixels of x0_hat are x itself: with the start's eps, every re-noised x_t equals the start there
    same = torch.equal(second[known], first[known]) and torch.equal(third[known], first[known])
    assert same == (renoise == "fixed")
    assert not torch.equal(second[~known], first[~known])  # the masked pixels were predicted, not kept


def test_inpaint_keeps_known_pixels_exactly_and_redraws_the_mask(schedule):
    x = images(2, seed=3)
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 4:12, 4:12] = 1
    mask[1] = 1
    with torch.no_grad():
        out = inpaint(tiny_unet().eval(), schedule, x, mask, start=50, num_steps=3, resample_steps=2, renoise="fresh",
                      generators=gens(0, 1))
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert (out - x)[~keep].abs().mean() > 0.05


def test_predict_noise_and_segmenter_logits_shapes():
    unet, seg = tiny_unet(), tiny_unet(1, seed=1, block_out_channels=(8, 16))
    x = images(2)
    with torch.no_grad():
        eps = predict_noise(unet, x, torch.tensor([10, 20]))
        eps_zero = predict_noise(unet, x, torch.tensor([10, 20]), torch.zeros_like(x))
        eps_cond = predict_noise(unet, x, torch.tensor([10, 20]), x)
        logits = segmenter_logits(seg, x, x)
    assert eps.shape == (2, 3, 32, 32) and torch.equal(eps, eps_zero) and not torch.equal(eps, eps_cond)
    assert logits.shape == (2, 1, 32, 32)


def test_multiscale_map_values():
    x = images(2)
    assert multiscale_anomaly_map(x, x, mean_filter_size=5).abs().max() == 0
    shifted = x.clone()
    shifted[:, 0] += 0.3  # one of three channels off by 0.3 -> error 0.1 at every pixel and scale
    m = multiscale_anomaly_map(x, shifted, mean_filter_size=3)
    assert m.shape == (2, 32, 32)
    torch.testing.assert_close(m, torch.full_like(m, 0.1), atol=1e-5, rtol=0)
    local = x.clone()
    local[:, :, 12:20, 12:20] = 1.0
    m = multiscale_anomaly_map(x, local, mean_filter_size=5)
    assert m[:, 16, 16].min() > 5 * m[:, 2, 2].max()
    assert default_mean_filter_size(64) == 13 and default_mean_filter_size(32) == 7 and default_mean_filter_size(16) == 3


def test_the_map_filter_is_the_calibrations_so_older_calibrations_keep_theirs(calibrated):
    """The calibration records the mean filter its thresholds were fitted with, and every call smooths with it; a
    calibration made before 0.4 records none and keeps the filter it was fitted with (the odd number nearest
    tile / 8); recalibrating fits with the current default."""
    cal = calibrated.calibration
    assert cal.config.map_filter_size == default_mean_filter_size(32) == 7 and cal.filter_size(32) == 7
    x = images(2, seed=5)
    out = calibrated(x, generator=gens(1, 2), output_type="pt")
    torch.testing.assert_close(out.anomaly_maps["noise_error"], mean_filter(out.noise_ratios, 7))
    old = copy.deepcopy(calibrated)
    old.calibration.register_to_config(map_filter_size=None)  # as saved by 0.3
    assert old.calibration.filter_size(32) == 5 and old.calibration.filter_size(64) == 9
    before = old(x, generator=gens(1, 2), output_type="pt")
    torch.testing.assert_close(before.anomaly_maps["noise_error"], mean_filter(before.noise_ratios, 5))
    old.calibrate(images(6, seed=1), config=QUICK, generator=torch.Generator().manual_seed(0))
    assert old.calibration.config.map_filter_size == 7
    assert torch.equal(old.calibration.thresholds, cal.thresholds)  # as if there had been no older calibration


# ------------------------------------------------------------------ the sampler's config


def test_presets_and_their_pass_counts():
    fast, thesis = SamplingConfig.fast(), SamplingConfig.thesis()
    assert fast == SamplingConfig() and fast.preset_name == "fast" and thesis.preset_name == "thesis"
    assert (fast.unet_passes("self_aware"), fast.unet_passes("denoise")) == (3 * 1 + 7, 10)
    assert (thesis.unet_passes("self_aware"), thesis.unet_passes("denoise")) == (51 + 50 * 5, 50)
    assert thesis.mask_timesteps == tuple(range(300, 351)) and thesis.renoise == "fixed"
    assert SamplingConfig.from_preset("thesis") == thesis and SamplingConfig.from_preset(QUICK) is QUICK
    assert QUICK.preset_name is None
    assert SamplingConfig.from_dict(thesis.to_dict()) == thesis and SamplingConfig.from_dict(fast.to_dict()) == fast
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.reconstruction_steps = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="unknown sampling preset 'reference'"):
        SamplingConfig.from_preset("reference")


@pytest.mark.parametrize("kwargs, match", [
    ({"mask_timesteps": ()}, "mask_timesteps"),
    ({"mask_timesteps": 300}, "mask_timesteps"),
    ({"mask_timesteps": (300, -1)}, "mask_timesteps"),
    ({"mask_noise_draws": 0}, "mask_noise_draws"),
    ({"mask_percentile": 1.0}, "mask_percentile"),
    ({"mask_percentile": 80}, "mask_percentile"),
    ({"inpaint_start": 0}, "inpaint_start"),
    ({"reconstruction_steps": 0}, "reconstruction_steps"),
    ({"reconstruction_steps": 51}, "reconstruction_steps"),
    ({"denoise_steps": 2.5}, "denoise_steps"),
    ({"resample_steps": True}, "resample_steps"),
    ({"renoise": "other"}, "renoise"),
    ({"map_filter_size": 4}, "map_filter_size"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


# ------------------------------------------------------------------ calibration


def test_calibration_stores_its_config_and_cross_fitted_thresholds():
    pipe = tiny_pipeline()
    x = images(8, seed=1)
    pipe.calibrate(x, config=QUICK, generator=gens(*range(8)))
    cal = pipe.calibration
    assert isinstance(cal, AnomalyCalibration) and cal.sampling == QUICK and cal.config.num_images == 8
    assert list(cal.config.threshold_names) == ["self_aware/multiscale", "self_aware/noise_error",
                                                "self_aware/combined", "denoise/multiscale"]
    assert len(cal.config.heldout_false_positive_rates) == 4 and 0 < cal.config.heldout_mask_share < 1
    # Q_p is each pixel's 0.8 quantile of Q over the calibration images (plotting position 0.8 x 9 = 7.2: between
    # the 7th and 8th of 8 values): the same images with the same seeds exceed it at exactly one image per pixel
    out = pipe(x, generator=gens(*range(8)))
    np.testing.assert_array_equal(out.inpaint_masks.sum(axis=0), np.ones((32, 32)))
    # cross-fitting: each image is scored against the other fold's Q_p, as a model calibrated on that fold alone
    # scores it; an image threshold at a 5% target over 8 images is the highest of those held-out scores
    heldout = []
    for fit, held in ((range(0, 8, 2), range(1, 8, 2)), (range(1, 8, 2), range(0, 8, 2))):
        half = tiny_pipeline().calibrate(x[list(fit)], config=QUICK, generator=gens(*fit))
        heldout += half(x[list(held)], generator=gens(*held)).scores["multiscale"].tolist()
    assert np.isclose(cal.threshold("self_aware/multiscale"), max(heldout), atol=1e-6)
    # denoise masks nothing: the calibration images' own scores, the highest of them its threshold
    denoised = pipe(x, method="denoise", generator=gens(*range(8)))
    assert np.isclose(cal.threshold("denoise/multiscale"), denoised.scores["multiscale"].max(), atol=1e-6)
    assert not denoised.is_anomalous["multiscale"].any()


def test_a_call_runs_the_calibrated_config_and_refuses_another(calibrated):
    x = images(1, seed=2)
    assert calibrated(x).unet_passes.tolist() in ([QUICK.unet_passes("self_aware")], [2])
    assert calibrated(x, config=QUICK).scores["multiscale"].shape == (1,)
    for other in ("fast", "thesis", dataclasses.replace(QUICK, mask_percentile=0.9)):
        with pytest.raises(ValueError, match="recalibrate"):
            calibrated(x, config=other)


def test_a_calibration_from_diffad_0_1_must_be_recalibrated():
    pipe = tiny_pipeline()
    pipe.register_modules(calibration=AnomalyCalibration(resolution=32, threshold_names=["self_aware/multiscale"]))
    with pytest.raises(ValueError, match="diffad 0.1.*recalibrate"):
        pipe(images(1))


def test_denoise_only_calibration_refuses_self_aware():
    pipe = tiny_pipeline().calibrate(images(4), config=QUICK, methods=("denoise",))
    assert pipe(images(1), method="denoise").is_anomalous["multiscale"] is not None
    with pytest.raises(ValueError, match="denoise' only"):
        pipe(images(1))


def test_per_pixel_quantile_beyond_torch_quantile_limit():
    """300 maps of 256 x 256 are more than torch.quantile's 2**24 elements: Q_p must not depend on it."""
    q = torch.rand(300, 256, 256, generator=torch.Generator().manual_seed(0))
    expected = np.quantile(q.numpy(), 0.8, axis=0, method="weibull")
    np.testing.assert_allclose(per_pixel_quantile(q, 0.8).numpy(), expected, rtol=1e-6)


def test_per_pixel_quantile_is_exceeded_by_one_minus_p_of_new_images_for_few_images():
    """With 20 images a linear quantile is exceeded by ~23% of new images at p = 0.8; the unbiased one by 20%."""
    g = torch.Generator().manual_seed(0)
    fitted, new = torch.rand(20, 200, 200, generator=g), torch.rand(50, 200, 200, generator=g)
    assert abs(float((new > per_pixel_quantile(fitted, 0.8)).float().mean()) - 0.2) < 0.005
    assert float((new > torch.quantile(fitted, 0.8, dim=0)).float().mean()) > 0.22


@pytest.mark.slow
def test_calibrates_300_images_at_256_px():
    """Beyond torch.quantile's 2**24-element limit (300 x 256 x 256): calibration must not fail."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=256, in_channels=6, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                       norm_num_groups=4, add_attention=False, down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",))
    pipe = SelfAwareInpaintPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000,
                                                                        beta_schedule="sigmoid"))
    pipe.set_progress_bar_config(disable=True)
    config = SamplingConfig(mask_timesteps=(300,), mask_noise_draws=1, reconstruction_steps=1, resample_steps=1)
    x = images(300, seed=1, size=256)
    pipe.calibrate(x, config=config, methods=("self_aware",), batch_size=100)
    assert pipe.calibration.q_threshold.shape == (256, 256) and pipe.calibration.config.num_images == 300
    assert abs(pipe.calibration.config.heldout_mask_share - 0.2) < 0.02


@pytest.mark.parametrize("kwargs, match", [
    ({"config": "reference"}, "unknown sampling preset"),
    ({"config": SamplingConfig(mask_timesteps=(1000,))}, "num_train_timesteps"),
    ({"target_false_positive_rate": 1.5}, "target_false_positive_rate"),
    ({"methods": ("other",)}, "methods"),
    ({"methods": ()}, "methods"),
])
def test_bad_calibration_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline().calibrate(images(4), **kwargs)


def test_calibration_needs_two_folds_of_two_images():
    with pytest.raises(ValueError, match="at least 4"):
        tiny_pipeline().calibrate(images(3))


def test_calibration_at_another_resolution_is_an_error():
    pipe = tiny_pipeline()
    pipe.register_modules(calibration=AnomalyCalibration(resolution=64, sampling_config=QUICK.to_dict(),
                                                         threshold_names=("self_aware/multiscale",)))
    with pytest.raises(ValueError, match="calibration was made at 64 px in 64 px tiles but the model inspects at 32 px"):
        pipe(images(1))


# ------------------------------------------------------------------ a call


def test_one_call_returns_every_map_with_its_score_and_decision(calibrated):
    x = images(2, seed=3)
    out = calibrated(x, generator=gens(10, 11))
    assert set(out.anomaly_maps) == set(out.scores) == set(out.is_anomalous) == {"multiscale", "noise_error",
                                                                                 "combined"}
    for name, m in out.anomaly_maps.items():
        assert m.shape == (2, 32, 32) and m.dtype == np.float32
        np.testing.assert_array_equal(out.scores[name], m.reshape(2, -1).max(1))
        threshold = calibrated.calibration.threshold(f"self_aware/{name}")
        np.testing.assert_array_equal(out.is_anomalous[name], out.scores[name] > threshold)
    assert out.inpaint_masks.shape == (2, 32, 32) and out.inpaint_masks.dtype == bool
    assert out.reconstructions.shape == (2, 32, 32, 3) and out.unet_passes.shape == (2,)
    # the mask-stage map is Q / Q_p (Algorithm 2's noise error with each image's noise), smoothed like every map
    with torch.no_grad():
        q = noise_error(calibrated.unet, calibrated.schedule, x, QUICK.mask_timesteps, QUICK.mask_noise_draws,
                        gens(10, 11))
    expected = mean_filter(q / calibrated.calibration.q_threshold, default_mean_filter_size(32))
    np.testing.assert_allclose(out.anomaly_maps["noise_error"], expected.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.inpaint_masks, (q > calibrated.calibration.q_threshold).numpy())
    # combined: the mean of noise_error and multiscale, each over its calibrated image threshold
    cal = calibrated.calibration
    expected = (out.anomaly_maps["noise_error"] / cal.threshold("self_aware/noise_error")
                + out.anomaly_maps["multiscale"] / cal.threshold("self_aware/multiscale")) / 2
    np.testing.assert_allclose(out.anomaly_maps["combined"], expected, rtol=1e-5)
    assert calibrated.default_map("self_aware") == "combined" and calibrated.default_map("denoise") == "multiscale"


def test_denoise_reconstruction_redraws_every_pixel_like_the_baseline():
    """reconstruction="denoise" (the default): self_aware's reconstruction is method="denoise"'s with its own step
    count, whatever the mask; "inpaint" keeps the unmasked pixels exactly."""
    config = SamplingConfig(mask_timesteps=(300,), mask_noise_draws=1, inpaint_start=6, reconstruction_steps=3,
                            denoise_steps=3)
    pipe = tiny_pipeline().calibrate(images(4, seed=1), config=config, generator=torch.Generator().manual_seed(0))
    x = images(2, seed=3)
    aware = pipe(x, generator=torch.Generator().manual_seed(5), output_type="pt")
    base = pipe(x, method="denoise", generator=torch.Generator().manual_seed(5), output_type="pt")
    assert aware.unet_passes.tolist() == [1 + 3, 1 + 3]
    # the same noise after the mask stage's draw: not identical streams, but every pixel is redrawn
    assert (aware.reconstructions != x).float().mean() > 0.99 and aware.inpaint_masks.float().mean() < 0.6
    assert base.reconstructions.shape == aware.reconstructions.shape
    with pytest.raises(ValueError, match="resample_steps must be 1"):
        dataclasses.replace(config, resample_steps=2)
    # a config stored before ``reconstruction`` existed: recalibrate
    stored = {k: v for k, v in config.to_dict().items() if k != "reconstruction"}
    with pytest.raises(ValueError, match="recalibrate"):
        SamplingConfig.from_dict(stored)


def test_a_config_stored_with_the_old_field_name_reads_as_the_new_one():
    stored = {("inpaint_steps" if k == "reconstruction_steps" else k): v for k, v in QUICK.to_dict().items()}
    assert "reconstruction_steps" not in stored and stored["inpaint_steps"] == QUICK.reconstruction_steps
    assert SamplingConfig.from_dict(stored) == QUICK


def test_a_folder_saved_before_the_rename_loads_and_scores_the_same(calibrated, tmp_path):
    calibrated.save_pretrained(tmp_path)
    config_file = tmp_path / "calibration" / "config.json"
    config = json.loads(config_file.read_text())
    sampling = config["sampling_config"]
    sampling["inpaint_steps"] = sampling.pop("reconstruction_steps")  # what a folder saved before the rename holds
    config_file.write_text(json.dumps(config))
    old_hash = folder_calibration_hash(tmp_path)
    old = SelfAwareInpaintPipeline.from_pretrained(tmp_path)
    assert old.calibration.sampling == QUICK
    assert "inpaint_steps" in old.calibration.config.sampling_config  # loading rewrites nothing: the hash holds
    assert calibration_hash(old) == old_hash == folder_calibration_hash(tmp_path)
    assert json.loads(config_file.read_text()) == config
    x = images(2, seed=6)
    a = calibrated(x, generator=torch.Generator().manual_seed(7), output_type="pt")
    b = old(x, generator=torch.Generator().manual_seed(7), output_type="pt")
    assert torch.equal(a.reconstructions, b.reconstructions) and torch.equal(a.inpaint_masks, b.inpaint_masks)
    assert a.anomaly_maps.keys() == b.anomaly_maps.keys()
    assert all(torch.equal(a.anomaly_maps[k], b.anomaly_maps[k]) and torch.equal(a.scores[k], b.scores[k])
               for k in a.anomaly_maps)


def test_output_types(calibrated):
    x = images(2, seed=3)
    out = calibrated(x, generator=torch.Generator().manual_seed(0))
    pt = calibrated(x, generator=torch.Generator().manual_seed(0), output_type="pt")
    pil = calibrated(x, generator=torch.Generator().manual_seed(0), output_type="pil")
    # "pt" reconstructions are in the range of tensor inputs, [-1, 1]; "np" in [0, 1]
    np.testing.assert_allclose(pt.reconstructions.permute(0, 2, 3, 1).numpy() / 2 + 0.5, out.reconstructions,
                               atol=1e-6)
    np.testing.assert_allclose(pt.anomaly_maps["multiscale"].numpy(), out.anomaly_maps["multiscale"], atol=1e-6)
    assert pt.inpaint_masks.dtype == torch.bool and pt.unet_passes.dtype == torch.long
    assert len(pil.reconstructions) == 2 and pil.reconstructions[0].size == (32, 32)
    np.testing.assert_allclose(np.asarray(pil.reconstructions[0]) / 255.0, out.reconstructions[0], atol=1 / 255)
    tup = calibrated(x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(tup, tuple) and np.array_equal(tup[0]["multiscale"], out.anomaly_maps["multiscale"])
    with pytest.raises(ValueError, match="output_type"):
        calibrated(x, output_type="latent")


def test_outside_mask_pixels_unchanged(calibrated):
    x = images(3, seed=4)
    out = calibrated(x, generator=torch.Generator().manual_seed(0), output_type="pt")
    keep = ~out.inpaint_masks.unsqueeze(1).expand_as(x)
    assert out.inpaint_masks.any() and keep.any()
    assert torch.equal(out.reconstructions[keep], x[keep])
    assert not torch.allclose(out.reconstructions, x)  # the masked pixels were redrawn


def test_empty_mask_returns_input_and_costs_only_the_mask_stage():
    pipe = tiny_pipeline().calibrate(images(4, seed=1), config=QUICK, methods=("self_aware",))
    x = images(2, seed=5)
    pipe.calibration.q_threshold.fill_(float("inf"))
    out = pipe(x, output_type="pt")
    assert not out.inpaint_masks.any() and torch.equal(out.reconstructions, x)
    assert (out.anomaly_maps["multiscale"] == 0).all() and out.unet_passes.tolist() == [2, 2]
    pipe.calibration.q_threshold.fill_(-1.0)
    out = pipe(x, output_type="pt")
    assert out.inpaint_masks.all() and (out.reconstructions - x).abs().mean() > 0.05
    assert out.unet_passes.tolist() == [2 + 3 * 2] * 2


def test_same_seed_same_output_other_seed_differs(calibrated):
    x = images(2, seed=6)
    a = calibrated(x, generator=torch.Generator().manual_seed(7), output_type="pt")
    b = calibrated(x, generator=torch.Generator().manual_seed(7), output_type="pt")
    c = calibrated(x, generator=torch.Generator().manual_seed(8), output_type="pt")
    assert torch.equal(a.reconstructions, b.reconstructions) and torch.equal(a.inpaint_masks, b.inpaint_masks)
    assert all(torch.equal(a.anomaly_maps[k], b.anomaly_maps[k]) for k in a.anomaly_maps)
    assert not torch.equal(a.reconstructions, c.reconstructions)


@pytest.mark.parametrize("method", ["self_aware", "denoise"])
def test_batch_equals_one_by_one(calibrated, method):
    x = images(3, seed=9)
    seeds = [11, 12, 13]
    batch = calibrated(x, method=method, generator=gens(*seeds))
    chunked = calibrated(x, method=method, batch_size=2, generator=gens(*seeds))
    for i, s in enumerate(seeds):
        one = calibrated(x[i:i + 1], method=method, generator=gens(s))
        assert np.array_equal(one.inpaint_masks[0], batch.inpaint_masks[i])
        np.testing.assert_allclose(one.reconstructions[0], batch.reconstructions[i], atol=1e-5)
        np.testing.assert_allclose(one.scores["multiscale"][0], batch.scores["multiscale"][i], atol=1e-5)
    np.testing.assert_allclose(chunked.reconstructions, batch.reconstructions, atol=1e-5)
    single = calibrated(x, method=method, generator=torch.Generator().manual_seed(3))
    single_chunked = calibrated(x, method=method, batch_size=1, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(single.reconstructions, single_chunked.reconstructions, atol=1e-5)
    with pytest.raises(ValueError, match="3 generators for 2 images"):
        calibrated(x[:2], method=method, generator=gens(*seeds))


def test_denoise_needs_no_calibration_but_self_aware_does():
    pipe = tiny_pipeline()
    x = images(1)
    out = pipe(x, method="denoise", config=QUICK)
    assert out.is_anomalous == {"multiscale": None} and out.unet_passes.tolist() == [3]
    assert not out.inpaint_masks.any()
    assert pipe(x, method="denoise").unet_passes.tolist() == [SamplingConfig.fast().denoise_steps]
    with pytest.raises(ValueError, match="not calibrated"):
        pipe(x)
    with pytest.raises(ValueError, match="method must be one of"):
        pipe(x, method="other")


def test_segmenter_adds_the_learned_map_with_its_threshold():
    pipe = tiny_pipeline(segmenter=True).calibrate(images(4, seed=1), config=QUICK, methods=("self_aware",))
    assert list(pipe.calibration.config.threshold_names) == ["self_aware/multiscale", "self_aware/learned",
                                                             "self_aware/noise_error", "self_aware/combined"]
    x = images(2, seed=2)
    out = pipe(x, output_type="pt", generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = torch.sigmoid(segmenter_logits(pipe.segmenter, x, out.reconstructions))[:, 0]
    torch.testing.assert_close(out.anomaly_maps["learned"], mean_filter(probs, default_mean_filter_size(32)))
    assert out.is_anomalous["learned"] is not None


def test_preprocess_pil_and_tensor_resizing():
    pipe = tiny_pipeline()
    gray = Image.fromarray(np.full((48, 40), 255, dtype=np.uint8), mode="L")
    rgb = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    x = pipe.preprocess([gray, rgb])
    assert x.shape == (2, 3, 32, 32)
    assert torch.allclose(x[0], torch.ones(3, 32, 32)) and torch.allclose(x[1], -torch.ones(3, 32, 32))
    assert pipe.preprocess(gray).shape == (1, 3, 32, 32)
    assert pipe.preprocess(torch.zeros(3, 64, 64)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(1, 1, 32, 32), "RGB"),
    (torch.zeros(1, 4, 32, 32), "RGB"),
    (torch.full((1, 3, 32, 32), float("nan")), "NaN or inf"),
    (torch.full((1, 3, 32, 32), float("inf")), "NaN or inf"),
    (torch.zeros(0, 3, 32, 32), "non-empty"),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
    ([], "no images"),
    (torch.full((1, 3, 32, 32), 2.0), r"\[-1, 1\]"),
    ("image.png", "unsupported type"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny_pipeline()(bad, method="denoise")


def test_bad_empty_pil_image():
    with pytest.raises(ValueError, match="empty"):
        tiny_pipeline().preprocess(Image.new("RGB", (0, 0)))


def test_progress_bar_disabled(calibrated, capsys):
    calibrated(images(1))
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "%|" not in captured.err


# ------------------------------------------------------------------ with a trained model


def test_mask_share_on_held_back_normal_images_is_one_minus_p(trained_tiny_pipeline, tmp_path):
    """The default config's masks cover about 1 - p of the pixels of normal images Q_p never saw: the estimator at
    test time is exactly the calibrated one (diffad 0.1 masked 25.6% of normal pixels for p = 0.8)."""
    from diffad import load_mvtec, make_synthetic_dataset
    from diffad.synthetic import SYNTHETIC_CATEGORIES

    category = SYNTHETIC_CATEGORIES[0]
    root = make_synthetic_dataset(tmp_path / "fresh", seed=1, resolution=64, categories=[category], num_train=70,
                                  num_test_good=1, num_test_defect_per_type=1)
    normal = [row["image"] for row in load_mvtec(root, category, resolution=32, validation_fraction=0.01)["train"]]
    pipe = SelfAwareInpaintPipeline.from_pretrained(trained_tiny_pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.calibrate(normal[:40], config="fast", methods=("self_aware",),
                   generator=torch.Generator().manual_seed(0))
    held_back = pipe(normal[40:], generator=torch.Generator().manual_seed(1))
    share = float(held_back.inpaint_masks.mean())
    assert abs(share - 0.2) <= 0.05, share
    assert abs(pipe.calibration.config.heldout_mask_share - 0.2) <= 0.05


def test_bf16_precision_runs_the_networks_in_bf16_and_keeps_the_maps_close():
    """precision="bf16": the UNet runs under bf16 autocast, everything else stays float32; the maps stay close to
    fp32's; a calibration records its precision and a call runs it."""
    fp32 = SamplingConfig(mask_timesteps=(300,), mask_noise_draws=1, inpaint_start=6, reconstruction_steps=3,
                          denoise_steps=3)
    bf16 = dataclasses.replace(fp32, precision="bf16")
    assert bf16.preset_name is None and dataclasses.replace(SamplingConfig.fast(), precision="bf16").preset_name == "fast"
    x = images(4, seed=1)
    outs = {}
    for config in (fp32, bf16):
        pipe = tiny_pipeline().calibrate(x, config=config, generator=torch.Generator().manual_seed(0))
        assert pipe.calibration.sampling.precision == config.precision
        seen = []
        hook = pipe.unet.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        outs[config.precision] = pipe(images(2, seed=3), generator=torch.Generator().manual_seed(0), output_type="pt")
        hook.remove()
        assert set(seen) == {torch.bfloat16 if config.precision == "bf16" else torch.float32}
    a, b = outs["fp32"], outs["bf16"]
    for name in a.anomaly_maps:
        assert b.anomaly_maps[name].dtype == torch.float32
        assert torch.allclose(a.anomaly_maps[name], b.anomaly_maps[name], rtol=0.1, atol=0.05), name
    with pytest.raises(ValueError, match="precision must be one of"):
        SamplingConfig(precision="fp16")


def test_a_calibrated_config_matches_its_preset_at_any_precision_and_nothing_else():
    import dataclasses

    from diffad.pipelines.self_aware_inpaint import SamplingConfig

    fast_bf16 = dataclasses.replace(SamplingConfig.fast(), precision="bf16")
    assert fast_bf16.matches("fast") and SamplingConfig.fast().matches("fast")
    assert not fast_bf16.matches("thesis") and not fast_bf16.matches(SamplingConfig.fast())
    assert fast_bf16.matches(dataclasses.replace(SamplingConfig.fast(), precision="bf16"))
    custom = dataclasses.replace(SamplingConfig.fast(), denoise_steps=5)
    assert not custom.matches("fast") and custom.matches(dataclasses.replace(custom))
