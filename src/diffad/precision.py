"""The networks' precision on this machine: bf16 where the CPU (or GPU) does it natively, else fp32.

``--precision auto`` (the default of ``diffad calibrate``) resolves here; the calibration records the result as
``SamplingConfig.precision``, and every later call runs it (a calibration is what runs). Every other command's
``--precision`` (``detect``, ``evaluate``, ``app``, ``export``) is an assertion, never a switch: one flag
(:func:`add_precision_assertion`) checked by one helper with one message (:func:`check_precision`).
"""

from __future__ import annotations

import argparse
import logging
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["DEFAULT_PRECISION", "PRECISION_CHOICES", "add_precision_assertion", "check_network_precision",
           "check_precision",
           "cpu_has_bf16", "resolve_precision"]

logger = logging.getLogger(__name__)

#: What ``--precision`` accepts.
PRECISION_CHOICES = ("auto", "fp32", "bf16")
#: ``diffad calibrate``'s default.
DEFAULT_PRECISION = "auto"
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """Whether this CPU reports native bf16 arithmetic (AVX512-BF16 or AMX-BF16 in ``/proc/cpuinfo``)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in _CPU_BF16_FLAGS)


def inference_device() -> torch.device:
    """Where a command runs the networks: the first CUDA GPU when torch sees one, else the CPU (``CUDA_VISIBLE_DEVICES=``
    keeps a command on the CPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(requested: str, device: torch.device | str = "cpu") -> str:
    """``"fp32"`` or ``"bf16"`` for ``requested`` (one of :data:`PRECISION_CHOICES`) on ``device``.

    ``auto`` is bf16 where the hardware has it (a CUDA GPU that supports bf16, or a CPU with AVX512-BF16/AMX),
    else fp32. ``bf16`` on a CPU without it falls back to fp32 with one logged line (emulated bf16 is slower than
    fp32 and no more accurate)."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested == "fp32":
        return "fp32"
    device = torch.device(device)
    if device.type == "cuda":
        has = torch.cuda.is_bf16_supported()
    else:
        has = cpu_has_bf16()
    if has:
        return "bf16"
    if requested == "bf16":
        logger.warning("this %s has no native bf16 (AVX512-BF16/AMX): running fp32", device.type.upper())
    return "fp32"


def check_precision(pipe, requested: str | None, where: str, *, here: bool = True) -> None:
    """Assert a command's ``--precision`` against the calibration's: a calibrated pipeline runs its calibration's
    precision, so ``requested`` must be that one, else ValueError, one line saying to recalibrate.

    Args:
        pipe: the loaded pipeline (an uncalibrated one asserts nothing).
        requested: the flag's value; None asserts nothing.
        where: the model, as the message names it.
        here: resolve ``requested`` on this machine (``detect``, ``evaluate``, ``app``: what runs now; ``bf16``
            on a CPU without it is fp32); False takes it as written (``export``: the precision the exported
            networks are built at, wherever they will run).
    """
    if requested is None or not pipe.is_calibrated:
        return
    wanted = resolve_precision(requested, pipe.device) if here else requested
    fitted = pipe.calibration.sampling.precision
    if wanted != fitted:
        resolved = f" ({wanted} here)" if here else ""
        raise ValueError(f"--precision {requested}{resolved}: {where} was calibrated in {fitted}; recalibrate with "
                         f"`diffad calibrate --model {where} --precision {requested} ...` (or drop --precision)")


def check_network_precision(pipe, where: str) -> None:
    """Refuse (``ValueError``, one line) a pipeline whose loaded networks run another precision than its calibration:
    an exported network (:class:`diffad.networks.ExportedNetwork`) runs the precision it was built at, so another
    export's ``unet/`` swapped in, or an edited config, would otherwise decide with thresholds fitted to other
    outputs. Torch networks run whatever the calibration says, and an uncalibrated pipeline asserts nothing."""
    from diffad.networks import ExportedNetwork

    if not pipe.is_calibrated:
        return
    fitted = pipe.calibration.sampling.precision
    for name in ("unet", "segmenter"):
        network = getattr(pipe, name, None)
        if isinstance(network, ExportedNetwork) and network.precision != fitted:
            raise ValueError(f"--model {where}: its {name}/ runs {network.precision} but it was calibrated in "
                             f"{fitted}: the folder changed after `diffad export`; export the model again")


def add_precision_assertion(parser: argparse.ArgumentParser, command: str) -> None:
    """Add ``--precision`` to ``diffad <command>``: the precision the model must have been calibrated in, checked
    by :func:`check_precision` (the command runs the calibration's; ``diffad calibrate --precision`` picks it)."""
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None,
                        help=f"assert the networks' precision the model was calibrated with ({command} always runs "
                             "the calibration's; `diffad calibrate --precision` picks it): exit 2 when it differs")
