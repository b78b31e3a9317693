"""``diffad export``: the exported networks (OpenVINO fp32/bf16, ONNX) reproduce torch's, the folder loads with
``SelfAwareInpaintPipeline.from_pretrained`` and every command runs it."""

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
from diffad.pipelines.self_aware_inpaint.folder import CODE_FILES
from tiny_components import saved_tiny_pipeline

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

#: (format, precision) of every exported folder the tests build.
EXPORTS = (("openvino", "fp32"), ("openvino", "bf16"), ("onnx", "fp32"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("export") / "model")  # calibrated in fp32


@pytest.fixture(scope="module")
def model_bf16(tmp_path_factory) -> Path:
    """The same model calibrated with its networks in bf16 (what ``diffad calibrate --precision bf16`` does)."""
    import dataclasses

    from tiny_components import CHEAP_CONFIG, random_images, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.calibrate(random_images(4), config=dataclasses.replace(CHEAP_CONFIG, precision="bf16"),
                   generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("export") / "model_bf16"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(model, model_bf16, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exported")
    folders = {}
    for fmt, precision in EXPORTS:  # the precision is the calibration's (the default of --precision)
        folders[fmt, precision] = root / f"{fmt}_{precision}"
        source = model_bf16 if precision == "bf16" else model
        assert main(["export", "--model", str(source), "--format", fmt, "--out", str(folders[fmt, precision])]) == 0
    return folders


@pytest.mark.parametrize("fmt, precision, files", [("openvino", "bf16", ("openvino_model.xml", "openvino_model.bin")),
                                                   ("onnx", "fp32", ("model.onnx",))])
def test_exported_folder_is_complete_and_self_describing(model, model_bf16, exported, fmt, precision, files):
    folder = exported[fmt, precision]
    manifest = json.loads((folder / "export.json").read_text())
    model = model_bf16 if precision == "bf16" else model
    source = model.name
    assert manifest["format"] == fmt and manifest["precision"] == precision and manifest["source"] == source
    assert manifest["calibration"]["sampling_config"]["precision"] == precision
    assert all((folder / "unet" / f).is_file() for f in files)
    assert not list(folder.rglob("*.pkl")) and not (folder / "unet" / "diffusion_pytorch_model.safetensors").exists()
    for rel in ("calibration/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", *CODE_FILES,
                "calibration/anomaly_calibration.py"):
        assert (folder / rel).read_bytes() == (model / rel).read_bytes(), rel
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffad.networks", {"openvino": "OpenVINONetwork", "onnx": "ONNXNetwork"}[fmt]]
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    assert unet_config["_diffad_export"] == {"format": fmt, "precision": precision, "source": source}


def test_from_pretrained_loads_the_exported_folder_and_saves_it_again(model, exported, tmp_path):
    from diffad import SelfAwareInpaintPipeline
    from diffad.networks import ONNXNetwork, OpenVINONetwork

    for (fmt, precision), cls in (((("openvino", "bf16")), OpenVINONetwork), (("onnx", "fp32"), ONNXNetwork)):
        pipe = SelfAwareInpaintPipeline.from_pretrained(exported[fmt, precision])
        assert isinstance(pipe.unet, cls) and pipe.unet.precision == precision and pipe.is_calibrated
        assert pipe.resolution == 32 and pipe.device.type == "cpu"
        pipe.save_pretrained(tmp_path / fmt)  # e.g. after recalibrating: the exported files travel along
        again = SelfAwareInpaintPipeline.from_pretrained(tmp_path / fmt)
        assert isinstance(again.unet, cls)
        x = torch.randn(2, 6, 32, 32, generator=torch.Generator().manual_seed(1))
        assert torch.equal(again.unet(x, 150).sample, pipe.unet(x, 150).sample)


def test_a_folder_exported_before_diffad_networks_still_loads(exported, tmp_path):
    """Folders exported by earlier versions name their networks ``["diffad.export", ...]``."""
    import shutil

    from diffad import SelfAwareInpaintPipeline
    from diffad.networks import OpenVINONetwork

    old = tmp_path / "old"
    shutil.copytree(exported["openvino", "fp32"], old)
    index = json.loads((old / "model_index.json").read_text())
    index["unet"] = ["diffad.export", "OpenVINONetwork"]
    (old / "model_index.json").write_text(json.dumps(index))
    pipe = SelfAwareInpaintPipeline.from_pretrained(old)
    assert isinstance(pipe.unet, OpenVINONetwork) and pipe.is_calibrated


def test_a_missing_exported_file_is_one_line(exported, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(exported["onnx", "fp32"], broken)
    (broken / "unet" / "model.onnx").unlink()
    with pytest.raises(FileNotFoundError, match=r"unet/model.onnx is missing .*export the model again"):
        load_pipeline(broken)


def test_exporting_an_exported_folder_or_onnx_in_bf16_is_refused(exported, model, tmp_path):
    from diffad.export import export_model

    with pytest.raises(ValueError, match="already exported"):
        export_model(exported["onnx", "fp32"], tmp_path / "again", fmt="onnx", precision="fp32")
    with pytest.raises(ValueError, match="--format onnx runs in fp32"):
        export_model(model, tmp_path / "bf16", fmt="onnx", precision="bf16")
    assert not (tmp_path / "again").exists() and not (tmp_path / "bf16").exists()


def test_export_runs_the_calibrations_precision_or_refuses(model, model_bf16, tmp_path, capsys):
    """A bf16 network under fp32 thresholds (or the reverse) would decide with a calibration of another model."""
    for source, argv, message in (
            (model, ["--precision", "bf16"], "was calibrated in fp32; recalibrate with `diffad calibrate --model"),
            (model_bf16, ["--precision", "fp32"], "was calibrated in bf16"),
            (model_bf16, ["--format", "onnx"], "was calibrated in bf16 and ONNX runs fp32")):
        out = tmp_path / "out"
        code = main(["export", "--model", str(source), *argv, "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not out.exists()


@pytest.mark.parametrize("fmt, precision, tolerance", [("openvino", "fp32", 1e-4), ("openvino", "bf16", 0.1),
                                                       ("onnx", "fp32", 1e-4)])
def test_exported_networks_reproduce_torch(model, exported, fmt, precision, tolerance):
    torch_pipe, ov_pipe = load_pipeline(model), load_pipeline(exported[fmt, precision])
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
    for name, folder in (("torch", model), ("openvino", exported["openvino", "fp32"]), ("onnx", exported["onnx", "fp32"])):
        assert main(["detect", "--model", str(folder), str(photos), "--out", str(tmp_path / name)]) == 0
        with (tmp_path / name / "results.csv").open() as handle:
            results[name] = {r["file"]: r for r in csv.DictReader(handle)}
    for file, row in results["torch"].items():
        for backend in ("openvino", "onnx"):
            other = results[backend][file]
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


def test_an_exported_folder_without_its_backend_says_how_to_install_it(exported, tmp_path, capsys, monkeypatch):
    import sys

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(photos / "a.png")
    for module, fmt in (("openvino", "openvino"), ("onnxruntime", "onnx")):
        monkeypatch.setitem(sys.modules, module, None)  # `import openvino` raises ImportError, as when not installed
        code = main(["detect", "--model", str(exported[fmt, "fp32"]), str(photos), "--out", str(tmp_path / fmt)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "pip install 'diffad[openvino]'" in err[0], err
        assert not (tmp_path / fmt / "results.csv").exists()
        monkeypatch.undo()


def test_a_fresh_process_loads_the_exported_folder_and_push_checks_it(model, model_bf16, exported, tmp_path, capsys):
    """diffusers imports a component's module only when it is already imported: ``from diffad import
    SelfAwareInpaintPipeline`` must be enough, and ``diffad push`` must check the folder the way it will load."""
    import subprocess
    import sys

    folder = exported["openvino", "bf16"]
    code = ("import sys; from diffad import SelfAwareInpaintPipeline as P; p = P.from_pretrained(sys.argv[1]); "
            "print(type(p.unet).__name__, p.is_calibrated, p.unet.precision)")
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["OpenVINONetwork", "True", "bf16"]

    import shutil

    carded = tmp_path / "carded"
    shutil.copytree(folder, carded)
    (carded / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# card\n")
    assert main(["push", "--model", str(carded), "--repo-id", "acme/part-openvino", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "loads with diffusers and diffad.networks (SelfAwareInpaintPipeline" in out
    assert "  unet/openvino_model.bin\n" in out and "  export.json\n" in out


def test_calibrating_an_exported_folder_records_its_networks_precision(exported, synthetic_root, tmp_path, capsys):
    import shutil

    from diffad import SelfAwareInpaintPipeline
    from diffad.networks import OpenVINONetwork

    folder = tmp_path / "ov_fp32"
    shutil.copytree(exported["openvino", "fp32"], folder)
    base = ["calibrate", "--model", str(folder), "--data", str(synthetic_root), "--category", "weave"]
    assert main(base) == 0, capsys.readouterr().err  # --precision auto: the networks' fp32, even on a bf16 CPU
    pipe = SelfAwareInpaintPipeline.from_pretrained(folder)
    assert isinstance(pipe.unet, OpenVINONetwork) and (folder / "unet" / "openvino_model.bin").is_file()
    assert pipe.calibration.sampling.precision == "fp32" and pipe.calibration.sampling.preset_name == "fast"
    capsys.readouterr()
    assert main(base + ["--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds networks exported in fp32" in err[0], err


def test_evaluate_on_the_exported_folder_gives_torchs_metrics(model, exported, synthetic_root, tmp_path):
    metrics = {}
    for name, folder in (("torch", model), ("onnx", exported["onnx", "fp32"])):
        assert main(["evaluate", "--model", str(folder), "--data", str(synthetic_root), "--category", "weave",
                     "--methods", "self_aware", "--out", str(tmp_path / name), "--figure-rows", "0"]) == 0
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())["categories"]["weave"]
    assert set(metrics["onnx"]) == set(metrics["torch"]) and "self_aware/combined" in metrics["torch"]
    for kind, row in metrics["torch"].items():
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert abs(metrics["onnx"][kind][key] - row[key]) < 1e-3, (kind, key)


def test_the_space_of_an_exported_model_installs_its_backend(exported, tmp_path):
    from diffad.app import write_space

    write_space(exported["openvino", "bf16"], "acme/part-openvino", tmp_path / "space")
    assert (tmp_path / "space" / "requirements.txt").read_text().startswith("diffad[app,openvino]>=")


def test_openvino_compiles_each_batch_size_once_and_keeps_the_most_recent(exported, monkeypatch):
    import openvino

    from diffad import SelfAwareInpaintPipeline

    compiled = []

    class CountingCore(openvino.Core):
        def compile_model(self, *args, **kwargs):
            compiled.append(1)
            return super().compile_model(*args, **kwargs)

    monkeypatch.setattr(openvino, "Core", CountingCore)
    net = SelfAwareInpaintPipeline.from_pretrained(exported["openvino", "fp32"]).unet
    net.max_shapes = 2
    x = torch.randn(4, 6, 32, 32, generator=torch.Generator().manual_seed(2))
    first = {b: net(x[:b], 150).sample for b in (4, 1, 2)}  # 3 sizes: the oldest (4) is evicted
    assert len(compiled) == 3
    net(x[:2], 150)  # kept: not compiled again
    assert len(compiled) == 3
    again = net(x[:4], 150).sample  # compiled again, same numbers; now 1 is the oldest and goes
    assert len(compiled) == 4 and torch.equal(again, first[4])
    net(x[:1], 150)
    assert len(compiled) == 5
    assert torch.allclose(first[1], first[4][:1], atol=1e-5) and torch.allclose(first[2], first[4][:2], atol=1e-5)


def test_case13_a_network_running_another_precision_than_the_calibration_is_refused(exported, synthetic_root, tmp_path,
                                                                                   capsys):
    """Issue 23, case 13: another export's networks swapped in (or an edited config) never run unnoticed."""
    import shutil

    folder = tmp_path / "tampered"
    shutil.copytree(exported["openvino", "fp32"], folder)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(photos / "a.png")
    config_path = folder / "calibration" / "config.json"
    config = json.loads(config_path.read_text())
    assert config["sampling_config"]["precision"] == "fp32"
    config["sampling_config"]["precision"] = "bf16"  # as if the bf16 export's calibration met these fp32 networks
    config_path.write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["detect", "--model", str(folder), str(photos), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unet/ runs fp32 but it was calibrated in bf16" in err and err.count("\n") == 1
    # another export's unet/ swapped in: the bf16 export's networks under this fp32 calibration
    swapped = tmp_path / "swapped"
    shutil.copytree(exported["openvino", "fp32"], swapped)
    shutil.rmtree(swapped / "unet")
    shutil.copytree(exported["openvino", "bf16"] / "unet", swapped / "unet")
    assert main(["detect", "--model", str(swapped), str(photos), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "unet/ runs bf16 but it was calibrated in fp32" in err and err.count("\n") == 1
    # evaluate loads the folder its own way: it refuses the swapped networks too, before scoring anything
    code = main(["evaluate", "--model", str(swapped), "--data", str(synthetic_root), "--category", "weave",
                 "--methods", "self_aware", "--out", str(tmp_path / "eval"), "--figure-rows", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "unet/ runs bf16 but it was calibrated in fp32" in err and err.count("\n") == 1
    assert not (tmp_path / "eval" / "metrics.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "empty", "missing"])
def test_case18_a_broken_openvino_bin_is_one_line_naming_it_and_the_fix(exported, tmp_path, capsys, damage):
    """Issue 23, case 18: a broken ``openvino_model.bin`` gave OpenVINO's raw message, no path, no fix."""
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(exported["openvino", "fp32"], folder)
    weights = folder / "unet" / "openvino_model.bin"
    size = weights.stat().st_size
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes({"truncated": weights.read_bytes()[:size // 3], "empty": b"",
                             "overwritten": np.random.default_rng(0).bytes(size)}[damage])
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(photos / "a.png")
    capsys.readouterr()
    code = main(["detect", "--model", str(folder), str(photos), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"diffad detect: error: {weights}") and "export" in err and "Exception from src" not in err
    if damage != "missing":
        assert "broken or truncated" in err and "re-run `diffad export`" in err


def test_case18_export_into_a_symlinked_folder_works_and_a_failed_export_leaves_nothing(model, tmp_path, capsys,
                                                                                        monkeypatch):
    """Issue 23, case 18: an export into a symbolic link to a folder ran, then failed and left ``.incomplete``."""
    import os

    import diffad.export

    target = tmp_path / "disk" / "exports"
    target.mkdir(parents=True)
    link = tmp_path / "exports-link"
    os.symlink(target, link)
    assert main(["export", "--model", str(model), "--out", str(link)]) == 0
    assert link.is_symlink() and (target / "export.json").is_file() and load_pipeline(link).unet.format == "openvino"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk", "exports-link"]
    assert [p.name for p in target.parent.iterdir()] == ["exports"]

    def slow_then_fails(*args, **kwargs):
        raise AssertionError("the export ran: --out is checked first")

    monkeypatch.setattr(diffad.export, "load_pipeline", slow_then_fails)
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "nowhere", dangling)
    (tmp_path / "a-file").write_text("x")
    capsys.readouterr()
    for out, message in ((dangling, "is a symbolic link to"), (tmp_path / "a-file", "is a file"),
                         (link, "exists and is not empty")):
        code = main(["export", "--model", str(model), "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    monkeypatch.undo()

    def fails(*args, **kwargs):  # a converter that fails half way
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(diffad.export, "_convert", fails)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", "--model", str(model), "--out", str(tmp_path / "new" / "deeper" / "out")]) == 1
    assert "converter crashed" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing left behind"


def test_export_converts_on_the_cpu_even_where_commands_use_a_gpu(model, tmp_path, monkeypatch):
    """The commands load onto the GPU when there is one; export converts on the CPU, where the exported networks
    run. No GPU here: the device is faked and the pipeline's moves recorded."""
    import diffad.detect as detect_module
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    moved = []
    monkeypatch.setattr(detect_module, "inference_device", lambda: torch.device("cuda"))
    monkeypatch.setattr(SelfAwareInpaintPipeline, "to", lambda self, *a, **k: moved.append(a) or self)
    assert main(["export", "--model", str(model), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    assert moved == []
