"""Score bench cells' validation again with another synthetic-defect set, to see whether it predicts the test split
better than the bench's own: ``--copies 6`` puts every kind on every held image (six times the positives of the
small splits: metal_plate and toothbrush hold 4-5 normal validation images), ``--max_scale 16`` draws defects up to
16x instead of 8x (median areas nearer the real test defects'). Each phase's saved copy is calibrated in memory on
the same half of the validation split as :func:`bench_quality.run_validation` does; results go to
``<cell>/<phase>_validation_copies<N>`` / ``..._scale<S>``; the test split is not touched. Resumable per cell and
phase. It ends with the rank agreement (Spearman) of the bench's validation and of this one with the test split.

    OMP_NUM_THREADS=1 python benchmarks/bench_revalidate.py --categories bottle,tire --phases default,head --copies 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (CATEGORIES, cell_dir, phase_config, run_one_or_all, run_validation,  # noqa: E402
                           validation_means, validation_vs_test)


def suffix(copies: int, max_scale: Optional[float]) -> str:
    """The results folder's suffix of a validation set: ``validation`` (the bench's), ``validation_copies6``..."""
    return "validation" + (f"_copies{copies}" if copies != 1 else "") + (f"_scale{max_scale:g}" if max_scale else "")


def revalidate(out: Path, category: str, seed: int, phase: str, copies: int, max_scale: Optional[float]) -> None:
    cell = cell_dir(out, category, seed)
    copy = cell / f"{phase}_models" / category
    if not (copy / "model_index.json").is_file():
        raise SystemExit(f"{copy}: no such bench copy (run make bench-quality's {phase} phase first)")
    run_validation(copy, cell / f"{phase}_{suffix(copies, max_scale)}" / category / "metrics.json", category, seed,
                   phase_config(phase), copies=copies, max_scale=max_scale)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_output/quality")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--phases", default="default,head")
    p.add_argument("--seeds", default="0", help="comma-separated: the cells' seeds (each holds out other images)")
    p.add_argument("--copies", type=int, default=1, help="synthetic defects per held image (6: every kind)")
    p.add_argument("--max_scale", type=float, default=None, help="largest defect size factor (the bench's: 8)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    cells = [f"{c}:{s}:{ph}" for s in seeds for ph in a.phases.split(",") for c in a.categories.split(",")]
    if a.copies == 1 and a.max_scale is None:
        p.error("pass --copies or --max_scale: without them this is the bench's own validation set")
    extra = ["--copies", str(a.copies)] + (["--max_scale", str(a.max_scale)] if a.max_scale else [])
    run_one_or_all(a.run_cell, lambda c, s, ph: revalidate(Path(a.out), c, s, ph, a.copies, a.max_scale), __file__,
                   cells, Path(a.out), "revalidate_{phase}_" + suffix(a.copies, a.max_scale) + ".log", extra, a.jobs)
    if a.run_cell:
        return
    out, categories, other = Path(a.out), a.categories.split(","), suffix(a.copies, a.max_scale)
    print(agreement_table(out, categories, other))
    print(means_table(out, categories, other, seeds))


def agreement_table(out: Path, categories: list[str], other: str) -> str:
    """Per category: the Spearman rank correlation, over the detectors scored on both, between validation and the
    test split (image AUROC; AUPRO), for the bench's validation set and the ``other`` one (a results suffix)."""
    lines = ["| category | validation set | detectors | Spearman image AUROC | Spearman AUPRO |", "|---|---|---|---|---|"]
    for name in ("validation", other):
        for category, block in validation_vs_test(out, categories, name).items():
            a = block["agreement"]
            if a:
                lines.append(f"| {category} | {name} | {a['image_auroc']['detectors']} | "
                             f"{a['image_auroc']['spearman']:.2f} | {a['aupro']['spearman']:.2f} |")
    return "\n".join(lines)


def means_table(out: Path, categories: list[str], other: str, seeds: tuple[int, ...] = (0,)) -> str:
    """Per detector, the validation mean over categories and ``seeds``, plain and pooled
    (:func:`bench_quality.validation_means`), on the bench's validation set and the ``other`` one."""
    lines = ["| validation set | detector | cells | image AUROC plain / pooled | pixel AUROC | AUPRO |",
             "|---|---|---|---|---|---|"]
    for name in ("validation", other):
        vts = [validation_vs_test(out, categories, name, seed=s) for s in seeds]
        for detector, m in validation_means(*vts).items():
            lines.append(f"| {name} | {detector} | {m['cells']} | " + " | ".join(
                f"{m[k]['plain']:.3f} / {m[k]['pooled']:.3f}" for k in ("image_auroc", "pixel_auroc", "aupro")) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
