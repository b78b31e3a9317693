"""UNet passes counted from outside the pipeline: the presets' costs, exact per-image counts, the mask draws."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from diffad.pipelines.self_aware_inpaint import NoiseSchedule, SamplingConfig, noise_error
from test_pipeline import gens, images
from tiny_components import tiny_pipeline, tiny_unet


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


def counted(pipe, x, **kwargs):
    counter = CallCounter(pipe.unet)
    try:
        out = pipe(x, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        counter.close()
    return out, counter


def test_presets_cost_what_they_say_counted_from_outside():
    """fast: 1 timestep x 3 draws + 7 denoising steps = 10 passes (issue 12's limit); thesis: 51 + 50 x 5 = 301;
    denoise 10 / 50."""
    for name, expected_self_aware, expected_denoise in (("fast", 10, 10), ("thesis", 301, 50)):
        pipe = tiny_pipeline().calibrate(images(4, seed=1), config=name, generator=torch.Generator().manual_seed(0))
        pipe.calibration.q_threshold.fill_(-1.0)  # every pixel masked: inpainting runs for every image
        out, counter = counted(pipe, images(2, seed=2))
        assert counter.images == 2 * expected_self_aware and out.unet_passes.tolist() == [expected_self_aware] * 2
        assert SamplingConfig.from_preset(name).unet_passes("self_aware") == expected_self_aware
        out, counter = counted(pipe, images(2, seed=2), method="denoise")
        assert counter.images == 2 * expected_denoise and out.unet_passes.tolist() == [expected_denoise] * 2


def test_pass_count_is_exact_per_image_in_a_batch():
    """An image whose mask is empty skips inpainting: its count is the mask stage's alone, others pay in full."""
    config = SamplingConfig(mask_timesteps=(300, 310), mask_noise_draws=2, reconstruction_steps=3, resample_steps=2,
                            reconstruction="inpaint")
    pipe = tiny_pipeline().calibrate(images(4, seed=1), config=config, methods=("self_aware",))
    x = torch.cat([images(1, seed=2), torch.zeros(1, 3, 32, 32)])
    pipe.calibration.q_threshold.copy_(torch.full((32, 32), float("inf")))
    pipe.calibration.q_threshold[:, :16] = -1.0  # the left half is masked in every image ...
    x_empty = images(2, seed=3)
    out, counter = counted(pipe, x)
    assert out.unet_passes.tolist() == [4 + 6, 4 + 6] and counter.images == 2 * 10
    pipe.calibration.q_threshold.fill_(float("inf"))  # ... now no pixel is
    out, counter = counted(pipe, x_empty)
    assert out.unet_passes.tolist() == [4, 4] and counter.images == 2 * 4


def test_mask_noise_draws_average_independent_draws():
    """Q over K draws is the mean of K single-draw Q maps, drawn one after the other from each image's generator."""
    unet = tiny_unet().eval()
    acp = DDPMScheduler(num_train_timesteps=1000, beta_schedule="sigmoid").alphas_cumprod
    x = images(2, seed=4)
    with torch.no_grad():
        both = noise_error(unet, NoiseSchedule(acp), x, (300, 320), 2, gens(1, 2))
        g = gens(1, 2)
        first, second = noise_error(unet, NoiseSchedule(acp), x, (300, 320), 1, g), noise_error(unet, NoiseSchedule(acp), x, (300, 320), 1, g)
    torch.testing.assert_close(both, (first + second) / 2)
    assert not torch.allclose(first, second)
