"""The model-folder format has one owner (diffad.model_folder), and threshold names one builder (threshold_key)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffad.model_folder import (COMPONENT_FILES, calibration_config, components, is_exported, read_model_index,
                                 require_model_folder)
from diffad.networks import NETWORK_CLASSES
from diffad.pipelines.self_aware_inpaint import METHODS, threshold_key
from tiny_components import calibrate_cheaply, saved_tiny_pipeline, tiny_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("folders")
    return {"calibrated": saved_tiny_pipeline(root / "calibrated"),
            "uncalibrated": saved_tiny_pipeline(root / "uncalibrated", calibrated=False)}


def test_every_threshold_is_named_by_threshold_key():
    pipe = calibrate_cheaply(tiny_pipeline(segmenter=True))
    keys = [threshold_key(method, name) for method in METHODS for name in pipe.map_names(method)]
    assert sorted(pipe.calibration.config.threshold_names) == sorted(keys)
    assert all(pipe.calibration.threshold(key) is not None for key in keys)
    assert threshold_key("self_aware", "combined") == "self_aware/combined"


def test_a_folder_says_what_it_holds(folders, tmp_path):
    calibrated, uncalibrated = folders["calibrated"], folders["uncalibrated"]
    assert components(read_model_index(calibrated)) == ["calibration", "scheduler", "unet"]
    assert components(read_model_index(uncalibrated)) == ["scheduler", "unet"]
    assert calibration_config(uncalibrated) is None
    facts = calibration_config(calibrated)
    assert facts["target_false_positive_rate"] == 0.05 and facts["num_images"] == 4
    assert not is_exported(calibrated)
    with pytest.raises(FileNotFoundError, match=r"^--model X is not a diffad model folder \(no model_index.json\)"
                                                r"; train one$"):
        require_model_folder(tmp_path, name="--model X", fix="; train one")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        read_model_index(broken)


def test_push_ships_every_file_an_exported_network_needs():
    for name in ("unet", "segmenter"):
        for cls in NETWORK_CLASSES.values():
            assert set(cls.files) <= set(COMPONENT_FILES[name]), (name, cls.__name__)
    assert not any(f.endswith((".pt", ".pth", ".pkl", ".ckpt")) for files in COMPONENT_FILES.values() for f in files)
