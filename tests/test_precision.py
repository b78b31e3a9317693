"""``--precision`` outside ``diffad calibrate`` is an assertion: every command refuses another precision than the
calibration's with the same one line, and runs when it matches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffad.cli import main
from tiny_components import CHEAP_CONFIG, random_images, tiny_pipeline


@pytest.fixture(scope="module")
def model_bf16(tmp_path_factory) -> Path:
    """A tiny model calibrated with its networks in bf16 (what ``diffad calibrate --precision bf16`` records)."""
    pipe = tiny_pipeline()
    pipe.calibrate(random_images(4), config=dataclasses.replace(CHEAP_CONFIG, precision="bf16"),
                   generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("precision") / "model_bf16"
    pipe.save_pretrained(folder)
    return folder


def _argv(command: str, model: Path, tmp_path: Path, synthetic_root: Path) -> list[str]:
    if command == "detect":
        photos = tmp_path / "photos"
        photos.mkdir(exist_ok=True)
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(photos / "a.png")
        return ["detect", "--model", str(model), str(photos), "--out", str(tmp_path / "out")]
    if command == "evaluate":
        return ["evaluate", "--model", str(model), "--data", str(synthetic_root), "--category", "weave",
                "--out", str(tmp_path / "out")]
    pytest.importorskip("openvino")
    return ["export", "--model", str(model), "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("command", ["detect", "evaluate", "export"])
def test_every_command_refuses_another_precision_with_one_message(model_bf16, synthetic_root, tmp_path, capsys,
                                                                   command):
    code = main(_argv(command, model_bf16, tmp_path, synthetic_root) + ["--precision", "fp32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--precision fp32" in err[0] and f"{model_bf16} was calibrated in bf16; recalibrate with `diffad " \
        f"calibrate --model {model_bf16} --precision fp32 ...` (or drop --precision)" in err[0], err
    assert not (tmp_path / "out" / "results.csv").exists() and not (tmp_path / "out" / "metrics.json").exists()
