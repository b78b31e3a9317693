"""The fast path (issue 8): exact UNet pass counting from outside, reference equivalence, lever validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffad.pipelines.self_aware_inpaint import FAST_SETTINGS, REFERENCE_SETTINGS

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


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return make_pipe().calibrate(images(4, seed=1), mask_timesteps=(300, 305), methods=("self_aware",),
                                 generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def thesis_pipe():
    """Calibrated on the thesis's 51 mask timesteps (300..350)."""
    torch.set_num_threads(1)
    return make_pipe().calibrate(images(3, seed=1), methods=("self_aware",), generator=torch.Generator().manual_seed(0))


def reference_levers(inpaint_timesteps: int) -> dict:
    """The fast mode's levers set to the reference values, explicitly."""
    levers = dict(REFERENCE_SETTINGS)
    levers["num_mask_timesteps"] = 6
    levers["num_inpaint_steps"] = inpaint_timesteps
    levers["denoise_steps"] = inpaint_timesteps
    return levers


def test_default_fast_path_passes_counted_from_outside(thesis_pipe):
    counter = CallCounter(thesis_pipe.unet)
    out = thesis_pipe(images(1, seed=2), generator=torch.Generator().manual_seed(0))
    counter.close()
    assert out.masks.any()  # inpainting ran
    assert out.num_unet_passes == counter.calls == 3 + 10 * 2 == 23 <= 25


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
    expected = levers["num_mask_timesteps"] + levers["num_inpaint_steps"] * levers["resample_steps"]
    nonempty = out.masks.reshape(3, -1).any(1)
    assert np.array_equal(out.unet_passes_per_image, np.where(nonempty, expected, levers["num_mask_timesteps"]))
    assert counter.images == int(out.unet_passes_per_image.sum())
    assert counter.calls == (levers["num_mask_timesteps"] + (levers["num_inpaint_steps"] * levers["resample_steps"]
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
    assert skipped.num_unet_passes == 2 and full.num_unet_passes == 2 + 3 * 2
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
    assert ref.num_unet_passes == (6 + 6 * 5 if method == "self_aware" else 6)


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
    assert FAST_SETTINGS["num_mask_timesteps"] + FAST_SETTINGS["num_inpaint_steps"] * FAST_SETTINGS["resample_steps"] <= 25
    assert REFERENCE_SETTINGS["resample_steps"] == 5 and REFERENCE_SETTINGS["num_mask_timesteps"] is None
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
