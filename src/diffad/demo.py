"""``diffad demo`` (and ``make demo``): the whole method on the embedded default, in about 10 CPU minutes.

On a fresh machine with no download it:

1. writes the synthetic default dataset (every category of :data:`diffad.synthetic.SYNTHETIC_CATEGORIES`,
   MVTec AD layout) under ``<out>/data``;
2. per category, trains a tiny self-conditioned DDPM (``training/train_ddpm.py``, ``--ddpm-steps`` optimiser
   steps) into ``<out>/models/<category>``;
3. calibrates it on the held-out normal images with the ``fast`` sampling config
   (:func:`diffad.calibration.calibrate_model`);
4. trains the DRAEM-style segmenter for the learned map (``training/train_segmenter.py``,
   ``--segmenter-steps``; it recalibrates the pipeline with the segmenter in place);
5. evaluates ``self_aware`` and ``denoise`` on the test splits, every map of each method from one
   reconstruction (:func:`diffad.evaluation.evaluate_folder`: metrics, Table 4.1, Fig. 4.4 panels);
6. writes a model card (README.md) into each model folder (:mod:`diffad.cards`);
7. writes ``<out>/report.md``: the table, the figures, seconds per image, the time each step took, and
   the commands to run the same on one's own images.

Every step is skipped when its output exists (a re-run only rewrites the cards and the report), and the
training steps resume from their last checkpoint after an interruption. The training budget is in optimiser
steps, never minutes, so two runs on different machines train the same models and give the same table within
seed noise; the other steps (data, calibration, reconstructions for the segmenter, evaluation) are bounded by
the dataset sizes. The report says how long the run took.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from diffad.workflow import (StepLog, evaluation_is_current, has_component, is_trained, train_ddpm_to_budget,
                             train_segmenter_to_budget)

__all__ = ["DemoConfig", "method_seconds", "run_demo", "write_report", "register", "run"]

logger = logging.getLogger(__name__)

# Training budget per category in optimiser steps: about 3.4 + 1.1 minutes on an idle 2-core machine at 32 px
# (what the earlier minute budget reached there), about 10 minutes for the whole demo.
DEFAULT_DDPM_STEPS = 800
DEFAULT_SEGMENTER_STEPS = 130


@dataclass
class DemoConfig:
    """Settings of a demo run (recorded in ``<out>/demo_log.json``).

    Attributes:
        out: the output folder.
        ddpm_steps / segmenter_steps: optimiser steps per category of the DDPM and of the segmenter.
        seed: seeds the data, the training runs, calibration and evaluation noise.
        categories: synthetic categories (default: all).
        resolution: image side R in pixels.
        num_train / num_test_good / num_test_defect_per_type: synthetic dataset sizes per category.
        num_synthetic: synthetic-anomaly samples for the segmenter (reconstructed once, cached).
        eval_batch_size: images per pipeline call in evaluation.
    """

    out: str = "demo_output"
    ddpm_steps: int = DEFAULT_DDPM_STEPS
    segmenter_steps: int = DEFAULT_SEGMENTER_STEPS
    seed: int = 0
    categories: Optional[list[str]] = None
    resolution: int = 32
    num_train: int = 100
    num_test_good: int = 20
    num_test_defect_per_type: int = 6
    num_synthetic: int = 160
    eval_batch_size: int = 16

    def resolved_categories(self) -> list[str]:
        from diffad.synthetic import SYNTHETIC_CATEGORIES

        cats = list(self.categories) if self.categories else list(SYNTHETIC_CATEGORIES)
        unknown = [c for c in cats if c not in SYNTHETIC_CATEGORIES]
        if unknown:
            raise ValueError(f"unknown synthetic categories {unknown}; choose from {list(SYNTHETIC_CATEGORIES)}")
        return cats

    def check(self) -> None:
        """``ValueError`` for a budget that is not a positive number of steps."""
        for name in ("ddpm_steps", "segmenter_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive number of steps, got {value!r}")


# A budget small enough for a slow test (~3 minutes on 2 cores): tiny data (20 training images, so that the
# validation split holds the 4 normal images calibration needs), a few steps of training.
TINY_BUDGET = dict(ddpm_steps=20, segmenter_steps=5, num_train=20, num_test_good=4, num_test_defect_per_type=1,
                   num_synthetic=16, resolution=32)


def _data_step(config: DemoConfig, data_dir: Path, categories: list[str]) -> tuple[bool, Any]:
    from diffad.synthetic import make_synthetic_dataset

    settings = {"seed": config.seed, "resolution": config.resolution, "num_train": config.num_train,
                "num_test_good": config.num_test_good, "num_test_defect_per_type": config.num_test_defect_per_type,
                "categories": categories}
    marker = data_dir / ".diffad-demo-data.json"
    done = marker.is_file() and json.loads(marker.read_text()) == settings

    def make() -> None:
        from diffad.files import atomic_write_json

        make_synthetic_dataset(data_dir, **settings)
        atomic_write_json(marker, settings)

    return done, make


def _train_ddpm(config: DemoConfig, data_dir: Path, category: str, model_dir: Path) -> None:
    """The demo's DDPM: the tiny preset, ``config.ddpm_steps`` optimiser steps, EMA weights."""
    train_ddpm_to_budget(model_dir, steps=config.ddpm_steps, seed=config.seed, data_dir=data_dir, category=category,
                         preset="tiny", resolution=config.resolution, train_batch_size=16, use_ema=True)


