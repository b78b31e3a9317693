"""A pushed repo's `handler.py`: Inference Endpoints' `EndpointHandler` called as Endpoints call it, on a Hub-form
folder (assembled by `diffad push`, a model tiled at its working resolution), offline, in a fresh process where only diffusers is importable (not diffad):
bytes, a PIL image and base64 give `diffad detect`'s score and decision; given detect's renderer, the overlay is
detect's overlay file."""

from __future__ import annotations

import base64
import csv
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.detect import detect, format_score
from tiny_components import CHEAP_CONFIG, tiny_unet


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory) -> Path:
    """What `diffad push` uploads for a calibrated tiny model with a card, inspecting at a working resolution of
    48 px in 32 px tiles."""
    import torch
    from diffusers import DDPMScheduler

    from diffad.hub import assemble_hub_folder
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    root = tmp_path_factory.mktemp("handler")
    pipe = SelfAwareInpaintPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(1000, beta_schedule="sigmoid"),
                                    working_resolution=48)
    pipe.calibrate(torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1, config=CHEAP_CONFIG)
    model = root / "model"
    pipe.save_pretrained(model)
    (model / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# card\n")
    assemble_hub_folder(model, root / "repo")
    return root / "repo"


@pytest.fixture(scope="module")
def photo_and_row(hub_folder, tmp_path_factory) -> tuple[Path, dict]:
    """A non-square 16-bit grayscale photo (the reader scales and converts it) and detect's row for it."""
    folder = tmp_path_factory.mktemp("handler_photos")
    path = folder / "part.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 65535, (40, 52), dtype=np.uint16)).save(path)
    detect(hub_folder, [path], folder / "out")
    with (folder / "out" / "results.csv").open(newline="") as handle:
        row = next(csv.DictReader(handle))
    return path, {**row, "out": folder / "out"}


ENDPOINTS_CALL = textwrap.dedent("""
    import base64, importlib.util, io, json, sys
    sys.modules["diffad"] = None  # an Endpoints container: diffusers, no diffad
    from PIL import Image
    repo, photo = sys.argv[1], sys.argv[2]
    # as huggingface-inference-toolkit's check_and_register_custom_pipeline_from_directory loads a repo's handler.py
    spec = importlib.util.spec_from_file_location("handler.EndpointHandler", f"{repo}/handler.py")
    sys.path.insert(0, repo)
    module = importlib.util.module_from_spec(spec)
    sys.modules["handler.EndpointHandler"] = module
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(repo)
    data = open(photo, "rb").read()
    answers = [handler({"inputs": data}), handler({"inputs": Image.open(io.BytesIO(data))}),
               handler({"inputs": base64.b64encode(data).decode(), "parameters": {"overlay": True}}),
               handler({"inputs": "data:image/png;base64," + base64.b64encode(data).decode()})]
    errors = []
    for bad in ({"inputs": b"not an image"}, {"inputs": "%%%"}, {"nothing": 1}, {"inputs": data, "parameters": {"map": "learned"}}):
        try:
            handler(bad)
        except ValueError as exc:
            errors.append(str(exc))
    print(json.dumps({"answers": answers, "errors": errors}))
""")


def test_endpoints_call_with_diffusers_alone_gives_detects_verdict(hub_folder, photo_and_row, tmp_path):
    path, row = photo_and_row
    assert (hub_folder / "handler.py").is_file()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", ENDPOINTS_CALL, str(hub_folder), str(path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for answer in report["answers"]:
        assert format_score(answer["score"]) == row["score"]  # detect's float32, every bit
        assert answer["decision"] == row["decision"] and answer["map"] == "combined" and answer["error"] == ""
        assert isinstance(answer["threshold"], float)
    # no overlay renderer on Endpoints (the handler may not import diffad's commands): said so, never a silent gap
    assert report["answers"][2]["overlay_png"] is None and "no overlay renderer" in report["answers"][2]["overlay_error"]
    bad_image, bad_base64, no_inputs, bad_map = report["errors"]
    assert "not a readable image" in bad_image and "not base64" in bad_base64
    assert "'inputs'" in no_inputs and "parameters.map 'learned'" in bad_map


def test_handler_given_detects_renderer_draws_detects_overlay(hub_folder, photo_and_row):
    from diffad.detect import render_overlay

    path, row = photo_and_row
    spec = importlib.util.spec_from_file_location("pushed_handler", hub_folder / "handler.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pushed_handler"] = module
    spec.loader.exec_module(module)
    handler = module.EndpointHandler(str(hub_folder), render_overlay=render_overlay)
    answer = handler({"inputs": path.read_bytes(), "parameters": {"overlay": True}})
    assert format_score(answer["score"]) == row["score"]
    assert base64.b64decode(answer["overlay_png"]) == (row["out"] / row["overlay"]).read_bytes()


def test_push_writes_diffads_own_handler(hub_folder):
    from diffad.pipelines.self_aware_inpaint import inspection

    assert (hub_folder / "handler.py").read_bytes() == Path(inspection.__file__).read_bytes()
    import ast

    imported = set()
    for node in ast.walk(ast.parse((hub_folder / "handler.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            imported.add(node.module.split(".")[0])
    assert "diffad" not in imported and imported <= set(sys.stdlib_module_names) | {"numpy", "torch", "PIL", "diffusers"}
