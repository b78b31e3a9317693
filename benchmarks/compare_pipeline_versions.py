"""Regression check of a pipeline redesign: the same trained DDPM, scored by an earlier revision's
``pipeline.py`` and by today's, over several noise seeds.

The pipeline's files import only torch, diffusers, numpy and each other, so an earlier revision's
(``git show REV:pipelines/self_aware_inpaint/...``, one ``pipeline.py`` before issue 21) loads beside today's as a
package of its own. Both calibrate on
the category's validation split and score its test split with their default (fast) sampler, for
``self_aware`` and ``denoise``; the table gives mean +- std over seeds of image AUROC, pixel AUROC,
AUPRO, UNet passes and the inpainting masks' statistics on the test split.

Example (the model of ``make bench-real``)::

    OMP_NUM_THREADS=1 python benchmarks/compare_pipeline_versions.py --model bench_output/real/models/bottle \
        --data ../shared/data/mvtec_subset --category bottle --old_rev be89412 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_PATH = "pipelines/self_aware_inpaint"


def load_revision(rev: str, name: str, folder: Path):
    """The pipeline module of git revision ``rev``: its package's files written into ``folder`` and imported as the
    package ``name`` (not its ``__init__``, which imports diffad's own modules)."""
    git = lambda *args: subprocess.run(["git", *args], cwd=REPO_ROOT, check=True, capture_output=True,  # noqa: E731
                                       text=True).stdout
    folder.mkdir(parents=True, exist_ok=True)
    for file in git("ls-tree", "--name-only", f"{rev}:{PACKAGE_PATH}").split():
        if file.endswith(".py") and file != "__init__.py":
            (folder / file).write_text(git("show", f"{rev}:{PACKAGE_PATH}/{file}"))
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.pipeline")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained pipeline folder (unet/, scheduler/)")
    p.add_argument("--data", required=True)
    p.add_argument("--category", required=True)
    p.add_argument("--old_rev", default="be89412", help="git revision of the earlier pipeline")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="bench_output/compare_pipeline_versions.json")
    a = p.parse_args(argv)
    from diffusers import DDPMScheduler, UNet2DModel

    from diffad.data import load_mvtec
    from diffad.evaluation import mask_statistics
    from diffad.metrics import compute_anomaly_metrics

    torch.set_num_threads(1)
    versions = {f"old ({a.old_rev})": load_revision(a.old_rev, "old_pipeline", Path(tempfile.mkdtemp()) / "old"),
                "new": importlib.import_module("diffad.pipelines.self_aware_inpaint.pipeline")}
    unet = UNet2DModel.from_pretrained(Path(a.model) / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(Path(a.model) / "scheduler")
    resolution = int(unet.config.sample_size)
    splits = load_mvtec(a.data, a.category, resolution=resolution)
    val = [row["image"] for row in splits["validation"]]
    test = splits["test"]
    labels = np.array(test["label"])
    gt = np.stack([np.asarray(row["mask"].convert("L")) > 127 for row in test])
    images = [row["image"] for row in test]
    seeds = [int(s) for s in a.seeds.split(",")]
    rows: dict = {}
    for version, module in versions.items():
        for seed in seeds:
            pipe = module.SelfAwareInpaintPipeline(unet=unet, scheduler=scheduler)
            pipe.set_progress_bar_config(disable=True)
            pipe.calibrate(val, generator=torch.Generator().manual_seed(seed))
            for method in ("self_aware", "denoise"):
                gens = [torch.Generator().manual_seed(seed * 100_003 + i) for i in range(len(images))]
                out = pipe(images, method=method, generator=gens, batch_size=16)
                if isinstance(out.anomaly_maps, dict):  # the v2 output: every map from one call
                    maps = {k: (out.anomaly_maps[k], out.scores[k]) for k in out.anomaly_maps}
                    masks, passes = out.inpaint_masks, out.unet_passes
                else:
                    maps = {"multiscale": (out.anomaly_maps, out.scores)}
                    masks, passes = out.masks, out.unet_passes_per_image
                for name, (m, s) in maps.items():
                    values = compute_anomaly_metrics(np.asarray(s, np.float64), labels, np.asarray(m), gt)
                    values["unet_passes"] = float(np.mean(passes))
                    if method == "self_aware":
                        m = np.asarray(masks, bool).reshape(len(labels), -1)
                        values.update(mask_statistics(m.sum(1), (m & gt.reshape(len(labels), -1)).sum(1),
                                                      gt.reshape(len(labels), -1).sum(1), labels, m.shape[1]))
                    rows.setdefault(f"{version} {method}/{name}", []).append(values)
                print(f"{version} seed {seed} {method}: done", flush=True)
    keys = ("image_auroc", "pixel_auroc", "aupro", "unet_passes", "mask_normal_share", "mask_defect_recall",
            "mask_precision")
    lines = ["| pipeline, method/map | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    summary = {}
    for name, runs in rows.items():
        summary[name] = {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs])))
                         for k in keys if k in runs[0]}
        cells = [f"{summary[name][k][0]:.3f} ± {summary[name][k][1]:.3f}" if k in summary[name] else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\n{a.category}, {len(seeds)} seeds ({a.seeds}), mean ± std over seeds:\n{table}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"category": a.category, "seeds": seeds, "model": str(a.model),
                                       "summary": summary, "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