def _train_segmenter(config: DemoConfig, model_dir: Path) -> None:
    """The demo's segmenter: ``config.segmenter_steps`` optimiser steps on ``config.num_synthetic`` samples."""
    train_segmenter_to_budget(model_dir, steps=config.segmenter_steps, seed=config.seed,
                              num_synthetic=config.num_synthetic, train_batch_size=16,
                              # recalibrate in the batches calibrate_model used, so that Q_p comes out bit for bit
                              # the same
                              calibration_batch_size=config.eval_batch_size)


def _evaluation_category(data_dir: Path, categories: list[str]) -> str:
    """``evaluate_folder``'s category argument: ``"all"`` when the data folder holds exactly ours."""
    from diffad.data import list_categories

    found = set(list_categories(data_dir))
    if found == set(categories):
        return "all"
    if len(categories) == 1:
        return categories[0]
    raise ValueError(f"{data_dir} holds categories {sorted(found)}, not the demo's {categories}: "
                     "use another --out or delete it")


def run_demo(config: DemoConfig) -> Path:
    """Run the demo (module docstring) and return the path of ``report.md``."""
    import torch

    from diffad.cards import make_model_card, write_model_card
    from diffad.calibration import calibrate_model
    from diffad.evaluation import evaluate_folder

    categories = config.resolved_categories()
    config.check()
    out = Path(config.out)
    data_dir, models_dir, eval_dir = out / "data", out / "models", out / "evaluation"
    out.mkdir(parents=True, exist_ok=True)
    steps = StepLog(config, out / "demo_log.json")
    logger.info("demo: categories %s, %d DDPM + %d segmenter steps per category, resolution %d, %d torch threads",
                categories, config.ddpm_steps, config.segmenter_steps, config.resolution, torch.get_num_threads())

    done, make = _data_step(config, data_dir, categories)
    steps.run("synthetic data", done, make)
    for category in categories:
        model_dir = models_dir / category
        steps.run(f"{category}: train DDPM", is_trained(model_dir),
                  lambda: _train_ddpm(config, data_dir, category, model_dir))
        steps.run(f"{category}: calibrate", has_component(model_dir, "calibration"),
                  lambda: calibrate_model(model_dir=model_dir, data=data_dir, category=category, config="fast",
                                          seed=config.seed, batch_size=config.eval_batch_size))
        steps.run(f"{category}: train segmenter", has_component(model_dir, "segmenter"),
                  lambda: _train_segmenter(config, model_dir))
    model_dirs = [models_dir / c for c in categories]
    steps.run("evaluate", evaluation_is_current(eval_dir, model_dirs),
              lambda: evaluate_folder(models_dir, data_dir, _evaluation_category(data_dir, categories), eval_dir,
                                      methods=("self_aware", "denoise"), batch_size=config.eval_batch_size,
                                      seed=config.seed))

    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for category in categories:
        card = make_model_card(models_dir / category, {"category": category,
                                                       "metrics": metrics["categories"][category],
                                                       "settings": metrics.get("settings")},  # which model made them
                               repo_id=f"your-username/diffad-demo-{category}", dataset_type="diffad-synthetic",
                               seconds_per_image=method_seconds(metrics["categories"][category]))
        write_model_card(card, models_dir / category)
    steps.save()
    return write_report(config, out, metrics, steps.times)


