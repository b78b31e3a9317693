"""``diffad export``: the networks of a trained, calibrated model in OpenVINO's format, for CPU inspection stations.

``diffad export --model DIR --format openvino --precision bf16 --out DIR2`` writes a complete model folder: the
scheduler, the calibration, the card and the logs carried over, ``pipeline.py``, and the UNet (and segmenter) as
OpenVINO IR (``<component>/openvino_model.xml`` + ``.bin``, converted from the torch module by OpenVINO's own
``convert_model``), plus ``export.json`` saying which model, format and precision it holds. ``diffad detect``,
``diffad evaluate`` and ``diffad app`` take that folder as ``--model`` and run the same sampler (the same
``pipeline.py`` code) with the exported networks; :func:`load_exported` does it in Python.

OpenVINO is an optional extra: ``pip install 'diffad[openvino]'``. The calibration is the torch model's: the
exported networks reproduce its outputs within float rounding in ``fp32`` and within bf16 rounding in ``bf16``
(``tests/test_export.py``; ``make bench-cpu`` measures the AUROC of each).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import torch

__all__ = ["EXPORT_FILE", "OpenVINONetwork", "export_model", "is_exported", "load_exported", "register", "run"]

logger = logging.getLogger(__name__)

EXPORT_FILE = "export.json"
INSTALL_HINT = "exported models need OpenVINO: pip install 'diffad[openvino]'"
_NETWORKS = ("unet", "segmenter")

def _carried() -> tuple[str, ...]:
    """What an export copies as is: ``diffad push``'s allow-list, less the networks it converts."""
    from diffad.hub import COMPONENT_FILES, HUB_TOP_LEVEL_FILES

    return HUB_TOP_LEVEL_FILES + tuple(f"{c}/{f}" for c, files in COMPONENT_FILES.items() if c not in _NETWORKS
                                       for f in files)


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return openvino


def is_exported(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder written by :func:`export_model`."""
    return (Path(folder) / EXPORT_FILE).is_file()


class _Traceable(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.net(sample, timestep).sample


class OpenVINONetwork:
    """A compiled OpenVINO network that answers like the ``UNet2DModel`` it came from:
    ``net(sample, timestep).sample`` (a float32 tensor) and ``net.config``."""

    def __init__(self, xml: Path, config: dict[str, Any], precision: str):
        ov = _openvino()
        hint = "bf16" if precision == "bf16" else "f32"
        self.compiled = ov.Core().compile_model(str(xml), "CPU", {"INFERENCE_PRECISION_HINT": hint})
        self.config = SimpleNamespace(**config)
        self.precision = precision
        self.dtype = torch.float32

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor) -> SimpleNamespace:
        t = timestep if isinstance(timestep, torch.Tensor) else torch.full((sample.shape[0],), int(timestep))
        out = self.compiled([sample.detach().float().cpu().numpy(), t.long().cpu().numpy()])[0]
        return SimpleNamespace(sample=torch.from_numpy(np.asarray(out, dtype=np.float32)).to(sample.device))

    def eval(self) -> "OpenVINONetwork":
        return self


def export_model(model: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "openvino",
                 precision: str = "bf16") -> Path:
    """Export the networks of the calibrated model folder ``model`` into the new model folder ``out``."""
    from diffad import __version__
    from diffad.detect import load_pipeline

    if fmt != "openvino":
        raise ValueError(f"--format must be openvino, got {fmt!r}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision must be bf16 or fp32, got {precision!r}")
    ov = _openvino()
    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise ValueError("--out must be a new folder, not the model folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: choose a new folder")
    pipe = load_pipeline(model)  # calibrated, finite weights
    tmp = out.with_name(f".{out.name}.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in _carried():
        if (model / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model / rel, tmp / rel)
    r = pipe.resolution
    exported = {}
    for name in _NETWORKS:
        net = getattr(pipe, name, None)
        if net is None:
            continue
        channels = net.config.in_channels
        example = (torch.zeros(2, channels, r, r), torch.tensor([0, 10]))
        with torch.no_grad():
            ov_model = ov.convert_model(_Traceable(net.eval()), example_input=example)
        ov_model.reshape({0: [-1, channels, r, r], 1: [-1]})
        (tmp / name).mkdir(parents=True, exist_ok=True)
        ov.save_model(ov_model, str(tmp / name / "openvino_model.xml"), compress_to_fp16=False)
        (tmp / name / "config.json").write_text(json.dumps(dict(net.config), indent=2, default=str))
        exported[name] = f"{name}/openvino_model.xml"
    manifest = {"format": "openvino", "precision": precision, "source": model.name, "diffad_version": __version__,
                "openvino_version": ov.__version__, "networks": exported,
                "calibration": {"sampling_config": pipe.calibration.sampling.to_dict(),
                                "note": "the torch model's calibration, carried over"}}
    (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def load_exported(folder: str | os.PathLike):
    """A :class:`~diffad.pipelines.self_aware_inpaint.SelfAwareInpaintPipeline` over an exported folder: the
    carried scheduler and calibration, the networks compiled by OpenVINO at the exported precision."""
    from diffusers import DDPMScheduler

    from diffad.pipelines.self_aware_inpaint import AnomalyCalibration, SelfAwareInpaintPipeline

    folder = Path(folder)
    manifest = json.loads((folder / EXPORT_FILE).read_text())
    if manifest.get("format") != "openvino":
        raise ValueError(f"{folder / EXPORT_FILE}: unknown format {manifest.get('format')!r}")
    nets: dict[str, Optional[OpenVINONetwork]] = {}
    for name in _NETWORKS:
        rel = manifest["networks"].get(name)
        if rel is None:
            nets[name] = None
            continue
        if not (folder / rel).is_file():
            raise FileNotFoundError(f"{folder / rel} is missing (export.json lists it): export the model again")
        config = json.loads((folder / name / "config.json").read_text())
        nets[name] = OpenVINONetwork(folder / rel, config, manifest["precision"])
    calibration = None
    if (folder / "calibration" / "config.json").is_file():
        calibration = AnomalyCalibration.from_pretrained(folder / "calibration", use_safetensors=True)
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    pipe = SelfAwareInpaintPipeline(unet=nets["unet"], scheduler=scheduler, segmenter=nets["segmenter"],
                                    calibration=calibration)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def register(subparsers) -> None:
    """Add ``diffad export`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "export", help="the networks in OpenVINO's format: a model folder detect, evaluate and app run faster on CPU",
        description="Write a complete model folder (calibration, card and logs carried over) with the UNet and the "
                    "segmenter converted to OpenVINO IR at the chosen precision.")
    parser.add_argument("--model", required=True, help="a calibrated model folder")
    parser.add_argument("--format", default="openvino", choices=("openvino",), help="the format (default: openvino)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="OpenVINO's inference precision on CPU (default: bf16)")
    parser.add_argument("--out", required=True, help="the new model folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad export``."""
    try:
        path = export_model(args.model, args.out, fmt=args.format, precision=args.precision)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    print(f"exported {args.model} to {path} (openvino, {args.precision})")
    return 0
