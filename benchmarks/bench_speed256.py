"""Seconds per image of the default detector at its working resolution (256 px, 25 tiles), interleaved in one run:
torch fp32, torch bf16 (``--precision auto`` on CPUs with AMX/AVX512-BF16) and OpenVINO bf16 (``diffad export``),
one thread, one image per call, as ``diffad detect`` scores. Reports each backend's median and the ratios.

    OMP_NUM_THREADS=1 python benchmarks/bench_speed256.py --model bench_output/quality/bottle/seed0/models/bottle \\
        --data ../shared/data/mvtec_subset --category bottle --out bench_output/speed256.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from diffad.data import load_mvtec
from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline, image_generator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained (uncalibrated or calibrated) model folder")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench_output/speed256.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    base = SelfAwareInpaintPipeline.from_pretrained(a.model)
    split = load_mvtec(a.data, a.category, resolution=base.resolution)
    calib = [row["image"] for row in split["validation"]][:8]
    photos = [row["image"] for row in split["test"]][: a.images]
    pipes = {}
    work = Path(a.out).with_suffix("")
    for precision in ("fp32", "bf16"):
        pipe = SelfAwareInpaintPipeline(unet=base.unet, scheduler=base.scheduler,
                                        working_resolution=base.config.working_resolution)
        pipe.set_progress_bar_config(disable=True)
        pipe.calibrate(calib, config=dataclasses.replace(SamplingConfig.fast(), precision=precision),
                       generator=[image_generator(0, im) for im in calib])
        pipes[f"torch {precision}"] = pipe
        if precision == "bf16":
            from diffad.cli import main as cli

            pipe.save_pretrained(work / "bf16")
            if not (work / "openvino" / "model_index.json").is_file():
                cli(["export", "--model", str(work / "bf16"), "--format", "openvino", "--precision", "bf16",
                     "--out", str(work / "openvino")])
            ov = SelfAwareInpaintPipeline.from_pretrained(work / "openvino")
            ov.set_progress_bar_config(disable=True)
            pipes["openvino bf16"] = ov
    times = {name: [] for name in pipes}
    for _ in range(a.rounds):  # interleaved: the machine's load hits every backend alike
        for name, pipe in pipes.items():
            for photo in photos:
                t = time.perf_counter()
                pipe(photo, generator=[image_generator(0, photo)], batch_size=1)
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {"resolution": base.resolution, "tile_size": base.tile_size, "tiles": base.num_tiles,
              "unet_passes_per_tile": SamplingConfig.fast().unet_passes("self_aware"),
              "seconds_per_image_median": med,
              "speedup_vs_torch_fp32": {n: med["torch fp32"] / v for n, v in med.items()}}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
