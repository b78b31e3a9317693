"""training/train_segmenter.py: the learned anomaly map added to a trained, calibrated tiny pipeline.

End to end on the session's tiny DDPM (``trained_tiny_pipeline``, 32 px, synthetic default):
calibrated here cheaply (``CHEAP_CONFIG``, as ``diffad calibrate`` seeds it), then a segmenter
trained for a few steps on 8 synthetic anomalies. The loss functions and the cache key are checked
without any training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from diffad.training import train_segmenter as ts
from diffad.pipelines.self_aware_inpaint import image_generator
from tiny_components import CHEAP_CONFIG

NUM_SYNTHETIC = 8


def _args(model_dir: Path, cache_dir: Path, *extra: str):
    return ts.parse_args([
        "--model_dir", str(model_dir), "--cache_dir", str(cache_dir), "--num_synthetic", str(NUM_SYNTHETIC),
        "--max_train_steps", "3", "--train_batch_size", "4", "--reconstruction_batch_size", "8",
        "--cache_shard_size", "4", "--checkpointing_steps", "1000", "--seed", "0", *extra])


def _data(model_dir: Path) -> dict:
    return ts.resolve_data(ts.parse_args(["--model_dir", str(model_dir)]), model_dir)


def _validation_images(model_dir: Path, resolution: int) -> list:
    return ts.load_normal_images(_data(model_dir), resolution)[1]


@pytest.fixture(scope="module")
def calibrated_copy(trained_tiny_pipeline, tmp_path_factory) -> Path:
    """A private copy of the session's tiny pipeline, calibrated cheaply on its validation split, each image's
    noise seeded from the split seed and its pixels (as `diffad calibrate` does), for ``self_aware`` only."""
    from diffad import SelfAwareInpaintPipeline

    model_dir = tmp_path_factory.mktemp("segmenter") / "model"
    shutil.copytree(trained_tiny_pipeline, model_dir, ignore=shutil.ignore_patterns("checkpoint-*", "logs"))
    pipe = SelfAwareInpaintPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    val = _validation_images(model_dir, pipe.resolution)
    seed = _data(model_dir)["split_seed"]
    pipe.calibrate(val, config=CHEAP_CONFIG, methods=("self_aware",),
                   generator=[image_generator(seed, image) for image in val])
    pipe.save_pretrained(str(model_dir))
    return model_dir


@pytest.fixture(scope="module")
def trained(calibrated_copy) -> dict:
    """The segmenter trained into the calibrated copy (first run: builds the reconstruction cache), and the
    calibration it started from."""
    from diffad import SelfAwareInpaintPipeline

    before = SelfAwareInpaintPipeline.from_pretrained(str(calibrated_copy)).calibration
    cache_dir = calibrated_copy.parent / "cache"
    args = _args(calibrated_copy, cache_dir)
    out = ts.main(args)
    return {"model_dir": out, "cache_dir": cache_dir, "args": args, "log": json.loads((out / ts.LOG_NAME).read_text()),
            "q_threshold": before.q_threshold.clone(), "multiscale_threshold": before.threshold("self_aware/multiscale")}


# --------------------------------------------------------------------------- losses (no model)


def test_focal_loss_reduces_to_bce_and_down_weights_easy_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g) * 3
    targets = (torch.rand(2, 1, 8, 8, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(ts.focal_loss(logits, targets, gamma=0.0), bce, atol=1e-6)
    # gamma > 0 scales every pixel's BCE by (1 - p_t)^gamma <= 1
    assert ts.focal_loss(logits, targets, gamma=2.0) < bce
    # a confident correct pixel (p_t = sigmoid(5) = 0.9933) is down-weighted by (1 - p_t)^2 = 4.5e-5
    one = torch.tensor([[5.0]])
    expected = (1 - torch.sigmoid(one)) ** 2 * F.binary_cross_entropy_with_logits(one, torch.ones(1, 1))
    assert torch.allclose(ts.focal_loss(one, torch.ones(1, 1), gamma=2.0), expected.mean(), rtol=1e-5)
    # alpha weights defect pixels by alpha and normal ones by 1 - alpha
    pos, neg = torch.tensor([[0.0]]), torch.tensor([[0.0]])
    assert ts.focal_loss(pos, torch.ones(1, 1), alpha=0.25) == pytest.approx(0.25 * 0.25 * 0.6931472, rel=1e-5)
    assert ts.focal_loss(neg, torch.zeros(1, 1), alpha=0.25) == pytest.approx(0.75 * 0.25 * 0.6931472, rel=1e-5)
    parts = ts.segmentation_loss(logits, targets, gamma=2.0, bce_weight=0.5)
    assert torch.allclose(parts["loss"], parts["focal"] + 0.5 * parts["bce"])


def test_bad_flags_exit_2_with_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as err:
        ts.parse_args(["--model_dir", str(tmp_path), "--train_batch_size", "many"])
    assert err.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    rc = ts.run_with_clear_errors(lambda: ts.parse_args(["--model_dir", str(tmp_path), "--learning_rate", "0"]),
                                  ts.PROG)
    assert rc == 2 and "--learning_rate must be positive" in capsys.readouterr().err
    for flags, message in ((["--validation_share", "0.6"], "--validation_share must be in (0, 0.5)"),
                           (["--validation_steps", "0"], "--validation_steps must be positive")):
        rc = ts.run_with_clear_errors(lambda: ts.parse_args(["--model_dir", str(tmp_path), *flags]), ts.PROG)
        err_text = capsys.readouterr().err.strip()
        assert rc == 2 and message in err_text and len(err_text.splitlines()) == 1
    rc = ts.run_with_clear_errors(lambda: ts.main(ts.parse_args(["--model_dir", str(tmp_path / "nope")])), ts.PROG)
    err_text = capsys.readouterr().err.strip()
    assert rc == 2 and "not a pipeline folder" in err_text and len(err_text.splitlines()) == 1


def test_defect_flags_choose_the_synthetic_defects_and_bad_ones_exit_2(capsys, tmp_path):
    default = ts.make_synthesizer(ts.parse_args(["--model_dir", str(tmp_path)])).config
    assert default["kinds"] == ["scratch", "crack", "pit", "stain", "blob"] and "scale_range" not in default
    wide = ts.make_synthesizer(ts.parse_args(["--model_dir", str(tmp_path), "--defect_kinds", "pit,displace",
                                              "--defect_scale_range", "1,8"]))
    assert wide.config == {"kinds": ["pit", "displace"], "blobs": None, "scale_range": [1.0, 8.0]}
    image = torch.zeros(3, 64, 64)
    areas = [float(wide(image, kind="pit", generator=i)[1].sum()) for i in range(12)]
    small = ts.make_synthesizer(ts.parse_args(["--model_dir", str(tmp_path), "--defect_kinds", "pit"]))
    assert max(areas) > 2 * max(float(small(image, kind="pit", generator=i)[1].sum()) for i in range(12))
    for flags in (["--defect_kinds", "scratch,dent"], ["--defect_scale_range", "4,2"], ["--defect_scale_range", "2"]):
        with pytest.raises(SystemExit) as err:
            ts.parse_args(["--model_dir", str(tmp_path), *flags])
        assert err.value.code == 2
        message = capsys.readouterr().err.strip()
        assert len(message.splitlines()) == 1 and flags[0] in message


# --------------------------------------------------------------------------- the tiny pipeline


def test_uncalibrated_model_is_refused_with_exit_2(trained_tiny_pipeline, tmp_path, capsys):
    rc = ts.run_with_clear_errors(lambda: ts.main(_args(trained_tiny_pipeline, tmp_path / "cache")), ts.PROG)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.splitlines() == [err] and "is not calibrated" in err
    assert not (trained_tiny_pipeline / "segmenter").exists()
    assert not (tmp_path / "cache").exists()  # refused before any reconstruction


def test_cache_key_covers_synthesis_inference_weights_and_data(calibrated_copy):
    from diffad import SelfAwareInpaintPipeline
    from diffad.anomalies import AnomalySynthesizer

    pipe = SelfAwareInpaintPipeline.from_pretrained(str(calibrated_copy))
    images = torch.zeros(4, 3, 32, 32)
    names = ["train/good/000.png", "train/good/001.png", "train/good/002.png", "train/good/003.png"]

    def key(synth=None, num=16, sampling=None, imgs=images, seed=0):
        synthesis = {"synthesizer": (synth or AnomalySynthesizer()).config, "seed": seed, "num_synthetic": num}
        inference = ts.inference_settings(sampling or pipe.calibration.sampling)
        return ts.reconstruction_cache_key(pipe, calibrated_copy, synthesis=synthesis, inference=inference,
                                           train_images=imgs, train_file_names=names)[0]

    base = key()
    assert key() == base  # deterministic
    assert key(AnomalySynthesizer(normal_probability=0.3)) != base
    from diffad.defects import DefectSynthesizer

    assert key(DefectSynthesizer(kinds=("scratch", "pit"))) != key(DefectSynthesizer())
    assert key(AnomalySynthesizer(beta_range=(0.5, 1.0))) != base
    assert key(num=17) != base
    assert key(seed=1) != base
    from diffad.pipelines.self_aware_inpaint import SamplingConfig

    assert pipe.calibration.sampling == CHEAP_CONFIG
    assert key(sampling=SamplingConfig.thesis()) != base
    assert key(sampling=dataclasses.replace(CHEAP_CONFIG, reconstruction_steps=3)) != base
    # the calibration's own sampling config is hashed too (it decides the mask)
    stored = dict(pipe.calibration.config.sampling_config)
    pipe.calibration.register_to_config(sampling_config={**stored, "mask_percentile": 0.9})
    assert key(sampling=CHEAP_CONFIG) != base
    pipe.calibration.register_to_config(sampling_config=stored)
    assert key() == base
    edited = images.clone()
    edited[0, 0, 0, 0] = 0.5
    assert key(imgs=edited) != base
    # the folder a model was loaded from (diffusers writes it into config.json on re-save) does not change it
    config_path = calibrated_copy / "unet" / "config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["_name_or_path"] = "/somewhere/else/unet"
    config_path.write_text(json.dumps(config))
    try:
        assert key() == base
    finally:
        config_path.write_text(original)
    # new UNet weights change it
    from safetensors.torch import load_file, save_file

    weights_path = calibrated_copy / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights_path.read_bytes()
    weights = load_file(str(weights_path))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(weights_path))
    try:
        assert key() != base
    finally:
        weights_path.write_bytes(raw)
    assert key() == base
    # a new threshold map Q_p changes it; the image thresholds do not
    pipe.calibration.thresholds.add_(1.0)
    assert key() == base
    pipe.calibration.q_threshold.add_(1e-3)
    assert key() != base


def test_segmenter_is_saved_into_the_pipeline_and_the_learned_map_works(trained):
    import datasets
    from accelerate.utils import set_seed

    from diffad import SelfAwareInpaintPipeline
    from diffad.pipelines.self_aware_inpaint import default_mean_filter_size, mean_filter, segmenter_logits
    from diffad.presets import make_segmenter

    model_dir, log = trained["model_dir"], trained["log"]
    assert (model_dir / "segmenter" / "config.json").is_file()
    assert (model_dir / "segmenter" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((model_dir / "model_index.json").read_text())["segmenter"] == ["diffusers", "UNet2DModel"]
    summary = log["summary"]
    assert summary["total_optimizer_steps"] == 3 and summary["stopped_by"] == "max_train_steps"
    assert summary["cache_hit"] is False
    assert log["config"]["num_synthetic"] == NUM_SYNTHETIC
    assert log["config"]["sampling_config"] == CHEAP_CONFIG.to_dict() and log["config"]["sampling_preset"] is None
    assert 0.0 < log["config"]["synthetic_mask_share"] < 0.5  # some, not most, pixels are synthetic defects
    # the epoch log agrees with the step losses: 8 samples in batches of 4 = 2 steps per epoch, so epoch 0 holds
    # steps 1-2 and epoch 1 step 3; each loss is focal + 1.0 x BCE
    steps = summary["step_losses"]
    assert len(steps) == 3
    assert [e["train_loss"] for e in log["epochs"]] == pytest.approx([(steps[0] + steps[1]) / 2, steps[2]])
    assert [e["partial"] for e in log["epochs"]] == [False, True]
    for epoch in log["epochs"]:
        assert epoch["train_loss"] == pytest.approx(epoch["focal_loss"] + epoch["bce_loss"])

    pipe = SelfAwareInpaintPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    # the segmenter reads the image, its reconstruction and the noise error, on tiles of the DDPM's tile size
    assert pipe.segmenter.config.in_channels == 7 and pipe.segmenter.config.out_channels == 1
    assert pipe.segmenter.config.sample_size == pipe.tile_size
    # training fitted the synthetic set: the saved segmenter's loss on the cached samples is below the loss of its
    # initialisation (the script seeds it with set_seed(--seed) before make_segmenter)
    cached = datasets.load_from_disk(str(trained["cache_dir"] / f"segmenter-reconstructions-{log['config']['cache_key']}"))
    cached = cached.with_format("torch")[:]
    assert set(cached) >= {"image", "reconstruction", "noise_ratio", "mask"}
    assert all(float(m.sum()) > 0 for m in cached["mask"])  # every synthetic sample holds a defect
    set_seed(0)
    initial = make_segmenter(pipe.tile_size).eval()

    def loss_of(segmenter) -> float:
        with torch.no_grad():
            logits = segmenter_logits(segmenter, cached["image"].float(), cached["reconstruction"].float(),
                                      cached["noise_ratio"].float()[:, 0])
            return float(ts.segmentation_loss(logits, cached["mask"].float())["loss"])

    assert loss_of(pipe.segmenter) < loss_of(initial)
    # the weights kept are those of the best held-back loss (the last sample is held back: 15% of 8 rounds to 1)
    assert summary["num_heldout_synthetic"] == 1
    losses = dict((int(step), loss) for step, loss in summary["validation_losses"])
    assert summary["best_step"] == min(losses, key=losses.get)
    heldout = {k: v[-1:] for k, v in cached.items()}
    assert ts.heldout_loss(pipe.segmenter, heldout, pipe.tile_size, trained["args"]) == pytest.approx(
        summary["best_validation_loss"], rel=1e-5)

    # recalibrated with the segmenter: the same Q_p, sampling config and methods; every self-aware threshold
    cal = pipe.calibration
    assert summary["q_threshold_unchanged"] is True
    assert torch.equal(cal.q_threshold, trained["q_threshold"])
    assert cal.sampling == CHEAP_CONFIG
    assert list(cal.config.threshold_names) == ["self_aware/multiscale", "self_aware/learned", "self_aware/noise_error",
                                                "self_aware/combined"]
    # same images, noise and Q_p: the multi-scale scores, hence their threshold, are those of the first calibration
    assert cal.threshold("self_aware/multiscale") == pytest.approx(trained["multiscale_threshold"], rel=1e-6)
    threshold = cal.threshold("self_aware/learned")
    assert threshold == pytest.approx(summary["learned_threshold"])

    # the learned map is the segmenter's probability on (image, THE reconstruction returned, in [-1, 1])
    images = _validation_images(model_dir, pipe.resolution)[:3]
    out = pipe(images, generator=torch.Generator().manual_seed(0), output_type="pt")
    r = pipe.resolution
    assert out.anomaly_maps["learned"].shape == (3, r, r) and out.reconstructions.shape == (3, 3, r, r)
    size = cal.sampling.map_filter_size or default_mean_filter_size(r)
    with torch.no_grad():
        logits = segmenter_logits(pipe.segmenter, pipe.preprocess(images), out.reconstructions, out.noise_ratios)
    expected = mean_filter(torch.sigmoid(logits.float())[:, 0], size)
    assert torch.allclose(out.anomaly_maps["learned"], expected, atol=1e-6)
    assert torch.equal(out.scores["learned"], out.anomaly_maps["learned"].flatten(1).amax(dim=1))
    assert out.is_anomalous["learned"].tolist() == [bool(s > threshold) for s in out.scores["learned"]]


def test_rerun_reuses_the_cache_without_calling_the_ddpm(trained, monkeypatch):
    model_dir, cache_dir = trained["model_dir"], trained["cache_dir"]
    caches = sorted(p.name for p in cache_dir.iterdir())
    builds = [name for name in caches if not name.endswith(".lock")]  # the lock file stays, like detect's
    assert len(builds) == 1 and builds[0].startswith("segmenter-reconstructions-")

    def no_ddpm(*args, **kwargs):
        raise AssertionError("the rerun reconstructed images instead of reusing the cache")

    monkeypatch.setattr(ts, "reconstruct", no_ddpm)
    ts.main(_args(model_dir, cache_dir))
    log = json.loads((model_dir / ts.LOG_NAME).read_text())
    assert log["summary"]["cache_hit"] is True
    assert log["config"]["cache_key"] == trained["log"]["config"]["cache_key"]
    assert sorted(p.name for p in cache_dir.iterdir()) == caches  # nothing new written


def test_a_second_build_of_the_same_cache_waits_for_the_first_and_reuses_it(trained, tmp_path, monkeypatch):
    """Two trainings of one model into sibling folders share <parent>/.diffad_cache: without a lock the second
    deleted the first's partial shards mid-build (FileNotFoundError)."""
    import threading

    from diffad.files import file_lock

    model_dir, key = trained["model_dir"], trained["log"]["config"]["cache_key"]
    name = f"segmenter-reconstructions-{key}"
    calls = []
    monkeypatch.setattr(ts, "reconstruct", lambda *a, **k: calls.append(1) or pytest.fail("rebuilt the cache"))
    errors: list = []
    with file_lock(tmp_path / f"{name}.lock"):  # "the first process", still building
        worker = threading.Thread(target=lambda: _run_catching(errors, _args(model_dir, tmp_path)))
        worker.start()
        worker.join(timeout=3)
        assert worker.is_alive()  # the second waits on the lock instead of building next to the first
        shutil.copytree(trained["cache_dir"] / name, tmp_path / name)  # the first finishes its cache
    worker.join(timeout=120)
    assert not worker.is_alive() and errors == [] and calls == []
    log = json.loads((model_dir / ts.LOG_NAME).read_text())
    assert log["summary"]["cache_hit"] is True


