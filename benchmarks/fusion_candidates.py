"""Issue 12 candidates measured on VALIDATION data with synthetic defects (never the test split): for one
trained model and a few sampling configs, every map the pipeline returns, plus two post-hoc candidates:

* ``fused``: the mean of the maps, each divided by its calibrated image threshold (1 = a normal image's score at
  the target false-positive rate);
* ``<map>_pixnorm``: the map divided by its per-pixel 0.95 quantile over the calibration images' own maps
  (normalises away where normal parts always differ from their reconstruction, e.g. edges).

Half of the validation split calibrates; the other half is scored as is and with a DRAEM-style synthetic defect
(``benchmarks/pipeline_quality.py``'s split). Reports image AUROC, pixel AUROC and AUPRO per candidate and seed.

Example::

    OMP_NUM_THREADS=1 python benchmarks/fusion_candidates.py --model bench_output/quality/bottle/seed0/models/bottle \
        --data_dir ../shared/data/mvtec_subset --category bottle --seeds 0,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_quality import validation_set  # noqa: E402

from diffad.data import load_mvtec  # noqa: E402
from diffad.metrics import compute_anomaly_metrics  # noqa: E402
from diffad.pipelines.self_aware_inpaint import (  # noqa: E402
    SamplingConfig,
    SelfAwareInpaintPipeline,
    per_pixel_quantile,
)

FAST = SamplingConfig.fast()
CONFIGS = {
    "fast (23)": ("self_aware", FAST),
    "fast10 (3 + 7x1)": ("self_aware", dataclasses.replace(FAST, inpaint_steps=7, resample_steps=1)),
    "denoise10": ("denoise", FAST),
    # the mask stage's noise error alone (one 1-step inpainting pass left, the minimum a config runs)
    "Q t150 x3 (+1)": ("self_aware", dataclasses.replace(FAST, mask_timesteps=(150,), inpaint_steps=1,
                                                          resample_steps=1)),
    "Q t300 x3 (+1)": ("self_aware", dataclasses.replace(FAST, inpaint_steps=1, resample_steps=1)),
    "Q t450 x3 (+1)": ("self_aware", dataclasses.replace(FAST, mask_timesteps=(450,), inpaint_steps=1,
                                                          resample_steps=1)),
    "Q t200,400 x4 (+1)": ("self_aware", dataclasses.replace(FAST, mask_timesteps=(200, 400), mask_noise_draws=4,
                                                              inpaint_steps=1, resample_steps=1)),
}


def run(pipe, images, method, seed):
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(len(images))]
    out = pipe(images, method=method, generator=gens, batch_size=16, output_type="pt")
    return {k: v.numpy() for k, v in out.anomaly_maps.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--textures", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "textures"))
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = SelfAwareInpaintPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    data = load_mvtec(a.data_dir, a.category, resolution=pipe.resolution)
    results = {}
    for seed in [int(s) for s in a.seeds.split(",")]:
        calib, images, gt, labels = validation_set(data, pipe.resolution, a.textures, seed)
        for name, (method, config) in CONFIGS.items():
            pipe.calibrate(calib, config=config, generator=torch.Generator().manual_seed(seed))
            maps = run(pipe, images, method, seed)
            calib_maps = run(pipe, calib, method, seed + 77)
            cands = dict(maps)
            thr = {k: pipe.calibration.threshold(f"{method}/{k}") for k in maps}
            cands["fused"] = np.mean([maps[k] / thr[k] for k in maps], axis=0)
            if "noise_error" in maps:
                cands["fused_ms_ne"] = (maps["multiscale"] / thr["multiscale"] + maps["noise_error"]
                                        / thr["noise_error"]) / 2
            for k in list(maps):
                q = per_pixel_quantile(torch.from_numpy(calib_maps[k]), 0.95).numpy()
                cands[f"{k}_pixnorm"] = maps[k] / np.maximum(q, 1e-6)
            for cand, m in cands.items():
                metrics = compute_anomaly_metrics(m.reshape(len(m), -1).max(1).astype(np.float64), labels, m, gt)
                results.setdefault(f"{name} {cand}", []).append(
                    {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")})
            print(f"seed {seed} {name}: done", flush=True)
    lines = [f"{a.category}: validation with synthetic defects, mean over seeds {a.seeds}",
             "| candidate | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for cand, runs in results.items():
        lines.append(f"| {cand} | " + " | ".join(f"{np.mean([r[k] for r in runs]):.3f}"
                                                  for k in ("image_auroc", "pixel_auroc", "aupro")) + " |")
    print("\n".join(lines))
    if a.output:
        Path(a.output).write_text(json.dumps({"category": a.category, "model": a.model, "results": results,
                                              "table": "\n".join(lines)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
