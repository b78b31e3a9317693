"""The runtime networks of a ``diffad export`` folder: OpenVINO IR or ONNX networks as diffusers components.

``model_index.json`` of an exported folder names each network ``["diffad.networks", "OpenVINONetwork"]`` (or
``"ONNXNetwork"``): a :class:`~diffusers.ModelMixin` whose ``from_pretrained`` compiles the backend's files, so
``SelfAwareInpaintPipeline.from_pretrained`` runs the same sampler with the exported networks. The pipeline package
imports this module (diffusers loads a component's class only from an imported module), so it imports nothing of
diffad: only numpy, torch and diffusers; OpenVINO and onnxruntime are imported when a network is compiled.

``diffad export`` (:mod:`diffad.export`) writes these folders.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin  # diffusers finds the load method of our classes through ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput

__all__ = ["EXPORT_KEY", "FORMATS", "INSTALL_HINT", "NETWORK_CLASSES", "ExportedNetwork", "ONNXNetwork",
           "OpenVINONetwork", "backend"]

#: ``--format``: OpenVINO IR (fp32 or bf16 on CPU) or ONNX (fp32, run by onnxruntime).
FORMATS = ("openvino", "onnx")
INSTALL_HINT = "exported models need OpenVINO and onnxruntime: pip install 'diffad[openvino]'"
#: The key of a network's ``config.json`` that says how it was exported.
EXPORT_KEY = "_diffad_export"


def backend(name: str):
    """Import the backend module ``name`` (``openvino``, ``onnxruntime``, ...); ImportError: :data:`INSTALL_HINT`."""
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(INSTALL_HINT) from None


class ExportedNetwork(ModelMixin, ConfigMixin):
    """A network exported from a ``UNet2DModel`` that answers like it: ``net(sample, timestep).sample`` (float32)
    and ``net.config``. diffusers' ``from_pretrained`` machinery loads it from ``<folder>/<component>``: the
    network's ``config.json`` (the torch model's config plus how it was exported) and the backend's files.

    It runs on the CPU with as many threads as torch (``torch.get_num_threads()``, so ``OMP_NUM_THREADS`` holds)."""

    config_name = "config.json"
    #: The backend's file inside the component folder.
    weights_name: str = ""
    #: Every file the backend reads from the component folder, besides ``config.json``.
    files: tuple[str, ...] = ()
    format: str = ""

    def __init__(self, folder: str | os.PathLike, config: dict[str, Any], precision: str = "fp32"):
        super().__init__()
        self.register_to_config(**{k: v for k, v in config.items() if not k.startswith("_")})
        # no weights: a zero-size buffer gives the module its device and dtype (float32) for the pipeline.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self.folder = Path(folder)
        self.precision = precision
        #: How the network was exported (``config.json``'s ``_diffad_export``: format, precision, source model).
        self.export_info: dict[str, Any] = dict(config.get(EXPORT_KEY) or {})
        for name in self.files or (self.weights_name,):
            if not (self.folder / name).is_file():
                raise FileNotFoundError(f"{self.folder / name} is missing (model_index.json lists it): export the "
                                        "model again (diffad export)")
        self._compile(self.folder / self.weights_name)

    def _broken(self, error: BaseException) -> ValueError:
        """The one-line error for backend files that exist but cannot be read (truncated, overwritten, mixed)."""
        reason = re.split(r"\.[ch]pp:\d+:\s*", " ".join(str(error).split()))[-1]
        reason = reason if len(reason) <= 120 else reason[:117] + "..."
        source = self.export_info.get("source")
        files = " + ".join(self.files or (self.weights_name,))
        return ValueError(f"{self.folder / self.files[-1]}: the exported {self.format} network ({files}) is broken "
                          f"or truncated ({type(error).__name__}: {reason}); re-run `diffad export` on the torch model "
                          f"folder it came from{f' ({source})' if source else ''} into a new --out")

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
        how = config.get(EXPORT_KEY) or {}
        if how.get("format") != cls.format:
            raise ValueError(f"{folder / cls.config_name}: not a {cls.format} export ({EXPORT_KEY}: {how!r}); "
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
    files = ("openvino_model.xml", "openvino_model.bin")
    format = "openvino"
    max_shapes = 4

    def _compile(self, weights: Path) -> None:
        ov = backend("openvino")
        self._core = ov.Core()
        try:
            self._ir = self._core.read_model(str(weights))
        except RuntimeError as exc:  # OpenVINO's checks of the .xml and .bin: "Incorrect weights in bin file!"
            raise self._broken(exc) from None
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
            try:
                model.reshape({0: list(shape), 1: [shape[0]]})
                compiled = self._core.compile_model(model, "CPU", self._options)
            except RuntimeError as exc:  # weights that read but do not make a network (e.g. overwritten constants)
                raise self._broken(exc) from None
        self._by_shape[shape] = compiled  # most recent last
        return compiled([sample, timestep])[0]


class ONNXNetwork(ExportedNetwork):
    """ONNX run by onnxruntime's CPU provider, in fp32."""

    weights_name = "model.onnx"
    files = ("model.onnx",)
    format = "onnx"

    def _compile(self, weights: Path) -> None:
        ort = backend("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self._session = ort.InferenceSession(str(weights), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) per version
            raise self._broken(exc) from None

    def _run(self, sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"sample": sample, "timestep": timestep})[0]


#: ``--format`` -> the network class that runs it.
NETWORK_CLASSES: dict[str, type[ExportedNetwork]] = {"openvino": OpenVINONetwork, "onnx": ONNXNetwork}
