#!/usr/bin/env python
"""Training-speed benchmark: images/s of the ``small`` preset at 64 px on this machine, and where
its loss stands after a fixed time budget (``make bench-train``; not a test).

It runs ``training/train_ddpm.py`` itself (the same code path as a user) on the real MVTec AD
bottle images (``../shared/data/mvtec_subset``, or ``$DIFFAD_REAL_DATA/mvtec_subset``; the
synthetic dataset when they are absent) with ``--max_train_minutes``, then prints the figures
from its ``training_log.json``. Throughput counts training time only (validation excluded).

    python benchmarks/bench_train.py --minutes 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = Path(os.environ.get("DIFFAD_REAL_DATA", REPO_ROOT.parent / "shared" / "data")) / "mvtec_subset"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=5.0, help="Training-time budget.")
    p.add_argument("--preset", default="small", help="UNet preset (thesis, small, tiny).")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--data_dir", default=None, help="MVTec-layout root (default: the real subset, else synthetic).")
    p.add_argument("--category", default="bottle")
    p.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's choice).")
    p.add_argument("--output_dir", default=None, help="Keep the run here (default: a temporary folder).")
    p.add_argument("--json", action="store_true", help="Print the figures as one JSON line as well.")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import torch

    from diffad.workflow import train_ddpm_to_budget

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    data_dir, category = args.data_dir, args.category
    if data_dir is None:
        if (REAL_DATA / category).is_dir():
            data_dir = str(REAL_DATA)
        else:
            print(f"real data not found at {REAL_DATA}: using the synthetic dataset", file=sys.stderr)
            category = None
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or os.path.join(tmp, "run")
        data = {"data_dir": data_dir, "category": category} if data_dir is not None else {}
        start, cpu_start = time.time(), time.process_time()
        train_ddpm_to_budget(out, minutes=args.minutes, resume=False, checkpointing_steps=1_000_000,
                             preset=args.preset, resolution=args.resolution, train_batch_size=args.train_batch_size,
                             num_epochs=100_000, overwrite_output_dir=True, **data)
        wall, cpu = time.time() - start, time.process_time() - cpu_start
        log = json.loads((Path(out) / "training_log.json").read_text())
    s, c = log["summary"], log["config"]
    losses = s["step_losses"]
    last_epoch = log["epochs"][-1]
    figures = {
        "preset": args.preset, "resolution": args.resolution, "batch": args.train_batch_size,
        "num_parameters": s["num_parameters"], "torch_threads": torch.get_num_threads(),
        "data": f"{c['resolved_data_dir']}/{c['category']}", "num_train_images": c["num_train_images"],
        "train_minutes": s["train_seconds"] / 60, "wall_minutes": wall / 60,
        "optimizer_steps": s["total_optimizer_steps"], "epochs": len(log["epochs"]),
        "images_per_second": s["images_per_second"],
        # On a shared machine wall-clock speed depends on the neighbours; CPU time less so
        # (it includes data loading and validation, so this is a lower bound).
        "images_per_cpu_second": sum(e["images"] for e in log["epochs"]) / max(cpu, 1e-9),
        "train_loss_first_20_steps": sum(losses[:20]) / max(len(losses[:20]), 1),
        "train_loss_last_20_steps": sum(losses[-20:]) / max(len(losses[-20:]), 1),
        "val_loss_first_epoch": log["epochs"][0]["val_loss"], "val_loss_last_epoch": last_epoch["val_loss"],
        "best_val_loss": s["best_val_loss"],
    }
    width = max(len(k) for k in figures)
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main(parse_args())
