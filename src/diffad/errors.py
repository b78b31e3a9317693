"""The one error mechanism of ``diffad`` and its training scripts: exit codes and one-line errors.

* exit codes: :data:`EXIT_OK` (0) success, :data:`EXIT_FAILURE` (1) a run that failed, :data:`EXIT_USAGE` (2) bad
  arguments or bad input;
* a user error prints ONE line, ``<prog>: error: <message>``, never a traceback (:func:`report_error`; set
  ``DIFFAD_DEBUG=1`` to see the traceback of an unexpected failure, :func:`run_with_clear_errors`);
* argparse's own errors are one line too (:class:`OneLineArgumentParser`).

Standard library only: ``diffad --help`` builds its parser from here without loading torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "EXIT_USAGE",
    "OneLineArgumentParser",
    "report_error",
    "run_with_clear_errors",
]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``<prog>: error: <message> (see '<prog> --help')``,
    with exit status 2, instead of the full usage block. Used by ``diffad`` and both training scripts."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def report_error(prog: str, message: object, code: int = EXIT_USAGE) -> int:
    """Print ``<prog>: error: <message>`` as ONE line on stderr (newlines folded) and return ``code``.

    The one writer of user-facing errors: :func:`run_with_clear_errors` (``diffad`` and the training
    scripts) goes through it, so every error of the project looks alike.
    """
    text = " ".join(str(message).split())
    sys.stderr.write(f"{prog}: error: {text}\n")
    sys.stderr.flush()
    return code


def _user_error_types() -> tuple:
    """Exceptions that mean bad input (exit 2): a bad flag, a missing or malformed file or folder."""
    return (ValueError, FileNotFoundError, NotADirectoryError)  # diffad.data.MVTecDataError is a ValueError


def run_with_clear_errors(fn: Callable[[], Any], prog: str) -> int:
    """Run ``fn()`` and turn any failure into one line on stderr (:func:`report_error`) and an exit status.

    * bad input (``ValueError``, ``FileNotFoundError``, ``NotADirectoryError``): ``<prog>: error: <message>``,
      exit status 2 (a ``FileNotFoundError`` raised by ``open`` gets its file name appended);
    * ``KeyboardInterrupt``: ``<prog>: error: interrupted``, exit status 1;
    * anything else (a bug, a crash): ``<prog>: error: <Type>: <message> (set DIFFAD_DEBUG=1 for the
      traceback)``, exit status 1.

    With ``DIFFAD_DEBUG=1`` the traceback is printed before the line. The one error mechanism of ``diffad``
    (:func:`diffad.cli.main`), ``training/train_ddpm.py`` and ``training/train_segmenter.py``.

    Returns:
        ``fn()``'s result when it is an int (an exit status), 0 when it returns anything else, or the error's
        exit status.
    """
    import traceback

    try:
        result = fn()
    except _user_error_types() as err:
        if os.environ.get("DIFFAD_DEBUG"):
            traceback.print_exc()
        message = str(err).strip() or type(err).__name__
        if isinstance(err, FileNotFoundError) and err.filename and str(err.filename) not in message:
            message = f"{message}: {err.filename}"
        return report_error(prog, message, EXIT_USAGE)
    except KeyboardInterrupt:
        return report_error(prog, "interrupted", EXIT_FAILURE)
    except Exception as err:  # noqa: BLE001 - the last line of defence: one line, exit 1
        if os.environ.get("DIFFAD_DEBUG"):
            traceback.print_exc()
        return report_error(prog, f"{type(err).__name__}: {err} (set DIFFAD_DEBUG=1 for the traceback)",
                            EXIT_FAILURE)
    return result if isinstance(result, int) and not isinstance(result, bool) else EXIT_OK

