"""Saving and loading SelfAwareInpaintPipeline: natively with diffad, and as remote code where diffad is absent
(from the saved folder, and from the files of it the Hub serves)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel

from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
from diffad.pipelines.self_aware_inpaint.folder import CODE_FILES

from test_pipeline import QUICK, images
from tiny_components import tiny_pipeline as make_pipe

PACKAGE = Path(__file__).resolve().parents[1] / "pipelines" / "self_aware_inpaint"
CALIBRATION_CODE = "calibration/anomaly_calibration.py"


def assert_carries_diffads_code(folder: Path) -> None:
    """``folder`` holds this checkout's pipeline code, byte for byte, where diffusers' remote code looks for it."""
    for name in CODE_FILES:
        assert (folder / name).read_bytes() == (PACKAGE / name).read_bytes(), name
    assert (folder / CALIBRATION_CODE).read_bytes() == (PACKAGE / "anomaly_calibration.py").read_bytes()
    assert not (folder / "calibration" / "pipeline.py").exists()


# Run in a fresh interpreter where `import diffad` fails: only diffusers and the folder's code are available.
REMOTE_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["diffad"] = None  # the editable install stays on sys.path: block the package itself
    try:
        import diffad  # noqa: F401
        raise SystemExit("diffad must not be importable here")
    except ImportError:
        pass
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline
    torch.set_num_threads(1)
    folder, resaved, x_path, out_path = sys.argv[1:5]
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe).__name__ == "SelfAwareInpaintPipeline", type(pipe)
    assert not type(pipe).__module__.startswith("diffad"), type(pipe).__module__
    pipe.set_progress_bar_config(disable=True)
    x = torch.from_numpy(np.load(x_path))
    out = pipe(x, generator=torch.Generator().manual_seed(5))
    assert pipe(x[:1], config=pipe.calibration.sampling).scores["learned"].shape == (1,)  # the calibration's config
    pipe.save_pretrained(resaved)
    again = DiffusionPipeline.from_pretrained(resaved, trust_remote_code=True)
    again.set_progress_bar_config(disable=True)
    out2 = again(x, generator=torch.Generator().manual_seed(5))
    np.savez(out_path, maps=out.anomaly_maps["learned"], scores=out.scores["learned"],
             decisions=out.is_anomalous["learned"], masks=out.inpaint_masks, maps2=out2.anomaly_maps["learned"],
             has_segmenter=again.segmenter is not None)
""")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A calibrated pipeline with a segmenter, saved."""
    pipe = make_pipe(segmenter=True).calibrate(images(4, seed=1), config=QUICK, methods=("self_aware",),
                                                generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(folder)
    return folder


def expected_outputs(folder: Path):
    pipe = SelfAwareInpaintPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(images(2, seed=8), generator=torch.Generator().manual_seed(5))


def test_saved_folder_is_hub_ready(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SelfAwareInpaintPipeline"]
    assert index["calibration"] == ["anomaly_calibration", "AnomalyCalibration"]
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["segmenter"] == ["diffusers", "UNet2DModel"]
    assert "_name_or_path" not in index
    assert_carries_diffads_code(saved)
    assert (saved / "calibration" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(saved.rglob("*.bin")) and not list(saved.rglob("*.pkl"))


def test_native_round_trip_keeps_calibration_and_outputs(saved, tmp_path):
    original = make_pipe(segmenter=True).calibrate(images(4, seed=1), config=QUICK, methods=("self_aware",),
                                                    generator=torch.Generator().manual_seed(0))
    loaded = SelfAwareInpaintPipeline.from_pretrained(saved)
    assert type(loaded) is SelfAwareInpaintPipeline and loaded.is_calibrated
    assert torch.equal(loaded.calibration.q_threshold, original.calibration.q_threshold)
    assert torch.equal(loaded.calibration.thresholds, original.calibration.thresholds)
    public = lambda cal: {k: v for k, v in cal.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.calibration) == public(original.calibration)
    assert loaded.calibration.sampling == QUICK
    loaded.set_progress_bar_config(disable=True)
    x = images(2, seed=8)
    a = original(x, generator=torch.Generator().manual_seed(5))
    b = loaded(x, generator=torch.Generator().manual_seed(5))
    for name in ("multiscale", "learned", "noise_error", "combined"):
        np.testing.assert_allclose(a.anomaly_maps[name], b.anomaly_maps[name], atol=1e-6)
        np.testing.assert_array_equal(a.is_anomalous[name], b.is_anomalous[name])
    # save again from the loaded pipeline: still Hub-ready and loadable
    loaded.save_pretrained(tmp_path / "again")
    again = SelfAwareInpaintPipeline.from_pretrained(tmp_path / "again")
    assert torch.equal(again.calibration.q_threshold, original.calibration.q_threshold)


def _remote_code_outputs(folder: Path, tmp_path: Path):
    """:data:`REMOTE_SCRIPT` on ``folder`` in a fresh, isolated process (no diffad on its path; its own HF_HOME
    under ``tmp_path``): the maps, masks and decisions it wrote, after checking it exited cleanly."""
    x_path, out_path = tmp_path / "x.npy", tmp_path / "out.npz"
    np.save(x_path, images(2, seed=8).numpy())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-I", "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "resaved"),
                             str(x_path), str(out_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(out_path)


def test_remote_code_without_diffad_in_a_fresh_process(saved, tmp_path):
    expected = expected_outputs(saved)
    got = _remote_code_outputs(saved, tmp_path)
    np.testing.assert_allclose(got["maps"], expected.anomaly_maps["learned"], atol=1e-6)
    np.testing.assert_array_equal(got["masks"], expected.inpaint_masks)
    np.testing.assert_array_equal(got["decisions"], expected.is_anomalous["learned"])
    np.testing.assert_allclose(got["maps2"], expected.anomaly_maps["learned"], atol=1e-6)
    assert bool(got["has_segmenter"])
    # the folder re-saved by the remote-code pipeline is Hub-ready and loads natively too
    resaved = tmp_path / "resaved"
    index = json.loads((resaved / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SelfAwareInpaintPipeline"]
    assert index["calibration"] == ["anomaly_calibration", "AnomalyCalibration"]
    assert_carries_diffads_code(resaved)
    native = SelfAwareInpaintPipeline.from_pretrained(resaved)
    native.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(native(images(2, seed=8), generator=torch.Generator().manual_seed(5)
                                      ).anomaly_maps["learned"], expected.anomaly_maps["learned"], atol=1e-6)


def hub_served_copy(saved: Path, dest: Path) -> Path:
    """What ``DiffusionPipeline.from_pretrained(repo_id)`` downloads of a Hub repo holding ``saved``: the top level's
    files (``pipeline.py`` and, on request, the siblings it imports) and, of a component folder with weights, only its
    config, its weights and the module model_index.json names (diffusers' allow-patterns)."""
    index = json.loads((saved / "model_index.json").read_text())
    served = ("config.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors")
    for path in saved.rglob("*"):
        rel = path.relative_to(saved)
        if path.is_dir() or (len(rel.parts) == 2 and rel.name not in (*served, f"{index[rel.parts[0]][0]}.py")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_bytes(path.read_bytes())
    return dest


def test_the_files_the_hub_serves_load_alone_as_remote_code_and_score_the_same(saved, tmp_path):
    """The split pipeline code as the Hub serves it, copied alone to a fresh folder: a fresh process without diffad
    (so every module comes from the folder, through diffusers' remote-code loader) gives the same maps and decisions."""
    expected = expected_outputs(saved)
    served = hub_served_copy(saved, tmp_path / "served")
    assert sorted(p.name for p in (served / "calibration").iterdir()) == [
        "anomaly_calibration.py", "config.json", "diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in served.glob("*.py")) == sorted(CODE_FILES)
    got = _remote_code_outputs(served, tmp_path)
    np.testing.assert_allclose(got["maps"], expected.anomaly_maps["learned"], atol=1e-6)
    np.testing.assert_array_equal(got["decisions"], expected.is_anomalous["learned"])
    np.testing.assert_array_equal(got["masks"], expected.inpaint_masks)
    modules = sorted(p.name for p in (tmp_path / "hf_home" / "modules" / "diffusers_modules" / "local").glob("*.py"))
    assert set(CODE_FILES) <= set(modules), modules  # the remote code ran from the folder's files


def test_a_folder_saved_with_one_pipeline_file_loads_natively(saved, tmp_path):
    """Folders saved before the code was split name ``["pipeline", "AnomalyCalibration"]`` (and carry
    ``calibration/pipeline.py``): diffad loads them with its own modules."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps(dict(index, calibration=["pipeline", "AnomalyCalibration"])))
    for name in CODE_FILES[1:]:
        (old / name).unlink()
    (old / CALIBRATION_CODE).rename(old / "calibration" / "pipeline.py")
    loaded = SelfAwareInpaintPipeline.from_pretrained(old)
    assert type(loaded.calibration).__module__ == "diffad.pipelines.self_aware_inpaint.anomaly_calibration"
    loaded.set_progress_bar_config(disable=True)
    scores = loaded(images(2, seed=8), generator=torch.Generator().manual_seed(5)).scores["learned"]
    np.testing.assert_array_equal(scores, expected_outputs(saved).scores["learned"])


def test_a_calibration_of_diffad_0_1_says_recalibrate(saved, tmp_path):
    """diffad 0.1 stored no sampling config: a one-line error that says to recalibrate, no fallback."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    config_path = old / "calibration" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), sampling_config=None)))
    pipe = SelfAwareInpaintPipeline.from_pretrained(old)
    with pytest.raises(ValueError, match=r"^this calibration was made by diffad 0\.1: recalibrate \(`diffad "
                                         r"calibrate`\)$"):
        pipe(images(1, seed=8))


def test_remote_code_in_process(saved):
    pipe = DiffusionPipeline.from_pretrained(saved, trust_remote_code=True)
    assert type(pipe).__name__ == "SelfAwareInpaintPipeline" and pipe.is_calibrated


def test_uncalibrated_training_style_save(tmp_path):
    pipe = make_pipe()
    SelfAwareInpaintPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_pretrained(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "SelfAwareInpaintPipeline"]
    assert index["calibration"] == [None, None] and index["segmenter"] == [None, None]
    unet = UNet2DModel.from_pretrained(tmp_path / "out", subfolder="unet")
    assert unet.config.in_channels == 6
    loaded = SelfAwareInpaintPipeline.from_pretrained(tmp_path / "out")
    assert not loaded.is_calibrated and loaded.segmenter is None
    remote = DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert not remote.is_calibrated
    # calibrate the loaded pipeline, save over it: now carries the calibration
    loaded.set_progress_bar_config(disable=True)
    loaded.calibrate(images(4, seed=1), config=QUICK, methods=("denoise",))
    loaded.save_pretrained(tmp_path / "out")
    assert SelfAwareInpaintPipeline.from_pretrained(tmp_path / "out").calibration.threshold("denoise/multiscale") \
        == pytest.approx(loaded.calibration.threshold("denoise/multiscale"))


def test_unsupported_save_options(tmp_path):
    with pytest.raises(ValueError, match="push_to_hub"):
        make_pipe().save_pretrained(tmp_path / "x", push_to_hub=True)
    with pytest.raises(ValueError, match="safetensors"):
        make_pipe().save_pretrained(tmp_path / "x", safe_serialization=False)


def test_calibration_stores_the_heldout_scores_each_threshold_was_fitted_on(saved):
    from diffad.pipelines.self_aware_inpaint.pipeline import per_pixel_quantile

    cal = SelfAwareInpaintPipeline.from_pretrained(saved).calibration
    assert cal.config.stores_heldout_scores and tuple(cal.heldout_scores.shape) == (4, 4)  # 4 maps x 4 images
    fpr = cal.config.target_false_positive_rate
    for name in cal.config.threshold_names:
        scores = cal.heldout_scores_of(name)
        assert scores.shape == (4,) and scores.dtype == np.float32 and np.isfinite(scores).all()
        assert len(set(scores.tolist())) == 4  # four images, four scores: not a placeholder
        # the threshold is the (1 - target FPR) quantile of exactly these scores
        refit = float(per_pixel_quantile(torch.from_numpy(scores.astype(np.float64))[:, None, None], 1.0 - fpr))
        assert cal.threshold(name) == pytest.approx(refit, rel=1e-6), name
    assert cal.heldout_scores_of("self_aware/edges") is None and cal.heldout_scores_of("denoise/multiscale") is None


def test_a_calibration_saved_before_heldout_scores_loads_without_them(saved, tmp_path):
    """Folders calibrated before the scores were stored (no buffer, no config key) load and decide as before."""
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(saved, old)
    weights = old / "calibration" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["heldout_scores"]
    save_file(tensors, weights)
    config_path = old / "calibration" / "config.json"
    config = json.loads(config_path.read_text())
    del config["stores_heldout_scores"]
    config_path.write_text(json.dumps(config))
    new, loaded = SelfAwareInpaintPipeline.from_pretrained(saved), SelfAwareInpaintPipeline.from_pretrained(old)
    assert loaded.is_calibrated and "heldout_scores" not in loaded.calibration.state_dict()
    assert all(loaded.calibration.heldout_scores_of(n) is None for n in loaded.calibration.config.threshold_names)
    assert torch.equal(loaded.calibration.thresholds, new.calibration.thresholds)
    loaded.save_pretrained(tmp_path / "resaved")  # saved again: still without scores, still loads
    resaved = SelfAwareInpaintPipeline.from_pretrained(tmp_path / "resaved").calibration
    assert resaved.heldout_scores_of("self_aware/combined") is None
    loaded.set_progress_bar_config(disable=True)
    new.set_progress_bar_config(disable=True)
    x = images(1, seed=8)
    a = loaded(x, generator=torch.Generator().manual_seed(5)).scores["combined"]
    b = new(x, generator=torch.Generator().manual_seed(5)).scores["combined"]
    np.testing.assert_array_equal(a, b)
