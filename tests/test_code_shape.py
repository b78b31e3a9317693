"""The shape of the code (issue 21), read from the source with ``ast``: no function longer than
:data:`MAX_LINES` lines in the library, the training scripts and the pipeline package, except the training scripts'
entry points, which stay under :data:`MAX_ENTRY_POINT_LINES`. A longer function is split into helpers with one job
each (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The folders whose functions the rule covers.
FOLDERS = ("src/diffad", "training", "pipelines")
MAX_LINES = 80
MAX_ENTRY_POINT_LINES = 150
#: ``(file, function)`` of the training scripts' entry points (``main`` and the locked run it calls).
ENTRY_POINTS = {("training/train_ddpm.py", "main"), ("training/train_ddpm.py", "_train"),
                ("training/train_segmenter.py", "main"), ("training/train_segmenter.py", "_train")}


def _function_lengths() -> list[tuple[str, str, int, int]]:
    """``(file, function, first line, length in lines)`` of every function and method (nested ones included), from
    its ``def`` line to its last line; decorators are not counted."""
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    found.append((rel, node.name, node.lineno, node.end_lineno - node.lineno + 1))
    return found


def test_the_rule_sees_the_code():
    lengths = _function_lengths()
    names = {(rel, name) for rel, name, _, _ in lengths}
    assert ENTRY_POINTS <= names, ENTRY_POINTS - names
    assert any(rel.startswith("pipelines/") for rel, _, _, _ in lengths)


@pytest.mark.parametrize("limit_for", ["functions", "entry points"])
def test_no_function_is_longer_than_its_limit(limit_for):
    entry = limit_for == "entry points"
    limit = MAX_ENTRY_POINT_LINES - 1 if entry else MAX_LINES
    too_long = [f"{rel}:{line}: {name} has {length} lines (at most {limit})"
                for rel, name, line, length in _function_lengths()
                if ((rel, name) in ENTRY_POINTS) == entry and length > limit]
    assert not too_long, "split these into helpers with one job each:\n" + "\n".join(too_long)
