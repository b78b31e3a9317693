"""The `diffad` command: --help everywhere, exit codes, one-line errors, train forwarding, calibrate."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diffad import cli
from diffad.cli import accelerate_launch_command, build_parser, main
from diffad.errors import report_error
from tiny_components import saved_tiny_pipeline

SUBCOMMANDS = ["demo", "train", "calibrate", "detect", "evaluate", "card", "push", "serve", "watch"]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's --help and usage errors
        return int(exc.code or 0)


def test_top_level_help_lists_every_subcommand(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert "unavailable" not in out  # every subcommand module imports


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_subcommand_help_exits_0(name, capsys):
    assert _exit_code([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--" in out


def test_train_help_is_the_training_scripts(capsys):
    assert _exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--num-processes" in out and "--data_dir" in out and "--max_train_minutes" in out


def test_console_script_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "diffad.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("diffad ")


def test_import_help_and_version_load_no_subcommand():
    """`import diffad.cli`, `diffad --help` and `diffad --version` import no subcommand module, torch nor diffusers."""
    code = ("import sys, contextlib, io\n"
            "import diffad.cli as cli\n"
            "heavy = ('torch', 'diffusers', 'diffad.detect', 'diffad.calibration', 'diffad.pipelines')\n"
            "loaded = {'import': [m for m in heavy if m in sys.modules]}\n"
            "for flag in ('--help', '--version'):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n"
            "            cli.main([flag])\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    loaded[flag] = [m for m in heavy if m in sys.modules]\n"
            "print(loaded)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "{'import': [], '--help': [], '--version': []}"


@pytest.mark.parametrize("subcommand", [pytest.param(s, id=s.name) for s in cli.SUBCOMMANDS])
def test_help_summary_is_the_subcommands_own(subcommand):
    """`diffad --help` lists each subcommand with the help its own module registers."""
    import argparse

    (action,) = [a for a in build_parser(subcommand.name)._actions if isinstance(a, argparse._SubParsersAction)]
    assert {c.dest: c.help for c in action._choices_actions}[subcommand.name] == subcommand.summary


@pytest.mark.parametrize("argv, fragment", [
    ([], "the following arguments are required: <command>"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["detect", "x.png"], "the following arguments are required: --model, --out"),
    (["card", "--model", "m"], "the following arguments are required: --results"),
    (["detect", "--model", "m", "--out", "o", "x.png", "--batch-size", "two"], "invalid int value: 'two'"),
    (["push", "--model", "m", "--repo-id", "a/b", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors_are_one_line_exit_2(argv, fragment, capsys):
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0] and ": error: " in err[0]


def test_missing_inputs_are_one_line_exit_2(tmp_path, capsys):
    cases = [
        (["detect", "--model", str(tmp_path), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")],
         "diffad detect: error: "),
        (["calibrate", "--model", str(tmp_path), "--data", str(tmp_path), "--category", "weave"],
         "diffad calibrate: error: "),
        (["card", "--model", str(tmp_path), "--results", str(tmp_path / "r.json")], "diffad card: error: "),
        (["push", "--model", str(tmp_path / "m"), "--repo-id", "a/b", "--dry-run"], "diffad push: error: "),
        (["train", "--num-processes", "0"], "diffad train: error: --num-processes must be >= 1"),
    ]
    for argv, prefix in cases:
        assert _exit_code(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(prefix), (argv, err)
        assert "Traceback" not in err[0]


def test_unexpected_failure_is_one_line_exit_1(monkeypatch, capsys):
    import diffad.cards

    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(diffad.cards, "run", boom)
    assert main(["card", "--model", "m", "--results", "r"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["diffad card: error: RuntimeError: disk on fire (set DIFFAD_DEBUG=1 for the traceback)"]


def test_report_error_folds_newlines(capsys):
    assert report_error("diffad detect", "line one\nline two", 2) == 2
    assert capsys.readouterr().err == "diffad detect: error: line one line two\n"


def test_diffad_and_the_training_scripts_report_usage_errors_alike(capsys):
    """One error mechanism: `<prog>: error: <message> (see '<prog> --help')`, one line, exit 2, everywhere."""
    from diffad.training import train_ddpm, train_segmenter

    assert _exit_code(["detect", "--bogus"]) == 2
    lines = [capsys.readouterr().err]
    for script in (train_ddpm, train_segmenter):
        with pytest.raises(SystemExit) as exc:
            script.parse_args(["--bogus"])
        assert exc.value.code == 2
        lines.append(capsys.readouterr().err)
    for err, prog in zip(lines, ("diffad detect", train_ddpm.PROG, train_segmenter.PROG)):
        assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and err.endswith(f"(see '{prog} --help')\n")


def test_train_forwards_flags_in_process(monkeypatch, tmp_path, capsys):
    from diffad.training import train_ddpm

    seen = {}
    monkeypatch.setattr(train_ddpm, "main", lambda args: seen.setdefault("args", args) and tmp_path)
    code = main(["train", "--data_dir", str(tmp_path), "--category", "weave", "--preset", "tiny",
                 "--output_dir", str(tmp_path / "m"), "--max_train_steps", "3"])
    assert code == 0
    args = seen["args"]
    assert (args.category, args.preset, args.max_train_steps) == ("weave", "tiny", 3)
    assert args.output_dir == str(tmp_path / "m")
    assert _exit_code(["train", "--preset", "nonsense"]) == 2
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_train_relaunches_through_accelerate(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert main(["train", "--num-processes", "2", "--data_dir", str(tmp_path), "--preset", "tiny"]) == 0
    (cmd,) = calls
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    script = next(c for c in cmd if c.endswith("train_ddpm.py"))
    assert cmd[cmd.index(script) + 1:] == ["--data_dir", str(tmp_path), "--preset", "tiny", "--expect_world_size", "2"]


def test_accelerate_flags_cpu_and_gpu():
    cpu2 = accelerate_launch_command(2, "t.py", [], use_gpu=False)
    # on CPU, `--cpu --num_processes 2` starts ONE process: a real 2-rank run needs --multi_gpu
    assert "--multi_gpu" in cpu2 and "--cpu" not in cpu2 and "--num_cpu_threads_per_process" in cpu2
    cpu1 = accelerate_launch_command(1, "t.py", [], use_gpu=False)
    assert "--cpu" in cpu1 and "--multi_gpu" not in cpu1 and cpu1[cpu1.index("--num_processes") + 1] == "1"
    gpu4 = accelerate_launch_command(4, "t.py", ["--mixed_precision", "bf16"], use_gpu=True)
    assert "--multi_gpu" in gpu4 and "--cpu" not in gpu4 and gpu4.count("--mixed_precision") == 1
    with pytest.raises(ValueError, match="--num-processes must be >= 1"):
        accelerate_launch_command(0, "t.py", [])


def test_calibrate_command_calibrates_and_keeps_training_files(synthetic_root, tmp_path, capsys):
    import dataclasses

    from diffad.pipelines.self_aware_inpaint import SamplingConfig, SelfAwareInpaintPipeline

    model = saved_tiny_pipeline(tmp_path / "model", calibrated=False)
    (model / "training_log.json").write_text(json.dumps({"config": {"category": "weave"}}))
    code = main(["calibrate", "--model", str(model), "--data", str(synthetic_root), "--category", "weave",
                 "--percentile", "0.9", "--target-fpr", "0.1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (model / "training_log.json").is_file()  # kept beside the re-saved pipeline
    pipe = SelfAwareInpaintPipeline.from_pretrained(model)
    assert pipe.is_calibrated
    cal = pipe.calibration
    # the fast preset (the default --config) with --percentile overriding its mask_percentile, in the precision
    # --precision auto resolves to on this machine
    from diffad.precision import resolve_precision

    precision = resolve_precision("auto")
    assert cal.sampling == dataclasses.replace(SamplingConfig.fast(), mask_percentile=0.9, precision=precision)
    assert cal.config.target_false_positive_rate == pytest.approx(0.1)
    assert tuple(cal.q_threshold.shape) == (32, 32) and float(cal.q_threshold.min()) > 0
    assert cal.threshold("self_aware/multiscale") is not None and cal.threshold("denoise/multiscale") is not None
    # one line with what the calibration measured on held-out normal images
    (line,) = captured.out.strip().splitlines()
    assert line.startswith(f"calibrated {model}: sampling config custom (mask_percentile 0.9, {precision}), ")
    assert f"held-out mask share {cal.config.heldout_mask_share:.3f} (expected about 0.10)" in line
    rates = dict(zip(cal.config.threshold_names, cal.config.heldout_false_positive_rates))
    rate = rates["self_aware/multiscale"]
    assert f"held-out false-positive rate (target 0.1): self_aware/multiscale {rate:.3f}, " in line


@pytest.mark.parametrize("flags, message", [
    (["--percentile", "1.5"], "--percentile must be in (0, 1), got 1.5"),
    (["--target-fpr", "0"], "--target-fpr must be in (0, 1)"),
    (["--config", "slow"], "argument --config: invalid choice: 'slow'"),
])
def test_calibrate_bad_flags_one_line_exit_2(synthetic_root, tmp_path, capsys, flags, message):
    model = saved_tiny_pipeline(tmp_path / "model", calibrated=False)
    argv = ["calibrate", "--model", str(model), "--data", str(synthetic_root), "--category", "weave", *flags]
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffad calibrate: error: ") and message in err[0], err
    assert not (model / "calibration").exists()


def test_calibrate_model_as_the_demo_and_the_benchmarks_call_it(synthetic_root, tmp_path):
    """demo.py and the benchmarks call it with keywords: the calibration holds what they asked for, and the
    defaults are the fast preset at a 5% target on the training run's split."""
    from diffad.calibration import calibrate_model
    from diffad.model_folder import calibration_config

    model = saved_tiny_pipeline(tmp_path / "model", calibrated=False)
    (model / "training_log.json").write_text(json.dumps({"config": {"category": "weave", "seed": 0}}))
    assert calibrate_model(model_dir=model, data=synthetic_root, category="weave", seed=0, batch_size=4) == model
    cal = calibration_config(model)
    assert cal["target_false_positive_rate"] == 0.05 and cal["sampling_config"]["reconstruction"] == "denoise"
    calibrate_model(model, synthetic_root, "weave", config="fast", target_false_positive_rate=0.1, percentile=0.9)
    cal = calibration_config(model)
    assert cal["target_false_positive_rate"] == 0.1 and cal["sampling_config"]["mask_percentile"] == 0.9
    with pytest.raises(ValueError, match="trained with --seed 0"):
        calibrate_model(model, synthetic_root, "weave", seed=1)


