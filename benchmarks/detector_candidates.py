"""Issue 12: default-detector candidates at <= 10 UNet passes, measured on VALIDATION data with synthetic defects
(never the test split), on one trained model per category.

Half of the validation split calibrates (:func:`harness.validation_set`); the other half is scored as is and with a
synthetic defect. Two defect sets: ``draem`` (the segmenter's own generator: DTD textures, opacity U[0.1, 1], any
size) and ``subtle``
(opacity U[0.1, 0.4], small Perlin blobs: closer to real defects that are barely visible at 64 px; the
``draem`` set saturates image AUROC and did not predict a real category's test split).

Candidates (UNet passes per image):

* ``denoise10`` (10): the basic baseline, multiscale map;
* ``ne150`` (3): the self-aware mask statistic alone, ``Q / Q_p`` at t = 150 x 3 noise draws;
* ``ne150+denoise7`` (10): ``Q / Q_p`` and the 7-step denoising error, each divided by its calibrated image
  threshold and averaged (``fused``), or multiplied (``product``);
* ``redraw`` (10): ``Q / Q_p`` (3 passes) smoothed and thresholded for ~5% of normal pixels marks blobs; 7 strided
  steps from t = 200 redraw them from the noised original while the known region is pasted at matching noise
  down to t = 50 and then denoised with the rest: a masked defect is redrawn, the rest denoised as ``denoise``.
* today's ``fast`` preset makes the same 10 passes as ``ne150+denoise7`` (``Q / Q_p`` at t = 150 x 3 and a 7-step
  denoising; its ``combined`` map averages the two as ``fused`` does).

Example::

    OMP_NUM_THREADS=1 python benchmarks/detector_candidates.py --model bench_output/quality/bottle/seed0/models/bottle \
        --data_dir ../shared/data/mvtec_subset --category bottle --defects subtle
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from harness import split_tensors, validation_set

from diffad.anomalies import AnomalySynthesizer
from diffad.data import load_mvtec
from diffad.metrics import compute_anomaly_metrics
from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
from diffad.pipelines.self_aware_inpaint.pipeline import (
    NoiseSchedule, denoise, mean_filter, multiscale_anomaly_map, noise_error, per_pixel_quantile, predict_noise,
    randn_tensor,
)

DEFECTS = {"draem": {}, "subtle": {"beta_range": (0.1, 0.4), "min_scale_exponent": 3}}


def synthetic_defects(textures, defects):
    """A synthetic defect for :func:`harness.validation_set`: an :class:`AnomalySynthesizer` that always draws a defect
    (``DEFECTS[defects]``: DRAEM's, or subtle ones)."""
    synth = AnomalySynthesizer(textures, normal_probability=0.0, **DEFECTS[defects])
    return lambda img, g: synth(img, generator=g)


def gens(n, seed):
    return [torch.Generator().manual_seed(seed * 1000 + i) for i in range(n)]


def redraw(unet, acp, x, mask, start, steps, paste_until, generators):
    """Masked pixels redrawn from the noised original at ``start``; known pixels pasted at matching noise while
    ``t >= paste_until``, then everything denoised."""
    schedule = NoiseSchedule(acp)
    ts = schedule.timesteps(start, steps)
    x_t = schedule.add_noise(x, randn_tensor(x.shape, generator=generators), ts[0][0])
    x0 = None
    for i, (t, t_prev) in enumerate(ts):
        if t >= paste_until and i > 0:
            x_t = mask * x_t + (1 - mask) * schedule.add_noise(x, randn_tensor(x.shape, generator=generators), t)
        x0 = schedule.estimate_x0(x_t, predict_noise(unet, x_t, t, x0), t)
        noise = randn_tensor(x.shape, generator=generators) if t_prev >= 0 else None
        x_t = schedule.step(x_t, x0, t, t_prev, noise)
    return x_t.clamp(-1, 1)


def q_maps(pipe, x, seed, t=150, draws=3):
    return torch.cat([noise_error(pipe.unet, pipe.schedule, x[i:i + 16], (t,), draws,
                                  gens(len(x), seed)[i:i + 16]) for i in range(0, len(x), 16)])


def denoise_maps(pipe, x, seed, steps):
    recs = torch.cat([denoise(pipe.unet, pipe.schedule, x[i:i + 16], start=50, num_steps=steps,
                              generators=gens(len(x), seed + 5)[i:i + 16]) for i in range(0, len(x), 16)])
    return multiscale_anomaly_map(x, recs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--defects", default="subtle", choices=tuple(DEFECTS))
    p.add_argument("--textures", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "textures"))
    p.add_argument("--output", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = SelfAwareInpaintPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    acp = pipe.scheduler.alphas_cumprod
    data = load_mvtec(a.data_dir, a.category, resolution=pipe.resolution)
    results: dict = {}
    with torch.no_grad():
        for seed in [int(s) for s in a.seeds.split(",")]:
            val, _, _ = split_tensors(data["validation"], pipe.resolution, None, seed)
            make_defect = synthetic_defects(a.textures, a.defects)
            calib, images, gt, labels = validation_set(
                val, lambda img, i: make_defect(img, torch.Generator().manual_seed(seed * 10_000 + i)))
            fold = np.arange(len(calib)) % 2
            cands: dict = {}
            # ---- noise error Q/Q_p at t = 150 (cross-fit Q_p for the calibration images' own maps)
            qc, qi = q_maps(pipe, calib, seed + 1), q_maps(pipe, images, seed)
            q_p = per_pixel_quantile(qc, 0.8)
            qc_p = torch.stack([per_pixel_quantile(qc[fold == k], 0.8) for k in (0, 1)])[1 - fold]
            ne_i, ne_c = mean_filter(qi / q_p, 9), mean_filter(qc / qc_p, 9)
            cands["ne150"] = (ne_i, ne_c)
            for steps in (7, 10):
                cands[f"denoise{steps}"] = (denoise_maps(pipe, images, seed, steps), denoise_maps(pipe, calib, seed + 1, steps))
            thr = {k: torch.quantile(v[1].flatten(1).amax(1), 0.95) for k, v in cands.items()}
            d7, n = cands["denoise7"], cands["ne150"]
            cands["ne150+denoise7 fused"] = ((d7[0] / thr["denoise7"] + n[0] / thr["ne150"]) / 2, None)
            cands["ne150+denoise7 product"] = ((d7[0] / thr["denoise7"]) * (n[0] / thr["ne150"]), None)
            # ---- redraw: smoothed Q/Q_p blobs at a global threshold for ~5% of normal pixels
            tau = torch.quantile(ne_c.flatten()[torch.randperm(ne_c.numel(), generator=torch.Generator().manual_seed(0))[:100000]], 0.95)
            for start in (150, 250):
                m_i = (ne_i > tau).float().unsqueeze(1)
                recs = torch.cat([redraw(pipe.unet, acp, images[i:i + 16], m_i[i:i + 16], start, 7, 50,
                                         gens(len(images), seed + 9)[i:i + 16]) for i in range(0, len(images), 16)])
                cands[f"redraw{start}"] = (multiscale_anomaly_map(images, recs), None)
                share_normal = float(m_i[labels == 0].mean())
                gt_t = torch.from_numpy(gt)
                recall = float(m_i[:, 0][gt_t].mean()) if gt_t.any() else float("nan")
                results.setdefault(f"redraw{start} masks", []).append({"normal_share": share_normal, "recall": recall})
            for name, (m, _) in cands.items():
                m = m.numpy()
                metrics = compute_anomaly_metrics(m.reshape(len(m), -1).max(1).astype(np.float64), labels, m, gt)
                results.setdefault(name, []).append({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro")})
    lines = [f"{a.category}: validation with {a.defects} synthetic defects, seeds {a.seeds}",
             "| candidate | image AUROC | pixel AUROC | AUPRO |", "|---|---|---|---|"]
    for cand, runs in results.items():
        keys = list(runs[0])
        lines.append(f"| {cand} | " + " | ".join(f"{k}={np.mean([r[k] for r in runs]):.3f}" for k in keys) + " |")
    print("\n".join(lines))
    if a.output:
        Path(a.output).write_text(json.dumps({"category": a.category, "results": results, "table": "\n".join(lines)},
                                             indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
