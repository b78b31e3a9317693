"""``make bench-cpu`` (issue 15): fp32 against bf16 on this CPU, in one run, on the same trained model and seeds.

For a trained DDPM (default: ``make bench-quality``'s bottle seed-0 model) it measures

* the UNet forward pass (batch 8, the model's resolution, one thread): fp32, bf16 autocast, and bf16 autocast with
  channels_last; interleaved repetitions, median time and the ratio to fp32 (the machine is shared and noisy);
* the default detector end to end: calibrate on the validation split and evaluate on the test split once per
  precision with the same noise: image and pixel AUROC of the default map, seconds per image, and peak memory
  (the process's maximum resident set, measured after each precision).

Writes ``<out>/bench_cpu.json`` and ``<out>/table.md``. Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu.py --model bench_output/quality/bottle/seed0/models/bottle \
        --data ../shared/data/mvtec_subset --category bottle
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def forward_times(unet, resolution: int, repeats: int, ov_nets: dict) -> dict:
    x = torch.randn(8, 6, resolution, resolution, generator=torch.Generator().manual_seed(0))
    t = torch.full((8,), 300, dtype=torch.long)
    variants = {"fp32": (False, False), "bf16": (True, False), "bf16 + channels_last": (True, True)}
    times: dict = {name: [] for name in list(variants) + list(ov_nets)}
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up and is dropped
            for name, (bf16, channels_last) in variants.items():
                unet.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                inp = x.to(memory_format=torch.channels_last) if channels_last else x
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    unet(inp, t)
                times[name].append(time.perf_counter() - start)
            for name, net in ov_nets.items():
                start = time.perf_counter()
                net(x, t)
                times[name].append(time.perf_counter() - start)
    unet.to(memory_format=torch.contiguous_format)
    base = statistics.median(times["fp32"][1:])
    return {name: {"median_ms": 1000 * statistics.median(v[1:]), "speedup": base / statistics.median(v[1:])}
            for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO_ROOT / "bench_output/quality/bottle/seed0/models/bottle"))
    p.add_argument("--data", default=str(REPO_ROOT.parent / "shared/data/mvtec_subset"))
    p.add_argument("--category", default="bottle")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(REPO_ROOT / "bench_output/cpu"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from diffad.data import load_mvtec
    from diffad.evaluation import evaluate_pipeline
    from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline
    from diffad.precision import cpu_has_bf16
    from diffad.training_utils import image_generator

    pipe = SelfAwareInpaintPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ov_nets = {}
    try:  # OpenVINO rows when the extra is installed: the UNet converted as `diffad export` does
        import openvino as ov

        from diffad.export import OpenVINONetwork, _Traceable

        r = pipe.resolution
        with torch.no_grad():
            ov_model = ov.convert_model(_Traceable(pipe.unet.eval()),
                                        example_input=(torch.zeros(2, 6, r, r), torch.tensor([0, 10])))
        ov_model.reshape({0: [-1, 6, r, r], 1: [-1]})
        ov.save_model(ov_model, str(out / "unet.xml"), compress_to_fp16=False)
        for precision in ("fp32", "bf16"):
            ov_nets[f"OpenVINO {precision}"] = OpenVINONetwork(out / "unet.xml", dict(pipe.unet.config), precision)
    except ImportError:
        print("openvino not installed: no OpenVINO rows (pip install 'diffad[openvino]')")
    result: dict = {"model": a.model, "category": a.category, "cpu_has_bf16": cpu_has_bf16(),
                    "forward": forward_times(pipe.unet, pipe.resolution, a.repeats, ov_nets), "detector": {}}
    data = load_mvtec(a.data, a.category, resolution=pipe.resolution, seed=a.seed)
    val = [row["image"] for row in data["validation"]]
    name = pipe.default_map("self_aware")
    torch_unet = pipe.unet
    runs = [("torch fp32", "fp32", None), ("torch bf16", "bf16", None)]
    runs += [(k, "fp32", net) for k, net in ov_nets.items()]  # OpenVINO: the torch fp32 calibration, carried over
    for label, precision, net in runs:
        pipe.register_modules(unet=torch_unet)
        config = dataclasses.replace(SamplingConfig.fast(), precision=precision)
        pipe.calibrate(val, config=config, generator=[image_generator(a.seed, im) for im in val], batch_size=16)
        if net is not None:
            pipe.register_modules(unet=net)
        ev = evaluate_pipeline(pipe, data["test"], methods=("self_aware",), batch_size=16, seed=a.seed,
                               progress=False, num_figure_rows=0)
        m = ev.metrics[f"self_aware/{name}"]
        result["detector"][label] = {"image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"],
                                     "aupro": m["aupro"], "seconds_per_image": m["seconds_per_image"],
                                     "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    lines = [f"UNet forward, batch 8, {pipe.resolution} px, one thread (median of {a.repeats}, interleaved):", "",
             "| variant | ms | speed-up |", "|---|---|---|"]
    lines += [f"| {k} | {v['median_ms']:.1f} | {v['speedup']:.2f}x |" for k, v in result["forward"].items()]
    lines += ["", f"Default detector ({name}) on the {a.category} test split, same model and noise:", "",
              "| backend | image AUROC | pixel AUROC | AUPRO | s / image | peak RSS MiB (process so far) |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['image_auroc']:.4f} | {v['pixel_auroc']:.4f} | {v['aupro']:.4f} | "
              f"{v['seconds_per_image']:.3f} | {v['peak_rss_mib']:.0f} |" for k, v in result["detector"].items()]
    table = "\n".join(lines) + "\n"
    (out / "bench_cpu.json").write_text(json.dumps(result, indent=2))
    (out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