def test_train_with_a_head_preset_calibrates_and_trains_the_head(trained_tiny_pipeline, synthetic_root, tmp_path,
                                                                  monkeypatch):
    """A preset with a learned head (the cpu default) makes `diffad train` deliver everything the default detector
    needs: after the DDPM, a calibration and a 7-channel segmenter whose map joins ``combined``."""
    import shutil

    from diffad import SelfAwareInpaintPipeline, presets
    from diffad.training import train_ddpm, train_segmenter

    model = tmp_path / "m"
    shutil.copytree(trained_tiny_pipeline, model)
    monkeypatch.setattr(train_ddpm, "main", lambda args: model)  # the DDPM is the session's tiny one
    tiny = presets.preset_defaults("tiny")
    monkeypatch.setattr(presets, "preset_defaults", lambda name: {**tiny, "head": True})
    parse = train_segmenter.parse_args
    monkeypatch.setattr(train_segmenter, "parse_args", lambda argv: parse(
        argv + ["--num_synthetic", "6", "--max_train_steps", "4", "--train_batch_size", "4",
                "--cache_dir", str(tmp_path / "cache")]))
    code = main(["train", "--data_dir", str(synthetic_root), "--category", "weave", "--preset", "tiny",
                 "--output_dir", str(model)])
    assert code == 0
    pipe = SelfAwareInpaintPipeline.from_pretrained(model)
    assert pipe.is_calibrated and pipe.segmenter.config.in_channels == 7
    names = list(pipe.calibration.config.threshold_names)
    assert "self_aware/learned" in names and "self_aware/combined" in names
    log = json.loads((model / train_segmenter.LOG_NAME).read_text())
    assert log["summary"]["q_threshold_unchanged"] is True  # the head saw the Q_p the calibration stored
    out = pipe(torch.zeros(2, 3, 32, 32), output_type="pt")
    thresholds = {n: pipe.calibration.threshold(f"self_aware/{n}") for n in ("noise_error", "multiscale", "learned")}
    expected = sum(out.anomaly_maps[n] / thresholds[n] for n in thresholds) / 3
    assert torch.allclose(out.anomaly_maps["combined"], expected, atol=1e-6)
