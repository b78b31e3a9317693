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

__all__ = ["launched_accelerator"]


@contextlib.contextmanager
def launched_accelerator() -> Iterator[Optional[Accelerator]]:
    """The :class:`~accelerate.Accelerator` of a multi-process launch, or ``None`` for one process.

    On CPUs the processes need ``cpu=True`` to form one gloo group (see STACK_NOTES.md). On the way out, after
    success or an error, every process destroys its process group (:meth:`~accelerate.Accelerator.end_training`):
    left to the interpreter's shutdown, a gloo group's threads can abort a process that had finished its work
    (``terminate called without an active exception``, SIGABRT), and the launch fails.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # the launcher sets it; 1 when diffad runs on its own
        yield None
        return
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    try:
        yield accelerator
    finally:
        accelerator.end_training()
