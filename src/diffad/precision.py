"""The networks' precision on this machine: bf16 where the CPU (or GPU) does it natively, else fp32.

``--precision auto`` (the default of ``diffad calibrate``) resolves here; the calibration records the result as
``SamplingConfig.precision``, and every later call runs it (a calibration is what runs).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["DEFAULT_PRECISION", "PRECISION_CHOICES", "check_precision", "cpu_has_bf16", "resolve_precision"]

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


def check_precision(pipe, requested: str | None, where: str) -> None:
    """``--precision`` of ``detect``/``evaluate``/``app``: an assertion, never a switch. A calibrated pipeline runs
    its calibration's precision; ``requested`` (resolved on this machine) must be that one, else one line saying to
    recalibrate."""
    if requested is None or not pipe.is_calibrated:
        return
    wanted = resolve_precision(requested, pipe.device)
    fitted = pipe.calibration.sampling.precision
    if wanted != fitted:
        raise ValueError(f"--precision {requested} ({wanted} here): {where} was calibrated in {fitted}; recalibrate "
                         f"with `diffad calibrate --model {where} --precision {requested} ...` (or drop --precision)")
