"""``diffad export``: the networks of a trained, calibrated model in OpenVINO's or ONNX's format, for CPU stations.

``diffad export --model DIR --format openvino --precision bf16 --out DIR2`` writes a complete model folder: the
scheduler, the calibration, the card and the logs carried over, ``pipeline.py``, the UNet (and segmenter) converted
from the torch module by the backend's own converter (OpenVINO's ``convert_model``: ``<component>/openvino_model.xml``
+ ``.bin``; ``torch.onnx.export``: ``<component>/model.onnx``, run by onnxruntime), and ``export.json`` saying which
model, format, precision and calibration it holds.

The folder is a diffusers folder: ``model_index.json`` names each exported network ``["diffad.export",
"OpenVINONetwork"]`` (or ``"ONNXNetwork"``), a :class:`~diffusers.ModelMixin` whose ``from_pretrained`` compiles it,
so ``SelfAwareInpaintPipeline.from_pretrained(DIR2)`` -- and through it ``diffad detect``, ``evaluate`` and ``app``
-- runs the same sampler (the same ``pipeline.py``) with the exported networks.

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
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin  # diffusers finds the load method of our classes through ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

from diffad.hub import EXPORT_FILE

__all__ = ["EXPORT_FILE", "FORMATS", "ExportedNetwork", "ONNXNetwork", "OpenVINONetwork", "export_model",
           "is_exported", "register", "run"]

logger = logging.getLogger(__name__)

#: ``--format``: OpenVINO IR (fp32 or bf16 on CPU) or ONNX (fp32, run by onnxruntime).
FORMATS = ("openvino", "onnx")
INSTALL_HINT = "exported models need OpenVINO and onnxruntime: pip install 'diffad[openvino]'"
_NETWORKS = ("unet", "segmenter")
#: The key of a network's ``config.json`` that says how it was exported.
_EXPORT_KEY = "_diffad_export"


def _carried() -> tuple[str, ...]:
    """What an export copies as is: ``diffad push``'s allow-list, less the networks it converts."""
    from diffad.hub import COMPONENT_FILES, HUB_TOP_LEVEL_FILES

    return HUB_TOP_LEVEL_FILES + tuple(f"{c}/{f}" for c, files in COMPONENT_FILES.items() if c not in _NETWORKS
                                       for f in files)


def _backend(name: str):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


def is_exported(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder written by :func:`export_model`."""
    return (Path(folder) / EXPORT_FILE).is_file()


class _Traceable(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.net(sample, timestep).sample


class ExportedNetwork(ModelMixin, ConfigMixin):
    """A network exported from a ``UNet2DModel`` that answers like it: ``net(sample, timestep).sample`` (float32)
    and ``net.config``. diffusers' ``from_pretrained`` machinery loads it from ``<folder>/<component>``: the
    network's ``config.json`` (the torch model's config plus how it was exported) and the backend's files.

    It runs on the CPU with as many threads as torch (``torch.get_num_threads()``, so ``OMP_NUM_THREADS`` holds)."""

    config_name = "config.json"
    #: The backend's file inside the component folder.
    weights_name: str = ""
    format: str = ""

    def __init__(self, folder: str | os.PathLike, config: dict[str, Any], precision: str = "fp32"):
        super().__init__()
        self.register_to_config(**{k: v for k, v in config.items() if not k.startswith("_")})
        # no weights: a zero-size buffer gives the module its device and dtype (float32) for the pipeline.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self.folder = Path(folder)
        self.precision = precision
        weights = self.folder / self.weights_name
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing (model_index.json lists it): export the model again "
                                    "(diffad export)")
        self._compile(weights)

    def _compile(self, weights: Path) -> None:
        raise NotImplementedError

    def _run(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        **kwargs) -> "ExportedNetwork":
        """Load and compile the exported network in ``pretrained_model_name_or_path`` (``/subfolder``). diffusers'
        loading options (dtype, device map, ...) do not apply to a compiled network and are ignored."""
        folder = Path(pretrained_model_name_or_path) / (subfolder or "")
        config = json.loads((folder / cls.config_name).read_text(encoding="utf-8"))
        how = config.get(_EXPORT_KEY) or {}
        if how.get("format") != cls.format:
            raise ValueError(f"{folder / cls.config_name}: not a {cls.format} export ({_EXPORT_KEY}: {how!r}); "
                             "export the model again (diffad export)")
        return cls(folder, config, how.get("precision", "fp32"))

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Copy the exported network's files (config and backend files) to ``save_directory``."""
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        for file in self.folder.iterdir():
            if file.is_file() and file.resolve() != (save_directory / file.name).resolve():
                shutil.copyfile(file, save_directory / file.name)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int) -> UNet2DOutput:
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(int(timestep))
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        out = self._run(sample.detach().float().cpu().numpy(), t.long().cpu().numpy())
        return UNet2DOutput(sample=torch.from_numpy(np.asarray(out, dtype=np.float32)).to(sample.device))


