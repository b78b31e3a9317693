"""The processes of ``accelerate launch [...] -m diffad.cli detect|evaluate``: one Accelerator, its group ended.

``diffad detect`` and ``diffad evaluate`` run on several processes (or machines) when ``accelerate launch`` (or
torchrun) starts them; :func:`launched_accelerator` is how both join the launch and leave it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
from accelerate import Accelerator

__all__ = ["launched_accelerator", "launched_world_size"]


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 when diffad runs on its own)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def launched_accelerator() -> Iterator[Optional[Accelerator]]:
    """The :class:`~accelerate.Accelerator` of a multi-process launch, or ``None`` for one process.

    On CPUs the processes need ``cpu=True`` to form one gloo group (see STACK_NOTES.md). On the way out, after
    success or an error, every process destroys its process group (:meth:`~accelerate.Accelerator.end_training`):
    left to the interpreter's shutdown, a gloo group's threads can abort a process that had finished its work
    (``terminate called without an active exception``, SIGABRT), and the launch fails.
    """
    if launched_world_size() <= 1:
        yield None
        return
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        yield accelerator
    finally:
        accelerator.end_training()
