"""Score bench cells' validation again with every synthetic kind on every held image (``copies`` = 6 defects per
image instead of one): six times the positives of the small splits (metal_plate and toothbrush hold 4-5 normal
validation images), to see whether the denser set predicts the test split better. Each phase's saved copy is
calibrated in memory on the same half of the validation split as :func:`bench_quality.run_validation` does; results
go to ``<cell>/<phase>_validation_every_kind``; the test split is not touched. Resumable per cell and phase.

    OMP_NUM_THREADS=1 python benchmarks/bench_revalidate.py --categories bottle,tire --phases default,head
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (CATEGORIES, cell_dir, phase_config, run_one_or_all, run_validation,  # noqa: E402
                           validation_vs_test)

#: defects per held validation image: one of each kind (diffad.defects.ALL_DEFECT_KINDS)
COPIES = 6
SUFFIX = "validation_every_kind"


def revalidate(out: Path, category: str, seed: int, phase: str) -> None:
    cell = cell_dir(out, category, seed)
    copy = cell / f"{phase}_models" / category
    if not (copy / "model_index.json").is_file():
        raise SystemExit(f"{copy}: no such bench copy (run make bench-quality's {phase} phase first)")
    run_validation(copy, cell / f"{phase}_{SUFFIX}" / category / "metrics.json", category, seed,
                   phase_config(phase), copies=COPIES)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_output/quality")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--phases", default="default,head")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    cells = [f"{c}:0:{ph}" for ph in a.phases.split(",") for c in a.categories.split(",")]
    run_one_or_all(a.run_cell, lambda c, s, ph: revalidate(Path(a.out), c, s, ph), __file__, cells, Path(a.out),
                   "revalidate_{phase}.log", [], a.jobs)
    if a.run_cell:
        return
    print(agreement_table(Path(a.out), a.categories.split(",")))


def agreement_table(out: Path, categories: list[str]) -> str:
    """Per category: the Spearman rank correlation, over the detectors scored on both, between validation and the
    test split (image AUROC; AUPRO), for the one-defect-per-image set and the every-kind set."""
    lines = ["| category | validation set | detectors | Spearman image AUROC | Spearman AUPRO |", "|---|---|---|---|---|"]
    for suffix in ("validation", SUFFIX):
        for category, block in validation_vs_test(out, categories, suffix).items():
            a = block["agreement"]
            if a:
                lines.append(f"| {category} | {suffix} | {a['image_auroc']['detectors']} | "
                             f"{a['image_auroc']['spearman']:.2f} | {a['aupro']['spearman']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