class OpenVINONetwork(ExportedNetwork):
    """OpenVINO IR on CPU, with ``INFERENCE_PRECISION_HINT`` bf16 or f32 as exported.

    The IR has a dynamic batch size; each batch size met is compiled once with a static shape (about 10% faster
    than the dynamic one on this CPU, 0.3-0.8 s to compile), keeping the :attr:`max_shapes` most recent."""

    weights_name = "openvino_model.xml"
    format = "openvino"
    max_shapes = 4

    def _compile(self, weights: Path) -> None:
        ov = _backend("openvino")
        self._core = ov.Core()
        self._ir = self._core.read_model(str(weights))
        self._options = {"INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
                         "INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self._by_shape: dict[tuple[int, ...], Any] = {}

    def _run(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        shape = tuple(sample.shape)
        compiled = self._by_shape.pop(shape, None)
        if compiled is None:
            if len(self._by_shape) >= self.max_shapes:
                self._by_shape.pop(next(iter(self._by_shape)))  # the least recently used
            model = self._ir.clone()
            model.reshape({0: list(shape), 1: [shape[0]]})
            compiled = self._core.compile_model(model, "CPU", self._options)
        self._by_shape[shape] = compiled  # most recent last
        return compiled([sample, timestep])[0]


class ONNXNetwork(ExportedNetwork):
    """ONNX run by onnxruntime's CPU provider, in fp32."""

    weights_name = "model.onnx"
    format = "onnx"

    def _compile(self, weights: Path) -> None:
        ort = _backend("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(weights), options, providers=["CPUExecutionProvider"])

    def _run(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"sample": sample, "timestep": timestep})[0]


_CLASSES = {"openvino": OpenVINONetwork, "onnx": ONNXNetwork}


def _convert(net: torch.nn.Module, fmt: str, resolution: int, folder: Path) -> None:
    """Write ``net`` in ``fmt`` into ``folder`` with a dynamic batch size."""
    channels = net.config.in_channels
    example = (torch.zeros(2, channels, resolution, resolution), torch.tensor([0, 10]))
    module = _Traceable(net).eval()
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "openvino":
        ov = _backend("openvino")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings on diffusers' shape asserts
            ov_model = ov.convert_model(module, example_input=example)
        ov_model.reshape({0: [-1, channels, resolution, resolution], 1: [-1]})
        ov.save_model(ov_model, str(folder / OpenVINONetwork.weights_name), compress_to_fp16=False)
    else:
        for name in ("onnx", "onnxscript", "onnxruntime"):
            _backend(name)
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
    recalibrate first (``diffad calibrate --precision ...``)."""
    from diffad import __version__
    from diffad.detect import load_pipeline

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if precision not in (None, "bf16", "fp32"):
        raise ValueError(f"--precision must be bf16 or fp32, got {precision!r}")
    if fmt == "onnx" and precision == "bf16":
        raise ValueError("--format onnx runs in fp32 (onnxruntime has no bf16 convolutions on CPU): pass "
                         "--precision fp32, or --format openvino for bf16")
    backend = _backend("openvino" if fmt == "openvino" else "onnxruntime")
    model, out = Path(model), Path(out)
    if out.resolve() == model.resolve():
        raise ValueError("--out must be a new folder, not the model folder")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty: choose a new folder")
    pipe = load_pipeline(model)  # calibrated, finite weights
    if any(isinstance(getattr(pipe, name, None), ExportedNetwork) for name in _NETWORKS):
        raise ValueError(f"--model {model} is already exported: export the torch model folder it came from")
    fitted = pipe.calibration.sampling.precision
    precision = precision or fitted
    if fmt == "onnx" and fitted != "fp32":
        raise ValueError(f"--model {model} was calibrated in {fitted} and ONNX runs fp32: calibrate a copy with "
                         f"`diffad calibrate --precision fp32 ...` and export that, or use --format openvino")
    if precision != fitted:
        raise ValueError(f"--precision {precision}: {model} was calibrated in {fitted}, and the exported networks run "
                         f"at the calibration's precision; recalibrate a copy with `diffad calibrate --precision "
                         f"{precision} ...` and export that (or drop --precision)")
    tmp = out.with_name(f".{out.name}.incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in _carried():
        if (model / rel).is_file():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(model / rel, tmp / rel)
    index = json.loads((tmp / "model_index.json").read_text(encoding="utf-8"))
    exported = {}
    for name in _NETWORKS:
        net = getattr(pipe, name, None)
        if net is None:
            continue
        _convert(net, fmt, pipe.tile_size, tmp / name)  # the networks run on tiles
        config = {**dict(net.config), _EXPORT_KEY: {"format": fmt, "precision": precision, "source": model.name}}
        (tmp / name / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
        index[name] = [__name__, _CLASSES[fmt].__name__]
        exported[name] = f"{name}/{_CLASSES[fmt].weights_name}"
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    manifest = {"format": fmt, "precision": precision, "source": model.name, "diffad_version": __version__,
                f"{backend.__name__}_version": backend.__version__, "networks": exported,
                "calibration": {"sampling_config": pipe.calibration.sampling.to_dict(),
                                "note": "the torch model's calibration, carried over"}}
    (tmp / EXPORT_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


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
    parser.add_argument("--precision", default=None, choices=("bf16", "fp32"),
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
