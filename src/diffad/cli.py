"""The ``diffad`` command: one parser, one subcommand per module that does the work.

Each subcommand lives in the module that implements it and exposes ``register(subparsers)``
(adds its parser with ``set_defaults(func=run)``) and ``run(args) -> int`` (the exit code).
This module only wires them together and owns the conventions shared by all of them:

* exit codes: ``0`` success, ``1`` a run that failed, ``2`` bad arguments or bad input;
* a user error prints ONE line, ``diffad <cmd>: error: <message>``, never a traceback
  (set ``DIFFAD_DEBUG=1`` to see the traceback of an unexpected failure);
* progress and warnings go through :mod:`logging` (stderr), results to stdout.

Subcommands: ``demo`` (:mod:`diffad.demo`), ``train`` (``training/train_ddpm.py`` in-process,
or under ``accelerate launch`` with ``--num-processes N``), ``calibrate`` (this module),
``detect`` (:mod:`diffad.detect`), ``evaluate`` (:mod:`diffad.evaluation`), ``card``
(:mod:`diffad.cards`), ``push`` (:mod:`diffad.hub`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional, Sequence

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "UsageError",
    "report_error",
    "build_parser",
    "main",
    "calibrate_model",
    "save_pipeline_atomically",
    "accelerate_launch_command",
]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

# Subcommand modules, in the order ``diffad --help`` lists them.
_SUBCOMMAND_MODULES = (
    ("demo", "diffad.demo"),
    ("train", "diffad.cli"),
    ("calibrate", "diffad.cli"),
    ("detect", "diffad.detect"),
    ("evaluate", "diffad.evaluation"),
    ("card", "diffad.cards"),
    ("push", "diffad.hub"),
)


class UsageError(ValueError):
    """Bad input from the user (a missing folder, an invalid value): exit code 2, one line."""


def report_error(command: str, message: object, code: int = EXIT_USAGE) -> int:
    """Print ``diffad <command>: error: <message>`` as one line on stderr and return ``code``.

    The one helper every subcommand uses for user-facing errors, so they all look alike.
    Newlines inside ``message`` are folded so the error stays on one line.
    """
    text = " ".join(str(message).split())
    prefix = f"diffad {command}" if command else "diffad"
    sys.stderr.write(f"{prefix}: error: {text}\n")
    sys.stderr.flush()
    return code


class _OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (no usage dump) and exit with code 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse's signature
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        sys.exit(EXIT_USAGE)


# --------------------------------------------------------------------------------------
# Helpers shared by `calibrate` and the demo
# --------------------------------------------------------------------------------------
def save_pipeline_atomically(pipe, model_dir: str | os.PathLike) -> Path:
    """Save ``pipe`` into ``model_dir`` so that a crash never leaves a half-written model.

    Reuses the training scripts' writer (``diffad.training_utils.save_pipeline``): the pipeline is
    saved into a temporary folder, then each entry is renamed into ``model_dir`` (component folders
    swapped whole, ``model_index.json`` last), keeping ``training_log.json``, ``README.md`` and
    checkpoints beside it.

    Args:
        pipe: a ``SelfAwareInpaintPipeline``.
        model_dir: the model folder to (re)write.

    Returns:
        The model folder.
    """
    from diffad.training_utils import save_pipeline

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    save_pipeline(pipe, model_dir)
    return model_dir


def calibrate_model(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    category: str,
    *,
    percentile: float = 0.8,
    target_false_positive_rate: float = 0.05,
    seed: int = 0,
    validation_fraction: float = 0.2,
    batch_size: Optional[int] = None,
) -> Path:
    """Calibrate a saved pipeline on the validation split of its category and save it back.

    Loads ``SelfAwareInpaintPipeline.from_pretrained(model_dir)``, reads the normal validation
    images (the seeded ``validation_fraction`` of ``train/good``, as ``diffad.load_mvtec``
    splits them; use the same ``seed`` as training so they were never trained on), calls
    ``pipe.calibrate`` (threshold map ``Q_p`` and pass/fail thresholds) and writes the folder
    back atomically (:func:`save_pipeline_atomically`).

    Args:
        model_dir: a pipeline folder written by ``training/train_ddpm.py``.
        data: a folder in MVTec AD layout (root of categories or one category folder).
        category: the category the model was trained on.
        percentile: the per-pixel percentile ``p`` in (0, 1) of the threshold map.
        target_false_positive_rate: fraction of normal images the image threshold flags.
        seed: seeds the validation split and the calibration noise.
        validation_fraction: must match the one used in training.
        batch_size: images per UNet call (``None``: the pipeline's default).

    Returns:
        The model folder.

    Raises:
        FileNotFoundError: ``model_dir`` holds no ``model_index.json``.
        ValueError: an empty validation split or an invalid percentile / rate.
    """
    import torch

    from diffad.data import load_mvtec
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a diffad model folder (no model_index.json); "
                                "train one with `diffad train` first")
    if not 0.0 < percentile < 1.0:
        raise ValueError(f"--percentile must be in (0, 1), got {percentile}")
    if not 0.0 < target_false_positive_rate < 1.0:
        raise ValueError(f"--target-fpr must be in (0, 1), got {target_false_positive_rate}")
    pipe = SelfAwareInpaintPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    resolution = int(pipe.unet.config.sample_size)
    splits = load_mvtec(data, category, resolution=resolution,
                        validation_fraction=validation_fraction, seed=seed)
    validation = splits["validation"]
    if len(validation) == 0:
        raise ValueError(f"the validation split of {category!r} in {data} is empty: "
                         "raise --validation-fraction or add train/good images")
    images = [row["image"] for row in validation]
    logger.info("calibrating %s on %d validation images of %r", model_dir, len(images), category)
    pipe.calibrate(images, percentile=percentile,
                   target_false_positive_rate=target_false_positive_rate,
                   generator=torch.Generator().manual_seed(seed), batch_size=batch_size)
    return save_pipeline_atomically(pipe, model_dir)


def _register_calibrate(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate", help="fit the inpainting-mask threshold map and pass/fail threshold on normal images",
        description="Calibrate a trained model on the validation split (held-out train/good images) of "
                    "its category, and save the calibration into the model folder (atomically).")
    parser.add_argument("--model", required=True, help="the model folder written by `diffad train`")
    parser.add_argument("--data", required=True, help="dataset folder in MVTec AD layout")
    parser.add_argument("--category", required=True, help="the category the model was trained on")
    parser.add_argument("--percentile", type=float, default=0.8,
                        help="per-pixel percentile p of the threshold map Q_p, in (0, 1); lower gives "
                             "larger inpainting masks (default: 0.8, the thesis's)")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="fraction of normal images the pass/fail threshold may flag (default: 0.05)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="held-out fraction of train/good; must match training (default: 0.2)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per UNet call")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the validation split (as in training) and the noise (default: 0)")
    parser.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    path = calibrate_model(args.model, args.data, args.category, percentile=args.percentile,
                           target_false_positive_rate=args.target_fpr, seed=args.seed,
                           validation_fraction=args.validation_fraction, batch_size=args.batch_size)
    print(f"calibrated {path}")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# `diffad train`: training/train_ddpm.py in-process, or through accelerate
# --------------------------------------------------------------------------------------
def accelerate_launch_command(num_processes: int, script: str | os.PathLike,
                              script_args: Sequence[str], *, use_gpu: Optional[bool] = None) -> list[str]:
    """The ``accelerate launch`` command line for ``num_processes`` training processes.

    On GPUs: ``--multi_gpu --num_processes N``. On CPU, ``accelerate launch --cpu
    --num_processes 2`` silently starts ONE process (``STACK_NOTES.md``), so a real multi-rank
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
        help="train the self-conditioned DDPM (training/train_ddpm.py; `diffad train --help` lists its flags)",
        description="Train the DDPM of one category. Every flag except --num-processes is forwarded to "
                    "training/train_ddpm.py.")
    parser.add_argument("--num-processes", type=int, default=1,
                        help="training processes; > 1 re-launches through `accelerate launch`")
    parser.set_defaults(func=_run_train, _forward_unknown=True)


