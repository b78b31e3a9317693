"""The model-folder format: what a diffad model folder holds, under which names.

A model folder is a diffusers pipeline folder (``SelfAwareInpaintPipeline.save_pretrained``): ``model_index.json``
naming the components, one folder per component (``unet/``, ``scheduler/``, ``segmenter/``, ``calibration/``), the
pipeline package's own code (``pipeline.py`` and its siblings, :data:`CODE_FILES`; ``calibration/`` carries its
module, :data:`COMPONENT_CODE`); beside them the training logs, the model card (``README.md``) and, in a folder
written by ``diffad export``, ``export.json`` with OpenVINO or ONNX networks (:mod:`diffad.networks`) in place of
the torch weights. This module is the one place that knows those names: ``diffad push``'s allow-list, what an
export carries over, whether a folder is a model, is exported, and what its calibration holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from diffad.networks import NETWORK_CLASSES
from diffad.pipelines.self_aware_inpaint.folder import CALIBRATION_COMPONENT, CODE_FILES, COMPONENT_CODE, PIPELINE_FILE

__all__ = [
    "CALIBRATION_COMPONENT",
    "CARD_FILE",
    "CODE_FILES",
    "COMPONENT_CODE",
    "COMPONENT_FILES",
    "CONFIG_FILE",
    "EXPORT_FILE",
    "HANDLER_FILE",
    "HUB_TOP_LEVEL_FILES",
    "LOG_FILES",
    "MODEL_INDEX",
    "NETWORKS",
    "PIPELINE_FILE",
    "SEGMENTER_LOG",
    "TRAINING_LOG",
    "WEIGHTS_FILE",
    "calibration_config",
    "components",
    "is_exported",
    "read_json",
    "read_model_index",
    "require_model_folder",
]

MODEL_INDEX = "model_index.json"
#: The model card, written by ``diffad card``.
CARD_FILE = "README.md"
#: Written by ``training/train_ddpm.py`` and ``training/train_segmenter.py``.
TRAINING_LOG = "training_log.json"
SEGMENTER_LOG = "segmenter_log.json"
#: The logs, published with local paths replaced by their last part.
LOG_FILES = (TRAINING_LOG, SEGMENTER_LOG)
#: What ``diffad export`` writes into an exported model folder: which model, format, precision and calibration.
EXPORT_FILE = "export.json"
#: A component's config and torch weights (diffusers' names).
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
#: The components that are networks (torch weights, or exported by ``diffad export``).
NETWORKS = ("unet", "segmenter")

#: Inference Endpoints' entry point (``EndpointHandler``): diffad's own file, written by ``diffad push`` into every repo.
HANDLER_FILE = "handler.py"
#: The top-level files a Hub repo carries (the code: diffad's own, never the folder's; see :mod:`diffad.hub`).
HUB_TOP_LEVEL_FILES = (MODEL_INDEX, *CODE_FILES, CARD_FILE, *LOG_FILES, EXPORT_FILE, HANDLER_FILE)
_NETWORK_FILES = (CONFIG_FILE, WEIGHTS_FILE,
                  *dict.fromkeys(f for cls in NETWORK_CLASSES.values() for f in cls.files))  # torch, or exported
#: The only files shipped from each component folder (an allow-list: stray notes, notebooks' checkpoints, pickles
#: and caches stay behind).
COMPONENT_FILES: dict[str, tuple[str, ...]] = {
    **{name: _NETWORK_FILES for name in NETWORKS},
    "scheduler": ("scheduler_config.json",),
    CALIBRATION_COMPONENT: (CONFIG_FILE, WEIGHTS_FILE, *COMPONENT_CODE[CALIBRATION_COMPONENT]),
}


def require_model_folder(folder: str | os.PathLike, *, name: Optional[str] = None, fix: str = "") -> Path:
    """``folder`` as a Path when it holds a ``model_index.json``; else FileNotFoundError saying so (``name``: how
    the message names it, default the path; ``fix``: appended, e.g. ``"; train one with `diffad train` first"``)."""
    folder = Path(folder)
    if not (folder / MODEL_INDEX).is_file():
        raise FileNotFoundError(f"{name or folder} is not a diffad model folder (no {MODEL_INDEX}){fix}")
    return folder


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file of a model folder (index, configs, logs); ValueError naming the file when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc


def read_model_index(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``model_index.json`` of the model folder ``folder``.

    Raises:
        FileNotFoundError: not a model folder. ValueError: the index is not valid JSON.
    """
    return read_json(require_model_folder(folder) / MODEL_INDEX)


def components(index: dict[str, Any]) -> list[str]:
    """Component names of a model_index.json (entries ``[library, class]`` whose library is set), sorted."""
    return sorted(k for k, v in index.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None)


def is_exported(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a model folder written by ``diffad export`` (it holds :data:`EXPORT_FILE`)."""
    return (Path(folder) / EXPORT_FILE).is_file()


def calibration_config(folder: str | os.PathLike) -> Optional[dict[str, Any]]:
    """What the calibration component of ``folder`` holds, without loading weights: its ``config.json``
    (``AnomalyCalibration``'s ``sampling_config``, ``target_false_positive_rate``, ``threshold_names``,
    ``heldout_false_positive_rates``, ``num_images``, ...). None when the folder is not calibrated.

    Raises:
        ValueError: the calibration's config is not valid JSON.
    """
    path = Path(folder) / CALIBRATION_COMPONENT / CONFIG_FILE
    return read_json(path) if path.is_file() else None
