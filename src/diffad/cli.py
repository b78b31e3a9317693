"""The ``diffad`` command: one parser, one subcommand per module that does the work.

Each subcommand lives in the module that implements it and exposes ``register(subparsers)``
(adds its parser with ``set_defaults(func=run)``) and ``run(args) -> int`` (the exit code).
This module only wires them together and owns the conventions shared by all of them
(:mod:`diffad.errors`):

* exit codes: ``0`` success, ``1`` a run that failed, ``2`` bad arguments or bad input;
* a user error prints ONE line, ``diffad <cmd>: error: <message>``, never a traceback
  (set ``DIFFAD_DEBUG=1`` to see the traceback of an unexpected failure);
* progress and warnings go through :mod:`logging` (stderr), results to stdout.

Subcommands load lazily: ``diffad --help`` and ``diffad --version`` list them from :data:`SUBCOMMANDS` and import
none (no torch); a call imports only its own subcommand's module. ``demo`` (:mod:`diffad.demo`), ``train``
(``training/train_ddpm.py`` in-process, or under ``accelerate launch`` with ``--num-processes N``), ``calibrate``
(:mod:`diffad.calibration`), ``detect`` (:mod:`diffad.detect`), ``evaluate`` (:mod:`diffad.evaluation`), ``card``
(:mod:`diffad.cards`), ``push`` (:mod:`diffad.hub`), ``app`` and ``space`` (:mod:`diffad.app`), ``export``
(:mod:`diffad.export`), ``serve`` (:mod:`diffad.serve`), ``watch`` (:mod:`diffad.watch`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

from diffad import __version__
# The one error mechanism and one-line parser of diffad and its training scripts (standard library only).
from diffad.errors import (EXIT_FAILURE, EXIT_OK, EXIT_USAGE, OneLineArgumentParser, report_error,
                           run_with_clear_errors)

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "SUBCOMMANDS",
    "Subcommand",
    "UsageError",
    "build_parser",
    "main",
    "accelerate_launch_command",
]

logger = logging.getLogger(__name__)


class Subcommand(NamedTuple):
    """One ``diffad`` subcommand: where its parser is registered, and its line in ``diffad --help``."""

    name: str
    module: str  #: the module that implements it
    register: str  #: the function of ``module`` that adds its parser to the subparsers
    summary: str  #: its ``help=`` there (``tests/test_cli.py`` checks the two agree)


#: Every subcommand, in the order ``diffad --help`` lists them.
SUBCOMMANDS = (
    Subcommand("demo", "diffad.demo", "register",
               "the whole method on the built-in synthetic data, in about 10 CPU minutes"),
    Subcommand("train", "diffad.cli", "_register_train",
               "train everything the default detector needs: the DDPM (training/train_ddpm.py; `diffad train "
               "--help` lists its flags), then, with the cpu preset, its calibration and the learned head"),
    Subcommand("calibrate", "diffad.calibration", "register",
               "fit the noise-error threshold map and pass/fail thresholds on normal images"),
    Subcommand("detect", "diffad.detect", "register",
               "score photos: results.csv (file, score, decision) and an overlay PNG per image"),
    Subcommand("evaluate", "diffad.evaluation", "register",
               "metrics, Table 4.1 and Fig. 4.4 on the test split of one or all categories"),
    Subcommand("card", "diffad.cards", "register",
               "write the model card (README.md with model-index metadata) into a model folder"),
    Subcommand("push", "diffad.hub", "register", "publish a calibrated model with its card to the Hugging Face Hub"),
    Subcommand("app", "diffad.app", "register",
               "a web page for the inspection station: drop photos, see heat maps, scores and PASS/FAIL"),
    Subcommand("export", "diffad.export", "register",
               "the networks in OpenVINO's or ONNX's format: a model folder detect, evaluate and app run faster on CPU"),
    Subcommand("space", "diffad.app", "register_space", "write a Hugging Face Space folder that serves `diffad app`"),
    Subcommand("serve", "diffad.serve", "register",
               "an HTTP API: POST /inspect a photo, get its score, decision and overlay as JSON"),
    Subcommand("watch", "diffad.watch", "register",
               "score every photo that appears in a folder: results.csv rows, overlays, a webhook"),
)


class UsageError(ValueError):
    """Bad input from the user (a missing folder, an invalid value): exit code 2, one line."""


# --------------------------------------------------------------------------------------
# `diffad train`: training/train_ddpm.py in-process, or through accelerate
# --------------------------------------------------------------------------------------
def accelerate_launch_command(num_processes: int, script: str | os.PathLike,
                              script_args: Sequence[str], *, use_gpu: Optional[bool] = None) -> list[str]:
    """The ``accelerate launch`` command line for ``num_processes`` training processes.

    On GPUs: ``--multi_gpu --num_processes N``. On CPU, ``accelerate launch --cpu
    --num_processes 2`` silently starts ONE process, so a real multi-rank
    CPU run uses ``--multi_gpu`` with the cores shared between processes (the training script
    creates ``Accelerator(cpu=True)`` when no GPU is present). ``--expect_world_size N`` is added
    so the script fails, rather than silently training N independent copies, if the launch
    does not give it N ranks.

    Args:
        num_processes: processes (ranks) on this machine, >= 1.
        script: the training script path.
        script_args: arguments forwarded to the script.
        use_gpu: force GPU (True) or CPU (False) flags; ``None`` asks ``torch.cuda``.
    """
    if num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {num_processes}")
    if use_gpu is None:
        import torch

        use_gpu = torch.cuda.is_available()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
           "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    script_args = list(script_args)
    if use_gpu:
        if num_processes > 1:
            cmd.append("--multi_gpu")
        if not any(a.startswith("--mixed_precision") for a in script_args):
            cmd += ["--mixed_precision", "no"]
    else:
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        if num_processes > 1:
            cmd += ["--multi_gpu", "--num_cpu_threads_per_process", str(threads)]
        else:
            cmd += ["--cpu", "--num_cpu_threads_per_process", str(threads)]
        cmd += ["--mixed_precision", "no"]
    if not any(a.startswith("--expect_world_size") for a in script_args):
        script_args += ["--expect_world_size", str(num_processes)]
    return cmd + [str(script)] + script_args


def _register_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", add_help=False,
        help=SUBCOMMANDS[1].summary,
        description="Train the DDPM of one category (every flag except --num-processes is forwarded to "
                    "training/train_ddpm.py); with a preset that has a learned head (the default cpu preset), "
                    "then calibrate it (`diffad calibrate`'s defaults) and train the head into the model folder "
                    "(training/train_segmenter.py's defaults).")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="training processes; > 1 re-launches through `accelerate launch`")
    parser.set_defaults(func=_run_train, _forward_unknown=True)


def train_head(model_dir: str | os.PathLike, train_args: argparse.Namespace, *,
               calibration_batch_size: Optional[int] = None, segmenter_argv: Sequence[str] = ()) -> Path:
    """The learned head of a freshly trained DDPM: calibrate it with the default sampler on its validation split
    (:func:`calibrate_model`, the training run's split and seed), then train the segmenter into it
    (``training/train_segmenter.py`` defaults, seeded by the training seed, resumable), which recalibrates every
    threshold with the head in place. ``segmenter_argv``: more ``train_segmenter.py`` flags."""
    from diffad.calibration import _training_config, calibrate_model
    from diffad.model_folder import calibration_config
    from diffad.training import train_segmenter

    model_dir = Path(model_dir)
    category = train_args.category or _training_config(model_dir).get("category")
    if calibration_config(model_dir) is None:
        calibrate_model(model_dir, train_args.data_dir, category, seed=train_args.seed,
                        batch_size=calibration_batch_size)
    argv = ["--model_dir", str(model_dir), "--seed", str(train_args.seed), "--resume_from_checkpoint", "latest",
            "--checkpoints_total_limit", "1", "--split_seed", str(train_args.seed)]
    if train_args.data_dir:
        argv += ["--data_dir", str(train_args.data_dir)] + (["--category", category] if category else [])
    if getattr(train_args, "validation_fraction", None):
        argv += ["--validation_fraction", str(train_args.validation_fraction)]
    if calibration_batch_size:
        argv += ["--calibration_batch_size", str(calibration_batch_size)]
    return train_segmenter.main(train_segmenter.parse_args(argv + list(segmenter_argv)))


def _run_train(args: argparse.Namespace) -> int:
    from diffad.training import train_ddpm  # imports accelerate: only when training, not on every `diffad` call

    forwarded = list(getattr(args, "_extra", []))
    if args.num_processes < 1:
        raise UsageError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes == 1:
        if any(a in ("-h", "--help") for a in forwarded):
            print("diffad train [--num-processes N]: N > 1 re-launches through `accelerate launch`; every other "
                  "flag below goes to training/train_ddpm.py.\n")
        try:
            train_args = train_ddpm.parse_args(forwarded, prog="diffad train")
        except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
            return int(exc.code or 0)
        output = train_ddpm.main(train_args)
        from diffad import presets

        if presets.preset_defaults(train_args.preset).get("head"):
            train_head(output, train_args)
        print(f"model saved to {output}")
        return EXIT_OK
    cmd = accelerate_launch_command(args.num_processes, train_ddpm.__file__, forwarded)
    logger.info("launching: %s", " ".join(cmd))
    return subprocess.call(cmd)


# --------------------------------------------------------------------------------------
# The parser and main
# --------------------------------------------------------------------------------------
def _unavailable(name: str, exc: BaseException) -> Callable:
    def register(subparsers) -> None:
        parser = subparsers.add_parser(name, help=f"(unavailable: {type(exc).__name__})")
        parser.set_defaults(func=lambda args: report_error(
            f"diffad {name}", f"this subcommand could not be loaded ({type(exc).__name__}: {exc})", EXIT_FAILURE))
    return register


def _registration(subcommand: Subcommand) -> Callable:
    """The function that adds ``subcommand``'s parser, its module imported now; a module that fails to import
    gives a subcommand that says so (exit 1) and leaves the others working."""
    try:
        return getattr(importlib.import_module(subcommand.module), subcommand.register)
    except Exception as exc:  # a module that fails to import must not break the others
        logger.debug("subcommand %s unavailable", subcommand.name, exc_info=True)
        return _unavailable(subcommand.name, exc)


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``diffad`` parser: every subcommand listed with its summary, and ``command``'s own parser (all its flags,
    its ``--help``) registered by the module that implements it.

    The other subcommands are placeholders that accept any argument and import nothing, so the parser of
    ``diffad --help`` (``command=None``) loads no subcommand module and no torch.
    """
    parser = OneLineArgumentParser(
        prog="diffad",
        description="Visual inspection with diffusion models: train on good parts, find defects in new "
                    "photos (self-aware reconstruction, Semchyshyn 2023).",
        epilog="Start with `diffad demo`. Exit codes: 0 ok, 1 the run failed, 2 bad arguments or input.")
    parser.add_argument("--version", action="version", version=f"diffad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", parser_class=OneLineArgumentParser)
    subparsers.required = True
    for subcommand in SUBCOMMANDS:
        if subcommand.name == command:
            _registration(subcommand)(subparsers)
        else:
            subparsers.add_parser(subcommand.name, help=subcommand.summary, add_help=False)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diffad`` console script; returns the exit code (0, 1 or 2).

    The arguments are read twice: first by the parser of every subcommand's placeholder (``--help``, ``--version``,
    a missing or unknown subcommand end here, nothing imported), then by the chosen subcommand's own parser. Errors
    go through :func:`diffad.errors.run_with_clear_errors`: one line, exit 2 for bad input, 1 for a failed run.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = build_parser().parse_known_args(argv)[0].command
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_forward_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_with_clear_errors(lambda: args.func(args), f"diffad {args.command}")


if __name__ == "__main__":
    sys.exit(main())
