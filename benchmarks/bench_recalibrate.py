"""Re-measure bench cells after a change of how the pipeline makes its maps from the networks' outputs (not of the
networks): each phase's copy keeps its trained DDPM (and head) and is recalibrated with the current code (as `diffad
calibrate`, what `diffad train`'s head step ends with too), then validation and the test split are scored again.
The previous results are kept beside as ``<phase>_{validation,evaluation}_<tag>``. Resumable per cell and phase.

    OMP_NUM_THREADS=1 python benchmarks/bench_recalibrate.py --categories bottle,tire --phases head,default --tag v03
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (CATEGORIES, PRECISION, cell_dir, phase_config, run_eval_phase,  # noqa: E402
                           run_one_or_all)


def recalibrate(out: Path, category: str, seed: int, phase: str, tag: str) -> None:
    """One cell and phase: keep the old results under ``tag``, recalibrate the copy, score it again."""
    from diffad.calibration import calibrate_model

    cell = cell_dir(out, category, seed)
    copy = cell / f"{phase}_models" / category
    done = cell / f"{phase}_recalibrated_{tag}"
    if done.is_file():
        return
    if not (copy / "model_index.json").is_file():
        raise SystemExit(f"{copy}: no such bench copy (run make bench-quality's {phase} phase first)")
    for name in (f"{phase}_validation", f"{phase}_evaluation"):
        if (cell / name).is_dir() and not (cell / f"{name}_{tag}").exists():
            shutil.move(cell / name, cell / f"{name}_{tag}")
    calibrate_model(model_dir=copy, data=CATEGORIES[category], category=category, config=phase_config(phase),
                    precision=PRECISION, seed=seed, batch_size=16)
    run_eval_phase(out, category, seed, phase)
    done.write_text("done\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_output/quality")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seeds", default="0")
    p.add_argument("--phases", default="head,default")
    p.add_argument("--tag", required=True, help="suffix the previous results are kept under")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--run-cell", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    cells = [f"{c}:{s}:{ph}" for ph in a.phases.split(",") for s in a.seeds.split(",") for c in a.categories.split(",")]
    run_one_or_all(a.run_cell, lambda c, s, ph: recalibrate(Path(a.out), c, s, ph, a.tag), __file__, cells,
                   Path(a.out), "recalibrate_{phase}_" + a.tag + ".log", ["--tag", a.tag], a.jobs)

if __name__ == "__main__":
    main()
