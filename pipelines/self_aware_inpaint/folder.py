# A saved pipeline folder (diffad, community-pipeline format): ships beside pipeline.py in every Hub repo; torch and
# the standard library.
"""What :meth:`SelfAwareInpaintPipeline.save_pretrained` writes besides the components, and the checks of loading.

diffusers runs a folder's remote code from two places. The pipeline: the top-level ``pipeline.py``, with every
sibling it imports relatively (``from .x import``); from a local folder diffusers copies only those ``pipeline.py``
imports itself, so it imports every module of :data:`CODE_FILES`, and the Hub serves each on request. A custom
component: ``<component>/<module>.py``, the module model_index.json names, and of a component folder holding weights
the Hub serves nothing else: the calibration's module (:data:`COMPONENT_MODULES`) imports no sibling.
``diffad.model_folder`` builds the folder format and ``diffad push``'s allow-list from these names.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Union

import torch

PIPELINE_FILE = "pipeline.py"  # the pipeline's module in every saved folder (model_index.json's ``_class_name``)
CALIBRATION_COMPONENT = "calibration"
#: The modules of this package a saved folder carries at its top level (the remote code of the pipeline).
CODE_FILES = (PIPELINE_FILE, "anomaly_calibration.py", "folder.py", "images.py", "maps.py", "tiles.py")
#: The module each custom component is loaded from, carried in the component's folder.
COMPONENT_MODULES = {CALIBRATION_COMPONENT: "anomaly_calibration"}
#: The files each custom component's folder carries besides its config and weights.
COMPONENT_CODE = {component: (f"{module}.py",) for component, module in COMPONENT_MODULES.items()}
_MODULES = {name[:-3] for name in CODE_FILES}  # model_index.json's library of a component saved as this code
_WEIGHTS = "diffusion_pytorch_model.safetensors"


def check_save_options(safe_serialization: bool, kwargs: Dict[str, Any]) -> None:
    """``ValueError`` for what :meth:`SelfAwareInpaintPipeline.save_pretrained` does not do."""
    if kwargs.get("push_to_hub"):
        raise ValueError("push_to_hub=True is not supported: save_pretrained(folder), then upload the folder "
                         "with `diffad push` or huggingface_hub.upload_folder")
    if not safe_serialization:
        raise ValueError("safe_serialization=False is not supported: diffad saves safetensors only")


def write_code(folder: Union[str, os.PathLike], pipeline_class: str = "SelfAwareInpaintPipeline") -> None:
    """Install this package's own :data:`CODE_FILES` in ``folder`` (and each custom component's module in its
    folder) and point its model_index.json at them: the pipeline at ``pipeline.py``'s ``pipeline_class``, the
    calibration at ``calibration/anomaly_calibration.py``; a local path (``_name_or_path``) is dropped."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in CODE_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(folder, name))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = [PIPELINE_FILE[:-3], pipeline_class]
    index.pop("_name_or_path", None)  # a local path means nothing on the Hub
    for component, module in COMPONENT_MODULES.items():
        entry = index.get(component)
        if isinstance(entry, list) and entry[0] is not None:
            index[component] = [module, entry[1]]
            shutil.copyfile(os.path.join(here, f"{module}.py"), os.path.join(folder, component, f"{module}.py"))
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


def point_at_modules(config: Any, classes: Dict[str, type]) -> None:
    """A read model_index.json pointed at the imported modules, so loading needs no remote code: ``_class_name``
    the class alone, and each component saved as this package's code (``["anomaly_calibration", ...]``, or
    ``["pipeline", ...]`` from a folder saved with one file) the module of its class in ``classes``."""
    if isinstance(config, dict) and isinstance(config.get("_class_name"), list):
        config["_class_name"] = config["_class_name"][1]
        for key, value in config.items():
            if isinstance(value, list) and len(value) == 2 and value[0] in _MODULES and value[1] in classes:
                config[key] = [classes[value[1]].__module__, value[1]]


def check_weight_files(folder: str) -> None:
    """``FileNotFoundError`` naming the file and what to do when a local ``folder``'s model_index.json lists a
    torch component (unet, segmenter, calibration) whose weights are missing."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        return
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    for name in ("unet", "segmenter", CALIBRATION_COMPONENT):
        entry = index.get(name)
        weights = os.path.join(folder, name, _WEIGHTS)
        torch_weights = isinstance(entry, list) and (entry[0] == "diffusers" or entry[0] in _MODULES)
        if torch_weights and not os.path.isfile(weights):
            fix = {"unet": "copy it back or retrain (training/train_ddpm.py)",
                   "segmenter": "copy it back or retrain it (training/train_segmenter.py)",
                   CALIBRATION_COMPONENT: f"recalibrate: `diffad calibrate --model {folder} ...`"}[name]
            raise FileNotFoundError(f"{weights} is missing (model_index.json lists a {name}): {fix}")


def check_finite_weights(pipe: Any, folder: str) -> None:
    """``ValueError`` when a loaded network or calibration holds NaN or infinite weights (a corrupt file: NaN maps
    would pass every part)."""
    for name in ("unet", "segmenter", CALIBRATION_COMPONENT):
        module = getattr(pipe, name, None)
        tensors = [] if module is None else [*module.parameters(), *module.buffers()]
        bad = sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())
        if bad:
            raise ValueError(f"{os.path.join(folder, name, _WEIGHTS)} holds {bad} NaN or infinite weights: the file "
                             "is corrupt; download it again or retrain")
