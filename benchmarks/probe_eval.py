"""Issue 20 levers, step 2: map, score and head variants computed offline from :mod:`probe_dump`'s files (the same
noise for every variant), on validation (synthetic defects) and on the test split side by side.

    OMP_NUM_THREADS=1 python benchmarks/probe_eval.py --probe bench_output/probe --variants default,msn
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffad.metrics import compute_anomaly_metrics
from diffad.pipelines.self_aware_inpaint.pipeline import (
    default_mean_filter_size, mean_filter, multiscale_anomaly_map, per_pixel_quantile,
)

FILTER = default_mean_filter_size(64)


def f32(d, key):
    return d[key].float()


def base_maps(d, q_p, size=FILTER):
    """The default's two maps of one split, smoothed by a ``size`` mean filter."""
    ne = mean_filter(f32(d, "q") / q_p.clamp_min(1e-12), size)
    ms = multiscale_anomaly_map(f32(d, "x"), f32(d, "rec"), mean_filter_size=size)
    return {"noise_error": ne, "multiscale": ms}


def quantile_of_max(maps, p=0.95):
    return float(np.quantile(maps.flatten(1).amax(dim=1).numpy(), p, method="weibull"))


def variants(data, names, heads=None):
    """name -> (calib maps, val maps, test maps) of every variant."""
    q_p = data["q_p"].float()
    b = {s: base_maps(data[s], q_p) for s in ("calib", "val", "test")}
    out = {}
    thr = {n: quantile_of_max(b["calib"][n]) for n in ("noise_error", "multiscale")}
    for name in names:
        if name in ("noise_error", "multiscale"):
            out[name] = {s: b[s][name] for s in b}
        elif name == "default":
            out[name] = {s: (b[s]["noise_error"] / thr["noise_error"] + b[s]["multiscale"] / thr["multiscale"]) / 2
                         for s in b}
        elif name.startswith("msn"):
            # multiscale error divided by its per-pixel quantile over the calibration images (smoothed)
            p = 0.8
            ref = mean_filter(per_pixel_quantile(b["calib"]["multiscale"], p)[None], 2 * FILTER + 1)[0]
            ref = ref.clamp_min(0.5 * float(ref.mean()))
            msn = {s: b[s]["multiscale"] / ref for s in b}
            if name == "msn":
                out[name] = msn
            else:  # msn+ne
                t2 = quantile_of_max(msn["calib"])
                out[name] = {s: (b[s]["noise_error"] / thr["noise_error"] + msn[s] / t2) / 2 for s in b}
        elif name.startswith("head") and heads is not None:
            base = name.split("+")[0]
            if name == base:
                out[name] = heads[base]
            else:  # head+default: the head's map and the default's, each over its calibrated threshold
                dflt = {s: (b[s]["noise_error"] / thr["noise_error"] + b[s]["multiscale"] / thr["multiscale"]) / 2
                        for s in b}
                th, td = quantile_of_max(heads[base]["calib"]), quantile_of_max(dflt["calib"])
                out[name] = {s: (heads[base][s] / th + dflt[s] / td) / 2 for s in b}
    return out


#: The heads compared: the shipped 7-channel head and DRAEM's 6-channel one (image + reconstruction). A head on the
#: image and ``log(Q / Q_p)`` alone was measured and lost (README): no segmenter of the library has that shape.
HEAD_INPUTS = {"head": 7, "head_xr": 6}


def _batch(d, q_p):
    """A split as :func:`train_segmenter.training_crops` reads it."""
    return {"image": f32(d, "x"), "reconstruction": f32(d, "rec"),
            "noise_ratio": (f32(d, "q") / q_p.clamp_min(1e-12))[:, None],
            **({"mask": d["mask"].float()[:, None]} if "mask" in d else {})}


