"""``diffad export``: the networks of a trained, calibrated model in OpenVINO's or ONNX's format, for CPU stations.

``diffad export --model DIR --format openvino --precision bf16 --out DIR2`` writes a complete model folder: the
scheduler, the calibration, the card, the logs and the pipeline's code (``pipeline.py`` and its siblings) carried
over, the UNet (and segmenter) converted from the torch module by the backend's own converter (OpenVINO's
``convert_model``: ``<component>/openvino_model.xml`` + ``.bin``; ``torch.onnx.export``: ``<component>/model.onnx``,
run by onnxruntime), and ``export.json`` saying which model, format, precision and calibration it holds.

The folder is a diffusers folder: ``model_index.json`` names each exported network ``["diffad.networks",
"OpenVINONetwork"]`` (or ``"ONNXNetwork"``), a :class:`~diffusers.ModelMixin` whose ``from_pretrained`` compiles
it, so ``SelfAwareInpaintPipeline.from_pretrained(DIR2)`` -- and through it ``diffad detect``, ``evaluate`` and
``app`` -- runs the same sampler (the same pipeline code) with the exported networks.

The backends are an optional extra: ``pip install 'diffad[openvino]'``. The calibration is the torch model's: the
exported networks reproduce its outputs within float rounding in ``fp32`` and within bf16 rounding in ``bf16``
(``tests/test_export.py``; ``make bench-cpu`` measures the AUROC of each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from diffusers import ModelMixin  # noqa: F401  (with the classes below: diffusers loads old folders' networks)

from diffad import __version__
from diffad.detect import load_pipeline
from diffad.model_folder import COMPONENT_FILES, CONFIG_FILE, EXPORT_FILE, HUB_TOP_LEVEL_FILES, MODEL_INDEX, NETWORKS
# OpenVINONetwork and ONNXNetwork stay importable from here (and ModelMixin, through which diffusers finds their load
# method): folders exported before diffad.networks existed name ["diffad.export", ...] in their model_index.json.
from diffad.networks import EXPORT_KEY, FORMATS, NETWORK_CLASSES, ExportedNetwork, ONNXNetwork, OpenVINONetwork, backend
from diffad.precision import check_precision

__all__ = ["CARRIED", "export_model", "register", "run"]

logger = logging.getLogger(__name__)

#: ``--precision`` of an export: what the networks are built at (``auto`` would describe this machine, not them).
EXPORT_PRECISIONS = ("bf16", "fp32")

#: What an export copies as is: ``diffad push``'s allow-list, less the networks it converts.
CARRIED = HUB_TOP_LEVEL_FILES + tuple(f"{c}/{f}" for c, files in COMPONENT_FILES.items() if c not in NETWORKS
                                      for f in files)


class _Traceable(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.net(sample, timestep).sample


def _convert(net: torch.nn.Module, fmt: str, resolution: int, folder: Path) -> None:
    """Write ``net`` in ``fmt`` into ``folder`` with a dynamic batch size."""
    channels = net.config.in_channels
    example = (torch.zeros(2, channels, resolution, resolution), torch.tensor([0, 10]))
    module = _Traceable(net).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "openvino":
        ov = backend("openvino")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings on diffusers' shape asserts
            ov_model = ov.convert_model(module, example_input=example)
        ov_model.reshape({0: [-1, channels, resolution, resolution], 1: [-1]})
        ov.save_model(ov_model, str(folder / OpenVINONetwork.weights_name), compress_to_fp16=False)
    else:
        for name in ("onnx", "onnxscript", "onnxruntime"):
            backend(name)
        batch = torch.export.Dim("batch")
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # "torchvision is not installed" and the exporter's progress lines
        try:
            with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                torch.onnx.export(module, example, str(folder / ONNXNetwork.weights_name),
                                  input_names=["sample", "timestep"], output_names=["eps"],
                                  dynamic_shapes=({0: batch}, {0: batch}), dynamo=True, external_data=False,
                                  verbose=False)
        finally:
            quiet.setLevel(level)


def export_model(model: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "openvino",
                 precision: str | None = None) -> Path:
    """Export the networks of the calibrated model folder ``model`` into the new model folder ``out``: ``fmt`` is
    ``"openvino"`` (bf16 or fp32) or ``"onnx"`` (fp32 only: onnxruntime has no bf16 convolutions on CPU).

    The exported networks run at the precision the model was calibrated with (what is calibrated is what runs):
    ``precision`` (``"bf16"``/``"fp32"``, default: the calibration's) must be that one; to export at another,
    recalibrate first (``diffad calibrate --precision ...``).

    ``out`` is checked before anything is converted (:func:`_destination`); the folder is written under a temporary
    name beside it and renamed into place, and a failed export (or Ctrl-C) leaves nothing behind.

    Returns:
        ``out``.

    Raises:
        ValueError: a bad format or precision, an ``out`` that is not a new or empty folder diffad can write, a model
            already exported or calibrated at another precision.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if precision not in (None, *EXPORT_PRECISIONS):
        raise ValueError(f"--precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    if fmt == "onnx" and precision == "bf16":
        raise ValueError("--format onnx runs in fp32 (onnxruntime has no bf16 convolutions on CPU): pass "
                         "--precision fp32, or --format openvino for bf16")
    runtime = backend("openvino" if fmt == "openvino" else "onnxruntime")
    model = Path(model)
    target = _destination(model, Path(out))  # checked before the (long) export, not after it
    pipe = load_pipeline(model, device="cpu")  # calibrated, finite weights; converted on the CPU, where they run
    if any(isinstance(getattr(pipe, name, None), ExportedNetwork) for name in NETWORKS):
        raise ValueError(f"--model {model} is already exported: export the torch model folder it came from")
    check_precision(pipe, precision, str(model), here=False)  # the networks are built at the calibration's
    precision = pipe.calibration.sampling.precision
    if fmt == "onnx" and precision != "fp32":
        raise ValueError(f"--model {model} was calibrated in {precision} and ONNX runs fp32: calibrate a copy with "
                         f"`diffad calibrate --precision fp32 ...` and export that, or use --format openvino")
    tmp = target.with_name(f".{target.name}.incomplete")  # beside the real folder: one rename puts it in place
    shutil.rmtree(tmp, ignore_errors=True)
    created = [p for p in target.parents if not p.exists()]  # made by the export: removed again if it fails
    try:
        _write_export(pipe, model, tmp, fmt, precision, runtime)
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
    except BaseException:  # an error or Ctrl-C: nothing of this export is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return Path(out)


def _destination(model: Path, out: Path) -> Path:
    """The folder ``--out`` names, checked before anything is exported (``ValueError``, one line): a new or empty
    folder, not the model's, in a writable parent. A symbolic link to an empty folder exports into that folder (the
    link stays); a link to nothing, a file, or a folder with files is refused.

    Returns:
        The real path the export is written to (``out`` with a final symbolic link resolved).
    """
    target = out.resolve() if out.is_symlink() else out.absolute()
    if out.is_symlink() and not target.exists():
        raise ValueError(f"--out {out} is a symbolic link to {target}, which does not exist: create that folder, or "
                         "pass a new folder")
    if target.resolve() == model.resolve():
        raise ValueError("--out must be a new folder, not the model folder")
    if target.exists() and not target.is_dir():
        raise ValueError(f"--out {out} is a file: choose a new folder")
    if target.is_dir() and any(target.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: choose a new folder")
    parent = next((p for p in target.parents if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not a folder diffad can write in; choose another --out")
    return target


def _write_export(pipe, model: Path, tmp: Path, fmt: str, precision: str, runtime) -> None:
    """Write the exported model folder into ``tmp``: the carried files, the converted networks, ``export.json``."""
    for rel in CARRIED:
        if (model / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model / rel, tmp / rel)
    index = json.loads((tmp / MODEL_INDEX).read_text(encoding="utf-8"))
    exported = {}
    for name in NETWORKS:
        net = getattr(pipe, name, None)
        if net is None:
            continue
        _convert(net, fmt, pipe.tile_size, tmp / name)  # the networks run on tiles
        config = {**dict(net.config), EXPORT_KEY: {"format": fmt, "precision": precision, "source": model.name}}
        (tmp / name / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        index[name] = [NETWORK_CLASSES[fmt].__module__, NETWORK_CLASSES[fmt].__name__]
        exported[name] = f"{name}/{NETWORK_CLASSES[fmt].weights_name}"
    (tmp / MODEL_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")
    manifest = {"format": fmt, "precision": precision, "source": model.name, "diffad_version": __version__,
                f"{runtime.__name__}_version": runtime.__version__, "networks": exported,
                "calibration": {"sampling_config": pipe.calibration.sampling.to_dict(),
                                "note": "the torch model's calibration, carried over"}}
    (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def register(subparsers) -> None:
    """Add ``diffad export`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "export", help="the networks in OpenVINO's or ONNX's format: a model folder detect, evaluate and app run "
                       "faster on CPU",
        description="Write a complete model folder (calibration, card and logs carried over) with the UNet and the "
                    "segmenter converted to OpenVINO IR (fp32 or bf16) or ONNX (fp32, onnxruntime).")
    parser.add_argument("--model", required=True, help="a calibrated model folder")
    parser.add_argument("--format", default="openvino", choices=FORMATS,
                        help="openvino (fp32 or bf16) or onnx (fp32, onnxruntime) (default: openvino)")
    parser.add_argument("--precision", default=None, choices=EXPORT_PRECISIONS,
                        help="the networks' precision: the one the model was calibrated with (the default; another "
                             "is an error: recalibrate first); onnx runs fp32 only")
    parser.add_argument("--out", required=True, help="the new model folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad export``."""
    try:
        path = export_model(args.model, args.out, fmt=args.format, precision=args.precision)
    except ImportError as exc:
        raise ValueError(str(exc)) from None
    manifest = json.loads((path / EXPORT_FILE).read_text(encoding="utf-8"))
    print(f"exported {args.model} to {path} ({manifest['format']}, {manifest['precision']})")
    return 0
