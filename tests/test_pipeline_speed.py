"""The fast path (issue 8): exact UNet pass counting from outside, reference equivalence, lever validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffad.pipelines.self_aware_inpaint import FAST_SETTINGS, REFERENCE_SETTINGS, AnomalyCalibration
from diffad.pipelines.self_aware_inpaint.pipeline import MASK_LEVERS, _mean_filter

from test_pipeline import images, make_pipe


class CallCounter:
    """Counts UNet forward calls and the images they carried, through a forward pre-hook (outside the pipeline)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        self.images = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.images += args[0].shape[0]

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def pipe():
    return make_pipe().calibrate(images(4, seed=1), mask_timesteps=(300, 305), methods=("self_aware",),
                                 generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def thesis_pipe():
    """Calibrated on the thesis's 51 mask timesteps (300..350), with the thesis's mask levers (mode="reference")."""
    return make_pipe().calibrate(images(3, seed=1), methods=("self_aware",), mode="reference",
                                 generator=torch.Generator().manual_seed(0))


def reference_levers(inpaint_timesteps: int) -> dict:
    """The fast mode's levers set to the reference values, explicitly (the mask levers are the calibration's)."""
    levers = {k: v for k, v in REFERENCE_SETTINGS.items() if k not in MASK_LEVERS}
    levers["num_mask_timesteps"] = 6
    levers["num_inpaint_steps"] = inpaint_timesteps
    levers["denoise_steps"] = inpaint_timesteps
    return levers


def test_default_fast_path_passes_counted_from_outside():
    pipe = make_pipe().calibrate(images(3, seed=1), methods=(), generator=torch.Generator().manual_seed(0))
    counter = CallCounter(pipe.unet)
    out = pipe(images(1, seed=2), generator=torch.Generator().manual_seed(0))
    counter.close()
    assert out.masks.any()  # inpainting ran
    expected = (FAST_SETTINGS["num_mask_timesteps"] * FAST_SETTINGS["mask_noise_draws"]
                + FAST_SETTINGS["num_inpaint_steps"] * FAST_SETTINGS["resample_steps"])
    assert out.num_unet_passes == counter.calls == expected <= 25


def test_reference_pass_count_is_the_thesis_count(thesis_pipe):
    counter = CallCounter(thesis_pipe.unet)
    out = thesis_pipe(images(1, seed=2), mode="reference", inpaint_timesteps=4,
                      generator=torch.Generator().manual_seed(0))
    counter.close()
    assert out.num_unet_passes == counter.calls == 51 + 4 * 5
    # with the thesis's T = 50 the count is 51 + 50 x 5 = 301 (not run here: arithmetic of the same loop)


@pytest.mark.parametrize("levers", [
    dict(num_mask_timesteps=2, num_inpaint_steps=3, resample_steps=4),
    dict(num_mask_timesteps=5, num_inpaint_steps=1, resample_steps=1),
    dict(num_mask_timesteps=6, num_inpaint_steps=6, resample_steps=2, renoise="fresh"),
])
def test_pass_count_is_exact_per_image_in_a_batch(pipe, levers):
    x = images(3, seed=3)
    counter = CallCounter(pipe.unet)
    out = pipe(x, inpaint_timesteps=6, generator=torch.Generator().manual_seed(0), **levers)
    counter.close()
    mask_passes = levers["num_mask_timesteps"] * pipe.calibration.config.mask_noise_draws  # each draw: every t
    expected = mask_passes + levers["num_inpaint_steps"] * levers["resample_steps"]
    nonempty = out.masks.reshape(3, -1).any(1)
    assert np.array_equal(out.unet_passes_per_image, np.where(nonempty, expected, mask_passes))
    assert counter.images == int(out.unet_passes_per_image.sum())
    assert counter.calls == (mask_passes + (levers["num_inpaint_steps"] * levers["resample_steps"]
                                            if nonempty.any() else 0))


def test_skip_empty_masks_saves_passes_not_results(pipe):
    x = images(2, seed=4)
    saved = pipe.calibration.q_threshold.clone()
    try:
        pipe.calibration.q_threshold[:] = float("inf")  # every mask empty
        common = dict(inpaint_timesteps=6, num_mask_timesteps=2, num_inpaint_steps=3, resample_steps=2,
                      generator=torch.Generator().manual_seed(0))
        skipped = pipe(x, skip_empty_masks=True, **common)
        common["generator"] = torch.Generator().manual_seed(0)
        full = pipe(x, skip_empty_masks=False, **common)
    finally:
        pipe.calibration.q_threshold.copy_(saved)
    draws = pipe.calibration.config.mask_noise_draws
    assert skipped.num_unet_passes == 2 * draws and full.num_unet_passes == 2 * draws + 3 * 2
    assert np.array_equal(skipped.reconstructions, full.reconstructions)
    assert np.array_equal(skipped.anomaly_maps, full.anomaly_maps)


@pytest.mark.parametrize("method", ["self_aware", "denoise"])
def test_fast_with_reference_levers_reproduces_reference(pipe, method):
    x = images(2, seed=5)
    ref = pipe(x, method=method, mode="reference", inpaint_timesteps=6, generator=torch.Generator().manual_seed(1))
    fast = pipe(x, method=method, mode="fast", inpaint_timesteps=6, generator=torch.Generator().manual_seed(1),
                **reference_levers(6))
    for field in ("anomaly_maps", "scores", "masks", "reconstructions", "unet_passes_per_image"):
        assert np.array_equal(getattr(ref, field), getattr(fast, field)), field
    draws = pipe.calibration.config.mask_noise_draws  # the fast calibration's (the mask levers are calibrated)
    assert ref.num_unet_passes == (6 * draws + 6 * 5 if method == "self_aware" else 6)


def test_each_lever_changes_the_computation(pipe):
    """Every lever is live: changing it alone (from the reference values) changes outputs or the pass count."""
    x = images(1, seed=6)
    base_levers = reference_levers(6)

    def run(**change):
        return pipe(x, inpaint_timesteps=6, generator=torch.Generator().manual_seed(1), **{**base_levers, **change})

    base = run()
    assert base.masks.any()
    for change in [dict(num_mask_timesteps=3), dict(num_inpaint_steps=3), dict(resample_steps=2),
                   dict(renoise="fresh"), dict(self_condition_init="mask_x0")]:
        other = run(**change)
        assert (other.num_unet_passes != base.num_unet_passes
                or not np.array_equal(other.reconstructions, base.reconstructions)), change
    cl = run(channels_last=True)  # same maths in another memory layout
    np.testing.assert_allclose(cl.reconstructions, base.reconstructions, atol=1e-4)
    assert pipe.unet.conv_in.weight.is_contiguous()  # layout restored after the call


def test_mode_settings_are_documented_values():
    assert (FAST_SETTINGS["num_mask_timesteps"] * FAST_SETTINGS["mask_noise_draws"]
            + FAST_SETTINGS["num_inpaint_steps"] * FAST_SETTINGS["resample_steps"]) <= 25
    assert REFERENCE_SETTINGS["resample_steps"] == 5 and REFERENCE_SETTINGS["num_mask_timesteps"] is None
    assert all(REFERENCE_SETTINGS[k] == 1 for k in MASK_LEVERS)  # the thesis: raw Q, one draw, no dilation
    assert set(FAST_SETTINGS) == set(REFERENCE_SETTINGS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="turbo"), "mode"),
    (dict(method="other"), "method"),
    (dict(anomaly_map="other"), "anomaly_map"),
    (dict(output_type="pil"), "output_type"),
    (dict(inpaint_timesteps=0), "inpaint_timesteps"),
    (dict(inpaint_timesteps=1001), "inpaint_timesteps"),
    (dict(num_inpaint_steps=0), "num_inpaint_steps"),
    (dict(num_inpaint_steps=51), "num_inpaint_steps"),
    (dict(denoise_steps=2.5), "denoise_steps"),
    (dict(resample_steps=0), "resample_steps"),
    (dict(renoise="random"), "renoise"),
    (dict(num_mask_timesteps=0), "num_mask_timesteps"),
    (dict(num_mask_timesteps=7), "calibrated mask timesteps"),
    (dict(skip_empty_masks="yes"), "skip_empty_masks"),
    (dict(self_condition_init="ones"), "self_condition_init"),
    (dict(channels_last=1), "channels_last"),
    (dict(autocast="bf16"), "autocast"),
    (dict(mean_filter_size=4), "mean_filter_size"),
    (dict(batch_size=0), "batch_size"),
])
def test_lever_validation(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(images(1), **kwargs)


def test_generator_list_length_checked(pipe):
    with pytest.raises(ValueError, match="generators"):
        pipe(images(2), generator=[torch.Generator()])


# ---------------------------------------------------------------------------------------------- mask levers


def calibrated_with(**levers):
    return make_pipe().calibrate(images(4, seed=1), mask_timesteps=(300, 302), methods=(),
                                 generator=torch.Generator().manual_seed(0), **levers)


def mask_stat(pipe, x, seed, **kwargs):
    """``Q`` recomputed from outside the call with the generator the call would use for a one-image list."""
    ts = list(pipe.calibration.config.mask_timesteps)
    q, _ = pipe._noise_error(x, ts, [torch.Generator().manual_seed(seed)], None, np.arange(1), **kwargs)
    return q


def test_calibration_stores_mask_levers_and_mode_defaults():
    ref = calibrated_with(mode="reference")
    assert all(ref.calibration.config[k] == 1 for k in MASK_LEVERS)
    fast = calibrated_with(mode="fast")
    assert all(fast.calibration.config[k] == FAST_SETTINGS[k] for k in MASK_LEVERS)
    pipe = calibrated_with(mask_filter_size=5, mask_noise_draws=2, mask_dilation=3)
    assert [pipe.calibration.config[k] for k in MASK_LEVERS] == [5, 2, 3]
    # a calibration saved before the mask levers existed loads with the thesis values
    old = AnomalyCalibration.from_config({"resolution": 32, "percentile": 0.8, "mask_timesteps": [300, 301]})
    assert [old.config[k] for k in MASK_LEVERS] == [1, 1, 1]


def test_mask_levers_survive_save_and_load(tmp_path):
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    pipe = calibrated_with(mask_filter_size=3, mask_noise_draws=2, mask_dilation=5)
    pipe.save_pretrained(tmp_path / "p")
    loaded = SelfAwareInpaintPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert [loaded.calibration.config[k] for k in MASK_LEVERS] == [3, 2, 5]
    x = images(1, seed=8)
    quick = dict(inpaint_timesteps=4, num_mask_timesteps=3, num_inpaint_steps=2)
    a = pipe(x, generator=[torch.Generator().manual_seed(3)], **quick)
    b = loaded(x, generator=[torch.Generator().manual_seed(3)], **quick)
    assert np.array_equal(a.masks, b.masks)  # the same masks from the stored levers and Q_p
    np.testing.assert_allclose(a.anomaly_maps, b.anomaly_maps, atol=1e-5)  # bf16-free CPU maths, float rounding


def test_mask_filter_is_applied_to_q_at_calibration_and_test_time():
    pipe = calibrated_with(mask_filter_size=5, mask_noise_draws=1)
    x_cal = images(4, seed=1)
    gens = pipe._generators(torch.Generator().manual_seed(0), 4)  # the calibration's per-image generators
    ts = list(pipe.calibration.config.mask_timesteps)
    raw = torch.stack([pipe._noise_error(x_cal[i:i + 1], ts, [gens[i]], None, np.arange(1))[0][0] for i in range(4)])
    filtered = _mean_filter(raw.unsqueeze(1), 5)[:, 0]
    torch.testing.assert_close(pipe.calibration.q_threshold, torch.quantile(filtered, 0.8, dim=0))
    x = images(1, seed=9)
    out = pipe(x, num_mask_timesteps=3, inpaint_timesteps=4, num_inpaint_steps=2,
               generator=[torch.Generator().manual_seed(11)])
    q = mask_stat(pipe, x, 11, filter_size=5)
    assert np.array_equal(out.masks, (q > pipe.calibration.q_threshold).numpy())
    # the filtered mask is spatially coherent: fewer on/off changes between neighbours than the raw one
    raw_mask = (mask_stat(pipe, x, 11) > torch.quantile(raw, 0.8, dim=0)).float()
    changes = lambda m: float((m[:, 1:] != m[:, :-1]).sum() + (m[1:] != m[:-1]).sum())  # noqa: E731
    assert changes(torch.from_numpy(out.masks[0]).float()) < changes(raw_mask[0])


def test_mask_noise_draws_average_independent_draws_and_cost_passes():
    pipe = calibrated_with(mask_noise_draws=3)
    x = images(1, seed=10)
    ts = list(pipe.calibration.config.mask_timesteps)
    g = torch.Generator().manual_seed(5)
    singles = [pipe._noise_error(x, ts, [g], None, np.arange(1))[0] for _ in range(3)]  # draws one after another
    q3 = mask_stat(pipe, x, 5, noise_draws=3)
    torch.testing.assert_close(q3, sum(singles) / 3)
    assert not torch.equal(singles[0], singles[1])
    counter = CallCounter(pipe.unet)
    out = pipe(x, inpaint_timesteps=4, num_mask_timesteps=2, num_inpaint_steps=2, resample_steps=2,
               skip_empty_masks=False, generator=[torch.Generator().manual_seed(5)])
    counter.close()
    assert out.num_unet_passes == counter.calls == 2 * 3 + 2 * 2
    ts2 = [ts[0], ts[-1]]
    q = pipe._noise_error(x, ts2, [torch.Generator().manual_seed(5)], None, np.arange(1), noise_draws=3)[0]
    assert np.array_equal(out.masks, (q > pipe.calibration.q_threshold).numpy())


def test_mask_dilation_is_a_max_pool_of_the_mask(pipe):
    x = images(2, seed=12)
    common = dict(inpaint_timesteps=4, num_mask_timesteps=2, num_inpaint_steps=2)
    plain = pipe(x, mask_dilation=1, generator=torch.Generator().manual_seed(2), **common)
    dilated = pipe(x, mask_dilation=3, generator=torch.Generator().manual_seed(2), **common)
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(plain.masks).float().unsqueeze(1), 3, stride=1,
                                              padding=1)[:, 0].bool().numpy()
    assert plain.masks.any() and np.array_equal(dilated.masks, expected)
    assert dilated.masks.sum() > plain.masks.sum()
    recs = dilated.reconstructions
    assert np.array_equal(recs[~dilated.masks], (x.permute(0, 2, 3, 1).numpy() / 2 + 0.5)[~dilated.masks])