def method_seconds(per_key: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{method: seconds per image}`` (in the pipeline's ``METHODS`` order) from ``{"<method>/<map>": metrics}``:
    one reconstruction gives every map of a method, so its maps all carry the method's time."""
    from diffad.pipelines.self_aware_inpaint import METHODS

    out: dict[str, float] = {}
    for key, values in per_key.items():
        if "seconds_per_image" in values:
            out.setdefault(key.split("/")[0], float(values["seconds_per_image"]))
    order = {m: i for i, m in enumerate(METHODS)}
    return dict(sorted(out.items(), key=lambda item: (order.get(item[0], len(order)), item[0])))


def _target_line(metrics: dict[str, Any], target: float = 0.90) -> str:
    lines = []
    for category, per_method in sorted(metrics["categories"].items()):
        # the default detector, never the best map picked on the test split
        key = next((k for k in ("self_aware/combined", "self_aware/multiscale") if k in per_method), None)
        if key is None:
            continue
        value = per_method[key].get("image_auroc")
        verdict = "meets" if value is not None and value >= target else "is below"
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"- `{category}`: the default detector ({key}) has image AUROC {shown}, which {verdict} "
                     f"the {target:.2f} target.")
    return "\n".join(lines)


def _timing_rows(step_times: dict[str, Any]) -> str:
    """The rows of the report's "where the time went" table: one per step of ``step_times`` (:class:`StepLog`)."""
    return "\n".join(
        f"| {name} | {('%.0f s' % t['seconds']) if t.get('seconds') is not None else '-'}"
        f"{' (skipped this run)' if t.get('skipped_last_run') else ''} |"
        for name, t in step_times.items())


def _next_steps_section(one: str) -> str:
    """The report's last section: the commands that take a user's own photos of category ``one`` from training to
    the Hub."""
    return f"""## What to do next with your own images

Put your photos in the MVTec AD layout: `my_parts/<category>/train/good/*.png` (defect-free photos only),
and, to measure, `my_parts/<category>/test/good/`, `my_parts/<category>/test/<defect>/` with masks in
`my_parts/<category>/ground_truth/<defect>/<name>_mask.png`. Then:

```bash
# 1. train (tiny preset here; `--preset small` for a real model, `--num-processes N` for several GPUs)
diffad train --data_dir my_parts --category {one} --output_dir models/{one} --preset tiny --resolution 64 \\
    --max_train_minutes 30
# 2. calibrate the inpainting mask and the pass/fail thresholds on held-out good photos
#    (`--config fast`, the default: 10 UNet passes per image; `--config thesis`: the thesis's 301)
diffad calibrate --model models/{one} --data my_parts --category {one} --config fast
# 3. (optional) the learned anomaly map
python -m diffad.training.train_segmenter --model_dir models/{one} --max_train_minutes 10
# 4. inspect new photos: results.csv (file, score, decision) and an overlay per image
diffad detect --model models/{one} new_photos/ --out inspection/
# 5. measure on your labelled test split: Table 4.1, figures, seconds per image
diffad evaluate --model models/{one} --data my_parts --category {one} --out evaluation/
# 6. write the model card, then publish (check with --dry-run first)
diffad card --model models/{one} --results evaluation/metrics.json
diffad push --model models/{one} --repo-id your-username/diffad-{one} --dry-run
```

Anyone can then load it with diffusers alone:
`DiffusionPipeline.from_pretrained("your-username/diffad-{one}", trust_remote_code=True)`.
"""


def write_report(config: DemoConfig, out: Path, metrics: dict[str, Any], step_times: dict[str, Any]) -> Path:
    """Write ``<out>/report.md``: results, figures (relative links), timings, and what to do next."""
    import torch

    from diffad import __version__

    eval_dir = out / "evaluation"
    table = (eval_dir / "table.md").read_text(encoding="utf-8") if (eval_dir / "table.md").is_file() else ""
    figures = sorted((eval_dir / "figures").glob("*.png")) if (eval_dir / "figures").is_dir() else []
    total = sum(t["seconds"] for t in step_times.values() if isinstance(t, dict) and t.get("seconds"))
    timing_rows = _timing_rows(step_times)
    figure_md = "\n\n".join(f"### {f.stem}\n\n![{f.stem}: original, reconstruction, inpainting mask, maps, ground "
                            f"truth]({f.relative_to(out).as_posix()})" for f in figures)
    cards = "\n".join(f"- [`models/{c}/README.md`](models/{c}/README.md)" for c in config.resolved_categories())
    one = config.resolved_categories()[0]
    text = f"""# diffad demo report

diffad {__version__}: self-aware reconstruction with a self-conditioned DDPM (Semchyshyn, 2023), on the embedded
synthetic default (no download). Categories: {', '.join(f'`{c}`' for c in config.resolved_categories())};
resolution {config.resolution} px; tiny UNet preset; {config.ddpm_steps} DDPM + {config.segmenter_steps} segmenter
optimiser steps per category (steps, not minutes: the same models on any machine); seed {config.seed}; the run
took {total / 60:.1f} min ({platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads).

This is a demonstration at toy scale on synthetic parts: it shows the workflow and the outputs, not what
the method reaches on real images with a model trained for hours (see the project README for benchmarks).

## Results (test split, Table 4.1 form)

Methods: `denoise` is the thesis's basic baseline (noise to t = 50 and denoise, no mask); `self_aware` adds the
mask stage's calibrated noise error (with the default `fast` config the reconstruction denoises; the `thesis`
config inpaints the suspect pixels). Maps: `multiscale` (reconstruction error at 4 scales), `learned` (the
DRAEM-style segmenter), `noise_error` (the noise error over its calibrated threshold map) and `combined` (the
mean of `noise_error`, `multiscale` and `learned`, each over its threshold: the default; both self-aware only).
Each method reconstructs an image once and every one of its maps comes from that reconstruction, so seconds per
image are per method.

{table}
Target: image AUROC >= 0.90 for `self_aware` on each synthetic category.

{_target_line(metrics)}

Per-image scores: [`evaluation/per_image.csv`](evaluation/per_image.csv); all metrics:
[`evaluation/metrics.json`](evaluation/metrics.json).

## Figures (thesis Fig. 4.4 style)

{figure_md or 'No figure was written.'}

## Model cards

{cards}

## Where the time went

| step | wall time |
|---|---|
{timing_rows}
| **total (this and earlier runs)** | **{total / 60:.1f} min** |

Re-running `make demo` skips every step whose output exists; delete `{out.as_posix()}/` to start over.

{_next_steps_section(one)}"""
    from diffad.files import atomic_write_text

    return atomic_write_text(out / "report.md", text)


def register(subparsers) -> None:
    """Add ``diffad demo`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "demo", help="the whole method on the built-in synthetic data, in about 10 CPU minutes",
        description="Generate the synthetic default, train a tiny DDPM and segmenter per category, calibrate, "
                    "evaluate, write model cards and OUT/report.md. Steps whose outputs exist are skipped.")
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--ddpm-steps", type=int, default=None,
                        help=f"DDPM optimiser steps per category (default: {DEFAULT_DDPM_STEPS})")
    parser.add_argument("--segmenter-steps", type=int, default=None,
                        help=f"segmenter optimiser steps per category (default: {DEFAULT_SEGMENTER_STEPS})")
    parser.add_argument("--categories", default=None, help="comma-separated synthetic categories (default: all)")
    parser.add_argument("--resolution", type=int, default=DemoConfig.resolution,
                        help=f"image side in pixels (default: {DemoConfig.resolution})")
    parser.add_argument("--tiny-budget", action="store_true",
                        help="a smoke run in about 3 minutes: tiny data and a few steps of training (numbers meaningless)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and noise (default: 0)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad demo``; prints where the report is."""
    kwargs: dict[str, Any] = dict(TINY_BUDGET) if args.tiny_budget else {}
    for name in ("ddpm_steps", "segmenter_steps"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if args.resolution != DemoConfig.resolution or "resolution" not in kwargs:
        kwargs["resolution"] = args.resolution
    if args.resolution < 32:
        raise ValueError(f"--resolution must be at least 32, got {args.resolution}")
    config = DemoConfig(out=args.out, seed=args.seed,
                        categories=[c.strip() for c in args.categories.split(",") if c.strip()] if args.categories
                        else None, **kwargs)
    start = time.time()
    report = run_demo(config)
    table = Path(config.out) / "evaluation" / "table.md"
    if table.is_file():
        print(table.read_text(encoding="utf-8"))
    print(f"demo finished in {(time.time() - start) / 60:.1f} min; open {report}")
    one = config.resolved_categories()[0]
    print(f"inspect photos in your browser: pip install 'diffad[app]' && diffad app --model "
          f"{Path(config.out) / 'models' / one}  (then open http://127.0.0.1:7860)")
    return 0
