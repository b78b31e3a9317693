"""Issue 20: does validation rank the map filter sizes as the test split does? Offline on :mod:`probe_dump`'s files
and the bench's seed-0 DDPMs: the default map (noise error + multi-scale, each over its calibrated threshold, no
head) at each filter size, scored on the dump's validation (one defect per held-out image, small kinds), on the
same held-out images with defects of every size (``VALIDATION_SCALE_RANGE``, the kinds in turn, reconstructed here
once) and on the test split. Also the synthetic and real mask areas.

    OMP_NUM_THREADS=1 python benchmarks/probe_filter.py --probe bench_output/probe --cells bench_output/quality
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from probe_dump import run
from probe_eval import base_maps, quantile_of_max

from diffad.defects import VALIDATION_SCALE_RANGE, DefectSynthesizer
from diffad.metrics import compute_anomaly_metrics
from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline

KINDS = ("scratch", "crack", "pit", "stain")


def default_map(split, q_p, size, thresholds):
    """The default map without the head: noise error and multi-scale error, each over its ``thresholds`` entry."""
    maps = base_maps(split, q_p, size)
    return (maps["noise_error"] / thresholds["noise_error"] + maps["multiscale"] / thresholds["multiscale"]) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--probe", default="bench_output/probe")
    p.add_argument("--cells", default="bench_output/quality")
    p.add_argument("--categories", default="bottle,tire,metal_plate,transistor,toothbrush")
    p.add_argument("--filters", default="5,9,13,17")
    a = p.parse_args()
    torch.set_num_threads(1)
    config = dataclasses.replace(SamplingConfig.fast(), precision="bf16")
    rows: dict = {}
    for category in a.categories.split(","):
        d = torch.load(Path(a.probe) / f"{category}.pt", weights_only=False)
        pipe = SelfAwareInpaintPipeline.from_pretrained(Path(a.cells) / category / "seed0" / "models" / category)
        q_p, good = d["q_p"].float(), d["val"]["label"] == 0
        held = d["val"]["x"].float()[good]
        synth = DefectSynthesizer(KINDS, scale_range=VALIDATION_SCALE_RANGE)
        pairs = [synth(im, kind=KINDS[i % len(KINDS)], generator=515_151 + i) for i, im in enumerate(held)]
        broad_x = torch.stack([im for im, _ in pairs])
        broad_q, broad_rec = run(pipe, broad_x, config, 0, q_p=q_p, dtype=torch.float32)
        broad = {"x": torch.cat([held, broad_x]), "q": torch.cat([d["val"]["q"].float()[good], broad_q]),
                 "rec": torch.cat([d["val"]["rec"].float()[good], broad_rec]),
                 "label": torch.tensor([0] * len(held) + [1] * len(held)),
                 "mask": torch.cat([torch.zeros(len(held), *held.shape[-2:], dtype=torch.bool),
                                    torch.stack([m[0] > 0.5 for _, m in pairs])])}
        for size in (int(f) for f in a.filters.split(",")):
            thr = {name: quantile_of_max(m) for name, m in base_maps(d["calib"], q_p, size).items()}
            for name, split in (("validation, small", d["val"]), ("validation, every size", broad), ("test", d["test"])):
                m = default_map(split, q_p, size, thr)
                r = compute_anomaly_metrics(m.flatten(1).amax(1).numpy(), np.asarray(split["label"]), m.numpy(),
                                            np.asarray(split["mask"]))
                rows.setdefault((size, name), {})[category] = (r["image_auroc"], r["pixel_auroc"], r["aupro"])
        areas = {"small": d["val"]["mask"][~good].flatten(1).sum(1), "every size": broad["mask"][len(held):].flatten(1).sum(1),
                 "test": d["test"]["mask"][d["test"]["label"] == 1].flatten(1).sum(1)}
        print(category, {k: float(v.float().median()) for k, v in areas.items()}, "median mask px", flush=True)
    for (size, name), per in rows.items():
        mean = np.mean(list(per.values()), axis=0)
        print(f"filter {size:2d}  {name:24s} " + " / ".join(f"{v:.3f}" for v in mean) + f"  ({len(per)} categories)")


if __name__ == "__main__":
    main()