def _run_train(args: argparse.Namespace) -> int:
    from diffad.training import train_ddpm

    forwarded = list(getattr(args, "_extra", []))
    if args.num_processes < 1:
        return report_error("train", f"--num-processes must be >= 1, got {args.num_processes}")
    if args.num_processes == 1:
        if any(a in ("-h", "--help") for a in forwarded):
            print("diffad train [--num-processes N]: N > 1 re-launches through `accelerate launch`; every other "
                  "flag below goes to training/train_ddpm.py.\n")
        try:
            train_args = train_ddpm.parse_args(forwarded, prog="diffad train")
        except SystemExit as exc:  # argparse: --help (0) or a bad flag (2, already printed)
            return int(exc.code or 0)
        output = train_ddpm.main(train_args)
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
            name, f"this subcommand could not be loaded ({type(exc).__name__}: {exc})", EXIT_FAILURE))
    return register


def build_parser() -> argparse.ArgumentParser:
    """The ``diffad`` parser with every subcommand registered by the module that implements it."""
    from diffad import __version__

    parser = _OneLineErrorParser(
        prog="diffad",
        description="Visual inspection with diffusion models: train on good parts, find defects in new "
                    "photos (self-aware inpainting, Semchyshyn 2023).",
        epilog="Start with `diffad demo`. Exit codes: 0 ok, 1 the run failed, 2 bad arguments or input.")
    parser.add_argument("--version", action="version", version=f"diffad {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_OneLineErrorParser)
    subparsers.required = True
    for name, module_name in _SUBCOMMAND_MODULES:
        if name == "train":
            register = _register_train
        elif name == "calibrate":
            register = _register_calibrate
        else:
            try:
                register = importlib.import_module(module_name).register
            except Exception as exc:  # a module that fails to import must not break the others
                logger.debug("subcommand %s unavailable", name, exc_info=True)
                register = _unavailable(name, exc)
        register(subparsers)
    return parser


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [UsageError, ValueError, FileNotFoundError, NotADirectoryError]
    try:
        from diffad.data import MVTecDataError

        types.append(MVTecDataError)
    except Exception:  # noqa: BLE001 - data.py may be absent while it is written
        pass
    return tuple(types)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``diffad`` console script; returns the exit code (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "_forward_unknown", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._extra = extra
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    command = args.command
    try:
        return int(args.func(args))
    except _user_error_types() as exc:
        if os.environ.get("DIFFAD_DEBUG"):
            traceback.print_exc()
        return report_error(command, exc, EXIT_USAGE)
    except KeyboardInterrupt:
        return report_error(command, "interrupted", EXIT_FAILURE)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        if os.environ.get("DIFFAD_DEBUG"):
            traceback.print_exc()
        return report_error(command, f"{type(exc).__name__}: {exc} (set DIFFAD_DEBUG=1 for the traceback)",
                            EXIT_FAILURE)


if __name__ == "__main__":
    sys.exit(main())
