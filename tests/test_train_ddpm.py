"""training/train_ddpm.py, diffad.presets and diffad.training_utils.

Fast tests check the presets, the diffusion maths, the crash-safety helpers and the flag
handling in-process; slow ones (``make test-slow``) train tiny models in subprocesses: the
loss falls, the output reloads offline with stock diffusers, a SIGKILLed run resumes to the
same number of optimiser steps, and a real two-rank gloo run splits the data in half.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffad.presets import (UNET_PRESETS, count_parameters, make_scheduler, make_segmenter, make_unet,
                            preset_defaults)
from diffad.errors import run_with_clear_errors
from diffad.files import atomic_write_json, commit_directory, incomplete_path, remove_incomplete
from diffad.training_utils import (CHECKPOINT_MARKER, TrainingLog, augment_batch, checkpoint_step, latest_checkpoint,
                                   list_checkpoints, rotate_checkpoints)
from diffad.pipelines.self_aware_inpaint import NoiseSchedule, seeded_generator
from diffad.training.train_ddpm import PROG, parse_args, resolve_resume, self_conditioned_eps

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "training" / "train_ddpm.py"


def _env(**extra: str) -> dict:
    # One OpenMP thread per process: on a shared 2-core machine two threads are many times slower.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def _train_cmd(data_root: Path, out: Path, *extra: str) -> list:
    from diffad.synthetic import SYNTHETIC_CATEGORIES

    return [sys.executable, str(SCRIPT), "--data_dir", str(data_root), "--category", SYNTHETIC_CATEGORIES[0],
            "--preset", "tiny", "--resolution", "32", "--train_batch_size", "4", "--seed", "0",
            "--report_to", "none", "--output_dir", str(out), *extra]


def _make_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if complete:
        atomic_write_json(path / CHECKPOINT_MARKER, {"state": {"global_step": step}})
    return path


# --------------------------------------------------------------------------- presets


def test_preset_parameter_counts():
    with torch.device("meta"):
        counts = {name: count_parameters(make_unet(name)) for name in UNET_PRESETS}
    assert counts["tiny"] < 1_000_000
    assert 5_000_000 <= counts["small"] <= 15_000_000
    assert abs(counts["thesis"] - 271_000_000) / 271_000_000 < 0.02  # the thesis's ~271M
    assert counts == {"tiny": 687_779, "small": 6_339_363, "thesis": 274_877_699, "cpu": 637_475}
    assert make_unet("cpu").config.sample_size == 64  # the cpu preset's UNet is built for its 64 px crops


def test_thesis_preset_matches_the_thesis(tmp_path):
    """The thesis preset builds what the thesis describes and the training script resolves its defaults."""
    with torch.device("meta"):
        unet = make_unet("thesis")
    assert (unet.config.in_channels, unet.config.out_channels, unet.config.layers_per_block) == (6, 3, 2)
    # self-attention exactly where the feature maps are 32 and 16 px (each level halves the 256 px input)
    sizes = [256 // 2 ** i for i in range(len(unet.down_blocks))]
    assert [s for s, block in zip(sizes, unet.down_blocks) if hasattr(block, "attentions")] == [32, 16]
    assert [s for s, block in zip(reversed(sizes), unet.up_blocks) if hasattr(block, "attentions")] == [16, 32]
    # the script's flags fall back to the preset: Adam, lr 2e-5, batch 16, 500 epochs at 256 px (thesis, §4)
    args = parse_args(["--data_dir", str(tmp_path), "--category", "c", "--output_dir", str(tmp_path / "o"),
                       "--preset", "thesis"])
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.num_epochs, args.optimizer) == (
        256, 16, 2e-5, 500, "adam")
    small = parse_args(["--data_dir", str(tmp_path), "--category", "c", "--output_dir", str(tmp_path / "o"),
                        "--preset", "thesis", "--learning_rate", "1e-4"])
    assert small.learning_rate == 1e-4 and small.num_epochs == 500  # a flag overrides only itself


def test_make_unet_overrides_and_forward():
    torch.manual_seed(0)
    unet = make_unet("tiny", resolution=64, block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=2)
    assert unet.config.sample_size == 64 and tuple(unet.config.block_out_channels) == (8, 16)
    out = unet(torch.randn(2, 6, 64, 64), torch.tensor([0, 999])).sample
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("overrides, match", [
    ({"resolution": 30}, "multiple of 4"),
    ({"block_out_channels": (12, 24, 48)}, "divisible by norm_num_groups=8"),
    ({"layers_per_block": 0}, "layers_per_block"),
])
def test_make_unet_rejects_bad_shapes(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_unet("tiny", **overrides)
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_unet("huge")


def test_scheduler_and_segmenter():
    sched = make_scheduler()
    assert sched.config.num_train_timesteps == 1000 and sched.config.beta_schedule == "sigmoid"
    assert float(sched.alphas_cumprod[300]) == pytest.approx(0.844, abs=2e-3)  # diffusers' sigmoid schedule
    seg = make_segmenter(32)  # the head: image, reconstruction and log(Q / Q_p)
    assert seg.config.in_channels == 7 and seg.config.out_channels == 1
    assert seg(torch.randn(1, 7, 32, 32), 0).sample.shape == (1, 1, 32, 32)
    assert make_segmenter(32, in_channels=6).config.in_channels == 6  # the thesis's (image, reconstruction)
    with pytest.raises(ValueError, match="multiple of 4"):
        make_segmenter(30)
    with pytest.raises(ValueError, match="in_channels must be 6"):
        make_segmenter(32, in_channels=5)


# --------------------------------------------------------------------------- diffusion maths


def test_estimate_x0_inverts_add_noise():
    sched = make_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 1.8 - 0.9
    eps = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 50, 350, 999])
    x_t = sched.add_noise(x0, eps, t)
    torch.testing.assert_close(NoiseSchedule(sched.alphas_cumprod).estimate_x0(x_t, eps, t), x0, atol=2e-3, rtol=0)


def test_self_conditioning_feeds_the_no_grad_estimate_back():
    """The second pass sees [x_t, x0_hat] with x0_hat from the first (no-grad) pass; without
    self-conditioning the extra channels are zeros. Gradients reach the weights only once."""
    torch.manual_seed(0)
    unet = make_unet("tiny", block_out_channels=(8, 16), norm_num_groups=4, resolution=16)
    sched = make_scheduler()
    seen = []
    unet.register_forward_pre_hook(lambda m, a: seen.append((a[0][:, 3:].detach().clone(), torch.is_grad_enabled())))
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])

    self_conditioned_eps(unet, x_t, t, sched.alphas_cumprod, self_condition=False)
    assert len(seen) == 1 and torch.equal(seen[0][0], torch.zeros(2, 3, 16, 16)) and seen[0][1]

    seen.clear()
    eps = self_conditioned_eps(unet, x_t, t, sched.alphas_cumprod, self_condition=True)
    assert [grad for _, grad in seen] == [False, True]
    with torch.no_grad():
        first = unet(torch.cat([x_t, torch.zeros_like(x_t)], 1), t).sample
    torch.testing.assert_close(seen[1][0], NoiseSchedule(sched.alphas_cumprod).estimate_x0(x_t, first, t))
    assert seen[1][0].abs().max() <= 1.0 and seen[1][0].abs().sum() > 0
    eps.pow(2).mean().backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_augment_batch_is_seeded_per_sample():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    assert augment_batch(x, seeded_generator(0)) is x  # off by default
    a = augment_batch(x, seeded_generator(0, 3), flip=True, rot90=True)
    b = augment_batch(x, seeded_generator(0, 3), flip=True, rot90=True)
    assert torch.equal(a, b) and a.shape == x.shape
    # each output is a flip/rotation of its own input: same pixel multiset
    for i in range(2):
        assert torch.equal(a[i].flatten().sort().values, x[i].flatten().sort().values)
    outs = {augment_batch(x, seeded_generator(0, s), flip=True, rot90=True)[0].flatten().tolist().__repr__()
            for s in range(20)}
    assert len(outs) > 3  # really random across batches


# --------------------------------------------------------------------------- crash safety


def test_latest_checkpoint_ignores_half_written(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    _make_checkpoint(tmp_path, 5)
    _make_checkpoint(tmp_path, 20)
    _make_checkpoint(tmp_path, 30, complete=False)  # a checkpoint-N folder without the marker
    incomplete_path(tmp_path / "checkpoint-40").mkdir()  # a save killed before its rename
    (tmp_path / "checkpoint-50").write_text("not a folder")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-20"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-20"]
    removed = remove_incomplete(tmp_path)
    assert removed == [incomplete_path(tmp_path / "checkpoint-40")]


def test_rotate_and_commit(tmp_path):
    for step in (10, 20, 30):
        _make_checkpoint(tmp_path, step)
    deleted = rotate_checkpoints(tmp_path, 2)
    assert [p.name for p in deleted] == ["checkpoint-10"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]
    assert rotate_checkpoints(tmp_path, None) == []

    tmp = incomplete_path(tmp_path / "unet")
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "a.txt").write_text("old")
    commit_directory(tmp, tmp_path / "unet")
    assert (tmp_path / "unet" / "a.txt").read_text() == "new" and not tmp.exists()
    assert not [p for p in tmp_path.iterdir() if "old-" in p.name]


def test_atomic_write_json_and_training_log(tmp_path):
    log = TrainingLog({"block_out_channels": (16, 32), "path": tmp_path, "lr": float("nan")})
    log.add_epoch({"epoch": 0, "train_loss": torch.tensor(0.5)})
    log.add_epoch({"epoch": 1, "train_loss": 0.25})
    log.add_epoch({"epoch": 1, "train_loss": 0.2})  # re-recorded after a resume: replaced
    log.save(tmp_path / "training_log.json")
    data = json.loads((tmp_path / "training_log.json").read_text())
    assert data["config"]["block_out_channels"] == [16, 32] and data["config"]["lr"] == "nan"
    assert [e["train_loss"] for e in data["epochs"]] == [0.5, 0.2]
    assert [p.name for p in tmp_path.iterdir()] == ["training_log.json"]  # no temporary left


def test_resolve_resume(tmp_path):
    args = parse_args(["--preset", "tiny", "--resume_from_checkpoint", "latest", "--output_dir", str(tmp_path)])
    assert resolve_resume(args, tmp_path) is None  # nothing yet: a fresh start
    _make_checkpoint(tmp_path, 7)
    _make_checkpoint(tmp_path, 9, complete=False)
    assert resolve_resume(args, tmp_path) == tmp_path / "checkpoint-7"
    args.resume_from_checkpoint = str(tmp_path / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(args, tmp_path)


# --------------------------------------------------------------------------- flags


def test_preset_defaults_and_overrides():
    args = parse_args([])  # `diffad train` with no flags: the CPU default, a step budget on 64 px crops of 256 px
    assert (args.preset, args.resolution, args.crop_size, args.learning_rate, args.train_batch_size,
            args.max_train_steps, args.optimizer, args.use_ema) == ("cpu", 256, 64, 1e-3, 16, 1500, "adam", True)
    assert not args.random_flip and not args.random_rot90
    args = parse_args(["--preset", "thesis"])
    assert (args.learning_rate, args.train_batch_size, args.num_epochs, args.max_train_steps, args.crop_size,
            args.use_ema) == (2e-5, 16, 500, None, 256, False)
    # another working resolution than the preset's trains on whole images unless a crop is given
    assert parse_args(["--resolution", "128"]).crop_size == 128
    assert parse_args(["--resolution", "128", "--crop_size", "32"]).crop_size == 32
    args = parse_args(["--preset", "tiny", "--learning_rate", "5e-4", "--block_out_channels", "8,16,32",
                       "--norm_num_groups", "4", "--resolution", "64", "--num_epochs", "3"])
    assert (args.learning_rate, args.block_out_channels, args.resolution, args.train_batch_size, args.num_epochs) == (
        5e-4, (8, 16, 32), 64, preset_defaults("tiny")["train_batch_size"], 3)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["--preset", "tiny", "--resolution", "30"], "resolution 30 must be a positive multiple of 4"),
    (["--block_out_channels", "a,b"], "expected comma-separated integers"),
    (["--preset", "tiny", "--self_condition_prob", "2"], "--self_condition_prob must be in [0, 1]"),
    (["--resolution", "64", "--crop_size", "128"], "--crop_size must be in [1, --resolution=64], got 128"),
])
def test_bad_flags_give_one_line_and_exit_2(argv, message, capsys):
    try:  # argparse's own errors exit inside parse_args; our checks raise ValueError
        code = run_with_clear_errors(lambda: parse_args(argv), PROG)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"{PROG}: error: ") and message in err


def test_run_with_clear_errors_is_the_one_error_mechanism(monkeypatch, capsys):
    """The wrapper of diffad and both training scripts: the exit status, and one line for every failure."""
    assert run_with_clear_errors(lambda: 3, "prog") == 3  # an int is an exit status
    assert run_with_clear_errors(lambda: Path("model"), "prog") == 0  # anything else is success
    assert capsys.readouterr().err == ""

    def fail(exc):
        def fn():
            raise exc
        return fn

    cases = [
        (ValueError("--flag must be positive\n(got -1)"), 2, "prog: error: --flag must be positive (got -1)"),
        (FileNotFoundError(2, "No such file or directory", "data/x.png"), 2,
         "prog: error: [Errno 2] No such file or directory: 'data/x.png'"),
        (KeyboardInterrupt(), 1, "prog: error: interrupted"),
        (RuntimeError("disk on fire"), 1,
         "prog: error: RuntimeError: disk on fire (set DIFFAD_DEBUG=1 for the traceback)"),
    ]
    monkeypatch.delenv("DIFFAD_DEBUG", raising=False)
    for exc, code, line in cases:
        assert run_with_clear_errors(fail(exc), "prog") == code, exc
        assert capsys.readouterr().err.splitlines() == [line]
    monkeypatch.setenv("DIFFAD_DEBUG", "1")
    assert run_with_clear_errors(fail(RuntimeError("disk on fire")), "prog") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("prog: error: RuntimeError: disk on fire")


@pytest.mark.slow
def test_bad_data_in_a_subprocess_gives_one_line(tmp_path):
    """The whole script path: a folder that is not MVTec layout -> one line, exit 2, no traceback."""
    (tmp_path / "data" / "widget").mkdir(parents=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--data_dir", str(tmp_path / "data"), "--category", "widget",
                           "--preset", "tiny", "--report_to", "none", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(errors) == 1 and "widget" in errors[0] and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- training (slow)


@pytest.mark.slow
def test_tiny_training_loss_falls(trained_tiny_pipeline):
    log = json.loads((trained_tiny_pipeline / "training_log.json").read_text())
    steps = log["summary"]["step_losses"]
    assert len(steps) >= 60, f"only {len(steps)} steps in the time budget"
    first, last = sum(steps[:20]) / 20, sum(steps[-20:]) / 20
    assert last < 0.7 * first, (first, last)
    val = [e["val_loss"] for e in log["epochs"]]
    assert min(val) < 0.5 * val[0]
    s, c = log["summary"], log["config"]
    assert s["best_val_loss"] == min(val) and log["epochs"][s["best_epoch"]]["val_loss"] == min(val)
    assert s["total_optimizer_steps"] == len(steps) and s["num_parameters"] == 687_779
    assert s["images_per_second"] > 0 and c["num_train_images"] == 32 and c["num_validation_images"] == 8
    assert all(e["samples_per_rank"] == [32] for e in log["epochs"] if not e["partial"])


@pytest.mark.slow
def test_output_reloads_offline_with_stock_diffusers(trained_tiny_pipeline):
    code = f"""
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors.torch import load_file
out = {str(trained_tiny_pipeline)!r}
unet = UNet2DModel.from_pretrained(out, subfolder="unet")
sched = DDPMScheduler.from_pretrained(out, subfolder="scheduler")
assert unet.config.in_channels == 6 and unet.config.out_channels == 3 and unet.config.sample_size == 32
assert sched.config.beta_schedule == "sigmoid" and sched.config.num_train_timesteps == 1000
x = torch.randn(1, 6, 32, 32, generator=torch.Generator().manual_seed(0))
print(float(unet(x, 10).sample.abs().mean()))
from diffad import SelfAwareInpaintPipeline
pipe = SelfAwareInpaintPipeline.from_pretrained(out)
assert torch.equal(pipe.unet.conv_in.weight, unet.conv_in.weight)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=_env(), cwd=str(trained_tiny_pipeline.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) > 0
    index = json.loads((trained_tiny_pipeline / "model_index.json").read_text())
    assert index["_class_name"] in ("SelfAwareInpaintPipeline", ["pipeline", "SelfAwareInpaintPipeline"])