def _run_catching(errors: list, args) -> None:
    try:
        ts.main(args)
    except BaseException as exc:  # noqa: BLE001  (reported to the test's thread)
        errors.append(exc)


def test_resume_from_latest_checkpoint_continues_the_step_count(trained, tmp_path):
    model_dir, cache_dir = trained["model_dir"], trained["cache_dir"]
    ckpt = tmp_path / "ckpt"
    ts.main(_args(model_dir, cache_dir, "--checkpoint_dir", str(ckpt), "--checkpointing_steps", "2",
                  "--max_train_steps", "2"))
    assert (ckpt / "checkpoint-2").is_dir()
    ts.main(_args(model_dir, cache_dir, "--checkpoint_dir", str(ckpt), "--checkpointing_steps", "2",
                  "--max_train_steps", "4", "--resume_from_checkpoint", "latest"))
    log = json.loads((model_dir / ts.LOG_NAME).read_text())
    assert log["summary"]["total_optimizer_steps"] == 4
    assert [r["global_step"] for r in log["summary"]["resumed_from"]] == [2]
    assert len(log["summary"]["step_losses"]) == 4


def test_interrupted_cache_build_resumes_from_complete_shards(trained, tmp_path, monkeypatch):
    import datasets

    model_dir = trained["model_dir"]
    real_reconstruct, calls = ts.reconstruct, []

    def crash_on_second_shard(pipe, images, generators, **kwargs):
        calls.append(images.shape[0])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_reconstruct(pipe, images, generators, **kwargs)

    monkeypatch.setattr(ts, "reconstruct", crash_on_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ts.main(_args(model_dir, tmp_path))
    partial = next(tmp_path.glob("segmenter-reconstructions-*.partial"))
    assert sorted(p.name for p in partial.iterdir() if p.name.startswith("shard-")) == ["shard-00000"]

    calls.clear()
    monkeypatch.setattr(ts, "reconstruct", lambda *a, **k: calls.append(a[1].shape[0]) or real_reconstruct(*a, **k))
    ts.main(_args(model_dir, tmp_path))
    assert calls == [NUM_SYNTHETIC - 4]  # only the missing shard (shard size 4) was reconstructed
    assert not partial.exists()
    # the resumed cache equals the one built in a single run (same key, same samples, same noise)
    key = trained["log"]["config"]["cache_key"]
    resumed = datasets.load_from_disk(str(tmp_path / f"segmenter-reconstructions-{key}")).with_format("torch")
    single = datasets.load_from_disk(str(trained["cache_dir"] / f"segmenter-reconstructions-{key}")).with_format("torch")
    for column in ("index", "source_index", "image", "reconstruction", "mask"):
        assert torch.equal(resumed[:][column], single[:][column]), column


def test_main_takes_a_config_object_as_well_as_a_command_line():
    """A mapping (or dataclass) of flag names parses as the same command line would, with the same checks."""
    from diffad.training.train_segmenter import parse_args, resolve_args

    argv = ["--model_dir", "m", "--num_synthetic", "40", "--segmenter_block_out_channels", "8,16"]
    config = {"model_dir": "m", "num_synthetic": 40, "segmenter_block_out_channels": "8,16"}
    assert vars(resolve_args(config)) == vars(parse_args(argv)) == vars(resolve_args(argv))
    with pytest.raises(ValueError, match="'model_dir' .* is required"):
        resolve_args({"num_synthetic": 40})
    with pytest.raises(ValueError, match="--validation_share"):
        resolve_args({"model_dir": "m", "validation_share": 1.5})
