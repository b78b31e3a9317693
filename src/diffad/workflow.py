"""What ``diffad demo`` and the benchmarks share: resumable steps with a step log, and training runs to a budget.

A demo or benchmark run is a list of steps (write the data, train a DDPM, calibrate, train the segmenter,
evaluate), each skipped when its output exists: :class:`StepLog` runs them, times them and records the times in a
JSON log, and :func:`is_trained`, :func:`has_component` and :func:`evaluation_is_current` say whether a step's
output is there. :func:`train_ddpm_to_budget` and :func:`train_segmenter_to_budget` run the training scripts
(``training/train_ddpm.py``, ``training/train_segmenter.py``, the same code path as a user's run) to a budget in
optimiser steps (the same models on any machine) or in minutes of training, resuming from the run's last
checkpoint after an interruption.

This is a command-layer module (it runs the training scripts); ``benchmarks/harness.py`` holds what only the
benchmarks share (test tensors, per-image timing, memory).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from diffad.files import atomic_write_json
from diffad.training import train_ddpm, train_segmenter

__all__ = ["StepLog", "evaluation_is_current", "has_component", "is_trained", "train_ddpm_to_budget",
           "train_segmenter_to_budget", "EPOCHS_UNBOUNDED"]

logger = logging.getLogger(__name__)

#: ``--num_epochs`` of a run whose budget is its optimiser steps (the epochs never bind).
EPOCHS_UNBOUNDED = 100_000


class StepLog:
    """Runs resumable steps (skipping those whose output exists), times each and records it in a JSON log
    (``demo_log.json`` of the demo, ``bench_log.json`` of a benchmark, so a report can show where time went).

    Args:
        config: the run's settings, a dataclass instance (recorded in the log).
        log_path: the JSON log; the times of an earlier run there are kept.
        label: the prefix of the log lines (``"demo"``, ``"bench-real"``).
    """

    def __init__(self, config: Any, log_path: Path, label: str = "demo"):
        self.config, self.log_path, self.label = config, log_path, label
        previous = json.loads(log_path.read_text()) if log_path.is_file() else {}
        self.times: dict[str, Any] = previous.get("steps", {})

    def run(self, name: str, done: bool, fn: Callable[[], Any]) -> None:
        """Run step ``name`` (``fn()``) and record its seconds, unless ``done`` (its output exists)."""
        if done:
            logger.info("%s: %s already done, skipped", self.label, name)
            self.times.setdefault(name, {"seconds": None})
            self.times[name]["skipped_last_run"] = True
            return
        logger.info("%s: %s ...", self.label, name)
        start = time.time()
        fn()
        self.times[name] = {"seconds": round(time.time() - start, 1), "skipped_last_run": False}
        self.save()

    def save(self) -> None:
        """Write the log (the config, every step's time, the Python version and the CPU count) atomically."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.log_path, {"config": asdict(self.config),
                                          "steps": self.times, "python": platform.python_version(),
                                          "cpu_count": os.cpu_count()})


def _model_index(model_dir: Path) -> dict:
    path = model_dir / "model_index.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def has_component(model_dir: Path, name: str) -> bool:
    """Whether the pipeline folder's model_index.json lists component ``name`` (e.g. ``"segmenter"``)."""
    entry = _model_index(model_dir).get(name)
    return isinstance(entry, list) and entry[0] is not None


def is_trained(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a trained DDPM (``train_ddpm.py`` saved its pipeline there)."""
    return (model_dir / "unet").is_dir() and (model_dir / "model_index.json").is_file()


def evaluation_is_current(eval_dir: Path, model_dirs: Sequence[Path]) -> bool:
    """Whether ``eval_dir/metrics.json`` exists and is newer than every model folder's ``model_index.json``."""
    metrics = eval_dir / "metrics.json"
    if not metrics.is_file():
        return False
    newest_model = max((d / "model_index.json").stat().st_mtime for d in model_dirs)
    return metrics.stat().st_mtime > newest_model


def _budget(steps: Optional[int], minutes: Optional[float], resume: bool,
            checkpointing_steps: int) -> dict[str, Any]:
    """The training-script settings of a budget: ``steps`` optimiser steps (the epochs never bind) and/or
    ``minutes`` of training; with ``resume``, one checkpoint kept and the run continued from it."""
    if steps is None and minutes is None:
        raise ValueError("a training budget needs steps or minutes (or both)")
    budget: dict[str, Any] = {}
    if steps is not None:
        budget.update(num_epochs=EPOCHS_UNBOUNDED, max_train_steps=steps)
    if minutes is not None:
        budget["max_train_minutes"] = minutes
    budget["checkpointing_steps"] = checkpointing_steps
    if resume:
        budget.update(checkpoints_total_limit=1, resume_from_checkpoint="latest")
    return budget


def _paths_as_text(flags: dict[str, Any]) -> dict[str, Any]:
    """``flags`` with every path as a string, as a command line gives it."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in flags.items()}


def train_ddpm_to_budget(output_dir: str | os.PathLike, *, steps: Optional[int] = None,
                         minutes: Optional[float] = None, seed: int = 0, resume: bool = True,
                         checkpointing_steps: int = 200, **flags: Any) -> Path:
    """Train a DDPM with ``training/train_ddpm.py`` into ``output_dir`` to a budget; return the folder.

    Args:
        output_dir: the pipeline folder.
        steps: optimiser steps (``--max_train_steps``; ``--num_epochs`` :data:`EPOCHS_UNBOUNDED`).
        minutes: minutes of training (``--max_train_minutes``), alone or as well as ``steps``.
        seed: ``--seed``.
        resume: continue from the folder's last checkpoint (``--resume_from_checkpoint latest``, one kept).
        checkpointing_steps: ``--checkpointing_steps`` (a large number: no checkpoint).
        **flags: any other flag of ``train_ddpm.py`` by name, e.g. ``data_dir=``, ``category=``, ``preset="tiny"``,
            ``resolution=64``, ``use_ema=True``, ``learning_rate=1e-3``.
    """
    config = {"output_dir": str(output_dir), "seed": seed, "report_to": "none", **_paths_as_text(flags),
              **_budget(steps, minutes, resume, checkpointing_steps)}
    return Path(train_ddpm.main(config))


def train_segmenter_to_budget(model_dir: str | os.PathLike, *, steps: Optional[int] = None,
                              minutes: Optional[float] = None, seed: int = 0, resume: bool = True,
                              checkpointing_steps: int = 200, **flags: Any) -> Path:
    """Train the segmenter with ``training/train_segmenter.py`` into the calibrated ``model_dir`` to a budget
    (the arguments of :func:`train_ddpm_to_budget`); return the folder.

    Args:
        **flags: any other flag of ``train_segmenter.py`` by name, e.g. ``num_synthetic=160``,
            ``train_batch_size=16``, ``textures_dir=``, ``calibration_batch_size=16`` (the batches the model was
            calibrated in, so that recalibrating reproduces ``Q_p`` bit for bit).
    """
    config = {"model_dir": str(model_dir), "seed": seed, **_paths_as_text(flags),
              **_budget(steps, minutes, resume, checkpointing_steps)}
    return Path(train_segmenter.main(config))