@pytest.mark.slow
def test_kill_and_resume_matches_the_uninterrupted_run(synthetic_root, tmp_path):
    out = tmp_path / "run"
    flags = ("--max_train_steps", "40", "--checkpointing_steps", "8", "--checkpoints_total_limit", "2", "--use_ema")
    cmd = _train_cmd(synthetic_root, out, *flags)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while latest_checkpoint(out) is None and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        killed_after = latest_checkpoint(out)
        assert killed_after is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model_index.json").exists()
    # Debris a crash could leave (or a hand-copied folder): never taken as the latest checkpoint.
    (out / "checkpoint-999").mkdir()
    (out / "checkpoint-999" / "model.safetensors").write_bytes(b"torn")
    incomplete_path(out / "checkpoint-1000").mkdir()
    resumed = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    s = log["summary"]
    assert s["total_optimizer_steps"] == 40 and len(s["step_losses"]) == 40
    assert len(s["resumed_from"]) == 1 and s["resumed_from"][0]["global_step"] >= checkpoint_step(killed_after)
    assert Path(s["resumed_from"][0]["checkpoint"]).name != "checkpoint-999"
    assert [e["epoch"] for e in log["epochs"]] == list(range(5))  # 8 steps per epoch, none lost or repeated
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-32", "checkpoint-40"]  # rotation kept 2
    assert not [p for p in out.iterdir() if p.name.endswith("incomplete")]
    assert s["saved_weights"] == "best validation (EMA)"

    # The resumed run is the uninterrupted run: per-batch seeded noise, restored optimiser/EMA/sampler.
    straight = tmp_path / "straight"
    proc = subprocess.run(_train_cmd(synthetic_root, straight, *flags), env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = json.loads((straight / "training_log.json").read_text())
    assert ref["summary"]["step_losses"] == s["step_losses"]
    assert [e["val_loss"] for e in ref["epochs"]] == [e["val_loss"] for e in log["epochs"]]
    from safetensors.torch import load_file

    a = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(straight / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_rank_gloo_run_splits_the_data(synthetic_root, tmp_path):
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1"]
    cmd = launch + _train_cmd(synthetic_root, out, "--max_train_steps", "8", "--expect_world_size", "2")[1:]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["world_size"] == 2 and log["config"]["distributed_type"] == "DistributedType.MULTI_CPU"
    n = log["config"]["num_train_images"]
    full = [e for e in log["epochs"] if not e["partial"]]
    assert full and all(e["samples_per_rank"] == [n // 2, n // 2] for e in full)
    assert log["config"]["steps_per_epoch"] == 4  # 32 images / (4 per rank x 2 ranks)
    assert log["summary"]["total_optimizer_steps"] == 8


def test_training_on_crops_saves_a_model_that_inspects_at_the_working_resolution(synthetic_root, tmp_path):
    """--crop_size below --resolution: the UNet learns on random crops, the pipeline inspects the whole image."""
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
    from diffad.synthetic import SYNTHETIC_CATEGORIES
    from diffad.training.train_ddpm import main

    out = main(parse_args(["--data_dir", str(synthetic_root), "--category", SYNTHETIC_CATEGORIES[0], "--preset", "tiny",
                           "--resolution", "64", "--crop_size", "32", "--train_batch_size", "4",
                           "--max_train_steps", "3", "--report_to", "none", "--output_dir", str(tmp_path / "m")]))
    pipe = SelfAwareInpaintPipeline.from_pretrained(out)
    assert (pipe.resolution, pipe.tile_size, pipe.num_tiles) == (64, 32, 9)
    log = json.loads((out / "training_log.json").read_text())
    assert log["config"]["crop_size"] == 32 and log["summary"]["total_optimizer_steps"] == 3


def test_main_takes_a_config_object_as_well_as_a_command_line(synthetic_root, tmp_path):
    """``main`` accepts what ``parse_args`` returns, a command line, a mapping or a dataclass of flag names: the same
    settings give the same parsed flags (preset defaults filled, checks run) and the same run."""
    import dataclasses

    from diffad.synthetic import SYNTHETIC_CATEGORIES
    from diffad.training.train_ddpm import main, resolve_args

    argv = ["--preset", "tiny", "--resolution", "64", "--crop_size", "32", "--block_out_channels", "8,16",
            "--norm_num_groups", "4", "--max_train_steps", "2", "--report_to", "none"]
    config = {"preset": "tiny", "resolution": 64, "crop_size": 32, "block_out_channels": "8,16",
              "norm_num_groups": 4, "max_train_steps": 2, "report_to": "none"}
    assert vars(resolve_args(config)) == vars(parse_args(argv)) == vars(resolve_args(argv))

    @dataclasses.dataclass
    class Budget:
        preset: str = "tiny"
        max_train_steps: int = 2
        train_batch_size: int = 4

    assert resolve_args(Budget()).learning_rate == preset_defaults("tiny")["learning_rate"]
    with pytest.raises(ValueError, match=r"unknown settings \['max_steps'\]"):
        resolve_args({"max_steps": 3})
    with pytest.raises(ValueError, match="preset='huge' is not one of"):
        resolve_args({"preset": "huge"})
    with pytest.raises(ValueError, match="--self_condition_prob must be in"):  # the checks of parse_args run too
        resolve_args({"preset": "tiny", "self_condition_prob": 2.0})

    data = {"data_dir": str(synthetic_root), "category": SYNTHETIC_CATEGORIES[0], "resolution": 32,
            "report_to": "none"}
    out = main({**dataclasses.asdict(Budget()), **data, "output_dir": str(tmp_path / "m")})
    log = json.loads((out / "training_log.json").read_text())
    assert log["summary"]["total_optimizer_steps"] == 2 and log["config"]["train_batch_size"] == 4