def test_reference_calibration_keeps_the_thesis_masks():
    """With thesis mask levers, the explicit levers reproduce the default path bit for bit."""
    pipe = calibrated_with(mode="reference")
    x = images(1, seed=13)
    a = pipe(x, mode="reference", inpaint_timesteps=3, generator=torch.Generator().manual_seed(4))
    b = pipe(x, mode="reference", inpaint_timesteps=3, mask_filter_size=1, mask_noise_draws=1, mask_dilation=1,
             generator=torch.Generator().manual_seed(4))
    for field in ("anomaly_maps", "masks", "reconstructions", "unet_passes_per_image"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    assert a.num_unet_passes == 3 + 3 * 5


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_filter_size=4), "mask_filter_size"),
    (dict(mask_filter_size=0), "mask_filter_size"),
    (dict(mask_filter_size=2.0), "mask_filter_size"),
    (dict(mask_filter_size=65), "mask_filter_size"),
    (dict(mask_dilation=2), "mask_dilation"),
    (dict(mask_dilation=True), "mask_dilation"),
    (dict(mask_noise_draws=0), "mask_noise_draws"),
    (dict(mask_noise_draws=1.5), "mask_noise_draws"),
    (dict(mode="turbo"), "mode"),
])
def test_mask_lever_validation_in_calibrate(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_pipe().calibrate(images(2), mask_timesteps=(300, 301), methods=(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_filter_size=4), "mask_filter_size"),
    (dict(mask_dilation=0), "mask_dilation"),
    (dict(mask_noise_draws=-1), "mask_noise_draws"),
    (dict(mask_filter_size=3), "recalibrate"),  # Q_p was fitted for the calibration's value
    (dict(mask_noise_draws=2), "recalibrate"),
])
def test_mask_lever_validation_in_call(kwargs, match):
    pipe = calibrated_with(mask_filter_size=1, mask_noise_draws=1)
    with pytest.raises(ValueError, match=match):
        pipe(images(1), **kwargs)