def train_head(data, in_channels, steps, seed=0, crop=64, batch=16):
    """The library's segmenter (:func:`diffad.presets.make_segmenter`) trained as ``train_segmenter`` does: its
    crops (:func:`train_segmenter.training_crops`), its loss, Adam 1e-3, on the synthetic-defect training images."""
    from diffad.pipelines.self_aware_inpaint import segmenter_logits
    from diffad.presets import make_segmenter
    from diffad.training.train_segmenter import segmentation_loss, training_crops

    torch.manual_seed(seed)
    train = _batch(data["train"], data["q_p"].float())
    net = make_segmenter(crop, in_channels=in_channels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g, order = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    for _ in range(steps):
        idx = torch.from_numpy(order.integers(0, train["image"].shape[0], batch))
        x, rec, ratio, y = training_crops({k: v[idx] for k, v in train.items()}, crop, g)
        logits = segmenter_logits(net, x, rec, ratio[:, 0] if in_channels == 7 else None)
        loss = segmentation_loss(logits, y, gamma=2.0, alpha=None, bce_weight=1.0)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


@torch.no_grad()
def head_maps(net, d, q_p, in_channels, crop=64):
    from diffad.pipelines.self_aware_inpaint import segmenter_logits
    from diffad.pipelines.self_aware_inpaint.pipeline import merge_tiles, split_tiles

    b = _batch(d, q_p)
    out = []
    for i in range(0, b["image"].shape[0], 8):
        x, rec = (split_tiles(b[k][i:i + 8], crop) for k in ("image", "reconstruction"))
        ratio = split_tiles(b["noise_ratio"][i:i + 8], crop)[:, 0] if in_channels == 7 else None
        out.append(merge_tiles(torch.sigmoid(segmenter_logits(net, x, rec, ratio)), b["image"].shape[-1])[:, 0])
    return mean_filter(torch.cat(out), FILTER)


def heads_for(data, names, steps):
    q_p = data["q_p"].float()
    heads = {}
    for name in names:
        base = name.split("+")[0]
        if base not in HEAD_INPUTS or base in heads:
            continue
        t0 = time.time()
        net = train_head(data, HEAD_INPUTS[base], steps)
        heads[base] = {s: head_maps(net, data[s], q_p, HEAD_INPUTS[base]) for s in ("calib", "val", "test")}
        print(f"  trained {base} ({steps} steps) in {time.time() - t0:.0f} s", flush=True)
    return heads


def metrics(maps, d):
    scores = maps.flatten(1).amax(dim=1).numpy()
    return compute_anomaly_metrics(scores, d["label"].numpy(), maps.numpy(), d["mask"].numpy())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", default="bench_output/probe")
    parser.add_argument("--categories", default="bottle,tire,metal_plate,transistor,toothbrush")
    parser.add_argument("--variants", default="default,noise_error,multiscale,msn,msn+ne")
    parser.add_argument("--out", default=None)
    parser.add_argument("--head_steps", type=int, default=600)
    args = parser.parse_args()
    rows = {}
    for category in args.categories.split(","):
        path = Path(args.probe) / f"{category}.pt"
        if not path.is_file():
            continue
        data = torch.load(path, weights_only=False)
        names = args.variants.split(",")
        heads = heads_for(data, names, args.head_steps)
        for name, m in variants(data, names, heads).items():
            v, t = metrics(m["val"], data["val"]), metrics(m["test"], data["test"])
            rows.setdefault(name, {})[category] = {"val": v, "test": t}
            print(f"{category:12s} {name:14s} val {v['image_auroc']:.3f}/{v['pixel_auroc']:.3f}/{v['aupro']:.3f}  "
                  f"test {t['image_auroc']:.3f}/{t['pixel_auroc']:.3f}/{t['aupro']:.3f}", flush=True)
    for name, per in rows.items():
        for split in ("val", "test"):
            mean = {k: np.mean([per[c][split][k] for c in per]) for k in ("image_auroc", "pixel_auroc", "aupro")}
            print(f"MEAN {name:14s} {split:4s} {mean['image_auroc']:.3f}/{mean['pixel_auroc']:.3f}/"
                  f"{mean['aupro']:.3f} over {len(per)}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    main()
