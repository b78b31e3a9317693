"""The two steps of ``make bench-peer`` that run under diffad's own venv (``.venv/bin/python``).

``bench_peer.py`` runs anomalib's DRAEM in ``.venv-peer``, where diffad is not installed. So that the peer is
trained and scored exactly like diffad, it calls this script (with diffad's interpreter) for:

* ``split``: ``diffad.data.load_mvtec(root, category, validation_fraction=0.2, seed=seed)`` and writes the file
  lists of its ``train``, ``validation`` and ``test`` splits to ``<out>/<category>/seed<k>/split.json`` (skipped
  when present). The peer trains on ``train`` only (the validation 20% is held out, as for diffad) and is tested
  on the whole ``test`` split.
* ``metrics``: reads the peer's ``predictions.npz`` of one cell (file names, image scores per scoring rule,
  anomaly maps), takes the labels and masks from ``load_mvtec(..., resolution=<maps' size>)`` (the ground truth
  diffad's bench uses) and computes ``diffad.metrics.compute_anomaly_metrics`` per rule: image AUROC, image
  F1-max, pixel AUROC and AUPRO (30% FPR, Bergmann et al.). Writes ``<cell>/scores.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def write_splits(root: Path, category: str, seeds: list[int], out: Path, validation_fraction: float) -> None:
    from diffad.data import load_mvtec

    for seed in seeds:
        path = out / category / f"seed{seed}" / "split.json"
        if path.exists():
            continue
        data = load_mvtec(root, category, validation_fraction=validation_fraction, seed=seed)
        split = {
            "category": category,
            "root": str(Path(root).resolve()),
            "seed": seed,
            "validation_fraction": validation_fraction,
            "rule": f"diffad.data.load_mvtec(root, {category!r}, validation_fraction={validation_fraction}, seed={seed})",
            "train": list(data["train"]["file_name"]),
            "validation": list(data["validation"]["file_name"]),
            "test": [{"file_name": f, "label": int(lab), "defect_type": d}
                     for f, lab, d in zip(data["test"]["file_name"], data["test"]["label"], data["test"]["defect_type"])],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(split, indent=1))
        os.replace(tmp, path)
        print(f"wrote {path}: {len(split['train'])} train, {len(split['validation'])} validation, "
              f"{len(split['test'])} test")


def score_cell(cell: Path, root: Path, category: str) -> None:
    import numpy as np
    from diffad.data import load_mvtec
    from diffad.metrics import compute_anomaly_metrics

    pred = np.load(cell / "predictions.npz", allow_pickle=False)
    names = [str(n) for n in pred["file_names"]]
    maps = pred["anomaly_maps"].astype(np.float32)
    resolution = maps.shape[-1]
    test = load_mvtec(root, category, resolution=resolution)["test"]
    row = {name: i for i, name in enumerate(test["file_name"])}
    missing = [n for n in names if n not in row]
    if missing:
        raise SystemExit(f"{cell}: predictions for files not in the test split: {missing[:3]}")
    idx = [row[n] for n in names]
    labels = np.asarray([test[i]["label"] for i in idx])
    masks = np.stack([np.asarray(test[i]["mask"], dtype=np.uint8) > 0 for i in idx]).astype(np.uint8)
    rules = [k[len("score_"):] for k in pred.files if k.startswith("score_")]
    result = {"n_images": len(names), "n_defect": int(labels.sum()), "resolution": resolution, "rules": {}}
    pixel = None
    for rule in rules:
        if pixel is None:  # the map is the same for every rule: pixel metrics once
            m = compute_anomaly_metrics(pred[f"score_{rule}"], labels, maps, masks)
            pixel = {"pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"]}
        else:
            m = compute_anomaly_metrics(pred[f"score_{rule}"], labels)
        result["rules"][rule] = {"image_auroc": m["image_auroc"], "image_f1_max": m["image_f1_max"], **pixel}
    tmp = cell / "scores.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, cell / "scores.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("--root", type=Path, required=True)
    s.add_argument("--category", required=True)
    s.add_argument("--seeds", required=True, help="comma-separated")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--validation_fraction", type=float, default=0.2)
    m = sub.add_parser("metrics")
    m.add_argument("--cell", type=Path, required=True)
    m.add_argument("--root", type=Path, required=True)
    m.add_argument("--category", required=True)
    args = p.parse_args()
    if args.cmd == "split":
        write_splits(args.root, args.category, [int(s) for s in args.seeds.split(",")], args.out,
                     args.validation_fraction)
    else:
        score_cell(args.cell, args.root, args.category)


if __name__ == "__main__":
    main()
