"""``diffad export --format openvino``: the exported networks reproduce torch's, and every command runs the folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffad.cli import main
from diffad.detect import load_pipeline
from tiny_components import saved_tiny_pipeline

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("export") / "model")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for precision in ("fp32", "bf16"):
        folders[precision] = root / precision
        assert main(["export", "--model", str(model), "--precision", precision, "--out", str(folders[precision])]) == 0
    return folders


def test_exported_folder_is_complete_and_self_describing(model, exported):
    folder = exported["bf16"]
    manifest = json.loads((folder / "export.json").read_text())
    assert manifest["format"] == "openvino" and manifest["precision"] == "bf16" and manifest["source"] == "model"
    assert (folder / "unet" / "openvino_model.xml").is_file() and (folder / "unet" / "openvino_model.bin").is_file()
    assert not list(folder.rglob("*.pkl")) and not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for rel in ("calibration/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "pipeline.py"):
        assert (folder / rel).read_bytes() == (model / rel).read_bytes(), rel


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 0.1)])
def test_exported_networks_reproduce_torch(model, exported, precision, tolerance):
    torch_pipe, ov_pipe = load_pipeline(model), load_pipeline(exported[precision])
    x = torch.randn(3, 6, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 150, 700])
    with torch.no_grad():
        expected = torch_pipe.unet(x, t).sample
    got = ov_pipe.unet(x, t).sample
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert float((got - expected).abs().max()) < tolerance


def test_detect_on_the_exported_folder_gives_torchs_decisions(model, exported, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    results = {}
    for name, folder in (("torch", model), ("openvino", exported["fp32"])):
        assert main(["detect", "--model", str(folder), str(photos), "--out", str(tmp_path / name)]) == 0
        with (tmp_path / name / "results.csv").open() as handle:
            results[name] = {r["file"]: r for r in csv.DictReader(handle)}
    for file, row in results["torch"].items():
        other = results["openvino"][file]
        assert other["decision"] == row["decision"]
        assert abs(float(other["score"]) - float(row["score"])) < 1e-3 * max(1.0, abs(float(row["score"])))


def test_export_bad_input_is_one_line(model, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "file.txt").write_text("x")
    for argv, message in ((["--out", str(taken)], "exists and is not empty"),
                          (["--out", str(model)], "--out must be a new folder")):
        code = main(["export", "--model", str(model), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    assert (taken / "file.txt").read_text() == "x"
