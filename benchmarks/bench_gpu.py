"""Issue 20's GPU check, one prepared script (<= 10 minutes on one GPU): images per second of the default detector
at 256 px (the ``cpu`` preset's 25 tiles x 10 UNet passes, with its learned head) in fp32 and bf16, and of the thesis
preset (274.9M-parameter UNet on the whole 256 px image, ``SamplingConfig.thesis()``, 301 passes) in bf16; and the
seconds per DDPM optimiser step of both presets (batch 16), so a user can size a GPU training run.

Throughput does not depend on the weights: the thesis UNet is freshly initialised (no trained thesis model fits this
repository), the default is a trained bench model. Every timing is on the GPU with ``torch.cuda.synchronize()``
around it, after a warm-up call; images are the given folder's photos (any size; the pipeline resizes them).

    python benchmarks/bench_gpu.py --model M --images DIR --out bench_gpu.json

It also writes each image's default score (fp32 and bf16) so that the same call on a CPU can be compared with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline, image_generator
from diffad.presets import count_parameters, make_scheduler, make_unet


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up, synchronised with the device."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def throughput(pipe: SelfAwareInpaintPipeline, photos: list, batch_sizes: tuple[int, ...], repeats: int,
               deadline: float) -> dict[str, Any]:
    """Images per second of ``pipe``'s default call at each batch size (one call scores ``batch`` photos)."""
    out: dict[str, Any] = {}
    for batch in batch_sizes:
        if time.time() > deadline:
            out[str(batch)] = "skipped: time budget"
            continue
        chunk = (photos * (batch // len(photos) + 1))[:batch]
        gens = [image_generator(0, im) for im in chunk]
        reset_peak()
        seconds = timed(lambda: pipe(chunk, generator=gens, batch_size=batch), repeats)
        out[str(batch)] = {"seconds_per_call": seconds, "images_per_second": batch / seconds,
                           "peak_gpu_memory_gib": peak_gib()}
        print(f"  batch {batch}: {batch / seconds:.2f} images/s ({seconds:.3f} s per call)", flush=True)
    return out


def training_step_seconds(preset: str, crop: int, precision: str, repeats: int = 10) -> dict[str, Any]:
    """Seconds per optimiser step (batch 16, self-conditioned 6-channel input, Adam) of a fresh ``preset`` UNet."""
    unet = make_unet(preset).to(DEVICE).train()
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
    x = torch.randn(16, 6, crop, crop, device=DEVICE)
    t = torch.randint(0, 1000, (16,), device=DEVICE)
    target = torch.randn(16, 3, crop, crop, device=DEVICE)

    def step() -> None:
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.mse_loss(unet(x, t).sample.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()
    seconds = timed(step, repeats)
    return {"preset": preset, "crop": crop, "precision": precision, "parameters": count_parameters(unet),
            "seconds_per_step": seconds, "peak_gpu_memory_gib": peak_gib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained model folder of the cpu preset (with its head)")
    p.add_argument("--images", required=True, help="a folder of photos")
    p.add_argument("--out", default="bench_gpu.json")
    p.add_argument("--budget_seconds", type=float, default=420, help="sections starting after this are skipped")
    p.add_argument("--sections", default="default,thesis,training", help="which timings to run, in this order")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="a CPU check of this script: small batches, the tiny preset")
    a = p.parse_args()
    global DEVICE
    DEVICE = a.device
    thesis_preset, batches, crop = ("tiny", (1, 2), 32) if a.smoke else ("thesis", (1, 16, 64), 256)
    start = time.time()
    deadline = start + a.budget_seconds
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    paths = sorted(Path(a.images).glob("*.png"))
    photos = [Image.open(p).convert("RGB") for p in paths]
    calib, probe = photos[:8], photos[8:]
    assert len(calib) == 8 and probe, f"--images: need more than 8 photos, found {len(photos)}"
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, "torch": torch.__version__,
                              "images": len(photos)}

    sections = a.sections.split(",")
    base = SelfAwareInpaintPipeline.from_pretrained(a.model)
    result["default"] = {"tiles": base.num_tiles, "tile": base.tile_size, "resolution": base.resolution,
                         "unet_passes_per_tile": SamplingConfig.fast().unet_passes("self_aware")}
    save = lambda: Path(a.out).write_text(json.dumps(result, indent=2))  # noqa: E731  (after every section: a
    # run stopped by its time limit keeps what it measured)
    scores: dict[str, list[float]] = {}
    for precision in ("fp32", "bf16") if "default" in sections else ():
        print(f"default {precision}", flush=True)
        pipe = SelfAwareInpaintPipeline(unet=base.unet, scheduler=base.scheduler, segmenter=base.segmenter,
                                        working_resolution=base.config.working_resolution).to(DEVICE)
        pipe.set_progress_bar_config(disable=True)
        config = dataclasses.replace(SamplingConfig.fast(), precision=precision)
        t = time.perf_counter()
        pipe.calibrate(calib, config=config, generator=[image_generator(0, im) for im in calib], batch_size=8)
        result["default"][f"{precision}_calibration_seconds"] = time.perf_counter() - t
        result["default"][precision] = throughput(pipe, probe, batches, 3, deadline)
        out = pipe(probe, generator=[image_generator(0, im) for im in probe], batch_size=16)
        scores[precision] = [float(s) for s in out.scores["combined"]]
        result["default"][f"{precision}_decisions"] = [bool(v) for v in out.is_anomalous["combined"]]
        save()
    if scores:
        result["default"]["scores"] = scores
        result["default"]["bf16_vs_fp32_max_score_difference"] = float(
            np.max(np.abs(np.array(scores["bf16"]) - np.array(scores["fp32"]))))

    if "thesis" in sections and time.time() < deadline:
        print("thesis bf16", flush=True)
        unet = make_unet(thesis_preset)
        thesis = SelfAwareInpaintPipeline(unet=unet, scheduler=make_scheduler(), working_resolution=256).to(DEVICE)
        thesis.set_progress_bar_config(disable=True)
        config = dataclasses.replace(SamplingConfig.fast() if a.smoke else SamplingConfig.thesis(), precision="bf16")
        t = time.perf_counter()
        thesis.calibrate(calib, config=config, methods=("self_aware",),
                         generator=[image_generator(0, im) for im in calib], batch_size=8)
        result["thesis"] = {"parameters": count_parameters(unet), "preset": thesis_preset, "tiles": thesis.num_tiles,
                            "unet_passes": config.unet_passes("self_aware"),
                            "bf16_calibration_seconds_8_images": time.perf_counter() - t}
        save()
        result["thesis"]["bf16"] = throughput(thesis, probe, batches[:2], 1, deadline)
        save()
        del thesis, unet
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    result["training"] = []
    for preset, crop in (("cpu", 64), (thesis_preset, crop)) if "training" in sections else ():
        for precision in ("fp32", "bf16"):
            if time.time() < deadline:
                result["training"].append(training_step_seconds(preset, crop, precision))
                save()
                print(result["training"][-1], flush=True)
    result["wall_seconds"] = time.time() - start
    save()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
