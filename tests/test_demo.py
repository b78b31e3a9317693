"""`diffad demo`: option checks (fast) and the whole demo at a tiny budget (slow, ~2-3 minutes)."""

from __future__ import annotations

import json
import re
import time

import pytest

from diffad.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--ddpm-steps", "0"], "--ddpm-steps must be a positive number of steps"),
    (["--segmenter-steps", "-3"], "--segmenter-steps must be a positive number of steps"),
    (["--categories", "weave,teapot"], "unknown synthetic categories ['teapot']"),
    (["--resolution", "16"], "--resolution must be at least 32"),
])
def test_demo_bad_options_exit_2(tmp_path, capsys, argv, message):
    code = main(["demo", "--out", str(tmp_path / "d"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("diffad demo: error: ") and message in err[0]


def test_the_budget_is_in_steps_never_minutes():
    """issue 14: a minutes budget made the demo's figures depend on the machine's load."""
    import dataclasses

    from diffad.demo import DEFAULT_DDPM_STEPS, DEFAULT_SEGMENTER_STEPS, DemoConfig

    config = DemoConfig()
    assert (config.ddpm_steps, config.segmenter_steps) == (DEFAULT_DDPM_STEPS, DEFAULT_SEGMENTER_STEPS)
    assert not any("minute" in f.name for f in dataclasses.fields(DemoConfig))


def test_method_seconds_are_per_method():
    """Every map of a method comes from one reconstruction: the card shows one time per method."""
    from diffad.demo import method_seconds

    per_key = {"denoise/learned": {"image_auroc": 0.9}, "denoise/multiscale": {"seconds_per_image": 0.2},
               "self_aware/learned": {"seconds_per_image": 0.5}, "self_aware/multiscale": {"seconds_per_image": 0.5}}
    assert list(method_seconds(per_key).items()) == [("self_aware", 0.5), ("denoise", 0.2)]  # METHODS order


@pytest.mark.slow
def test_demo_end_to_end_tiny_budget_and_fast_rerun(tmp_path, capsys):
    from huggingface_hub import ModelCard

    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline
    from diffad.synthetic import SYNTHETIC_CATEGORIES

    out = tmp_path / "demo_output"
    assert main(["demo", "--out", str(out), "--tiny-budget"]) == 0
    report = (out / "report.md").read_text()
    # the table, one row per category, and every image link resolves
    for category in SYNTHETIC_CATEGORIES:
        assert re.search(rf"\| {category} \| \d\.\d{{3}} \(", report), category
        pipe = SelfAwareInpaintPipeline.from_pretrained(out / "models" / category)
        assert pipe.is_calibrated and pipe.segmenter is not None
        assert pipe.calibration.sampling.preset_name == "fast"
        card = ModelCard.load(out / "models" / category / "README.md")
        evals = card.data.eval_results
        # every map of every method, from one reconstruction per method (the 7-channel head reads the noise error,
        # which only self_aware has: denoise has no learned map)
        assert {e.metric_config for e in evals} == {
            f"{method}/{name}" for method in ("self_aware", "denoise") for name in pipe.map_names(method)} == {
            "self_aware/multiscale", "self_aware/learned", "self_aware/noise_error", "self_aware/combined",
            "denoise/multiscale"}
        assert all(0.0 <= e.metric_value <= 1.0 for e in evals)
        assert re.search(r"Inference time: self_aware [0-9.]+ s/image, denoise [0-9.]+ s/image\.", card.text)
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    for per_key in metrics["categories"].values():
        assert per_key["self_aware/multiscale"]["mask_normal_share"] > 0.0  # the mask redraws some normal pixels
        assert "mask_normal_share" not in per_key["denoise/multiscale"]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == len(SYNTHETIC_CATEGORIES) and all((out / link).is_file() for link in links)
    assert "diffad detect --model" in report and "diffad push --model" in report
    assert re.search(r"20 DDPM \+ 5 segmenter\s+optimiser steps per category", report)
    assert re.search(r"the run\s+took [0-9.]+ min", report)
    log = json.loads((out / "demo_log.json").read_text())
    assert all(not step["skipped_last_run"] for step in log["steps"].values())

    start = time.time()
    assert main(["demo", "--out", str(out), "--tiny-budget"]) == 0
    assert time.time() - start < 60  # every step skipped: only the cards and the report are rewritten
    log = json.loads((out / "demo_log.json").read_text())
    assert all(step["skipped_last_run"] for step in log["steps"].values())


def test_the_demo_trains_with_the_settings_of_its_command_lines(monkeypatch, tmp_path):
    """The demo trains through diffad.workflow's budgeted runs: the parsed settings are exactly those of the
    command lines it ran before (so `make demo`'s models and figures do not change)."""
    from diffad import workflow
    from diffad.demo import DemoConfig, _train_ddpm, _train_segmenter
    from diffad.training import train_ddpm, train_segmenter

    seen = {}

    def recorder(name, script):
        def main(config):
            seen[name] = script.resolve_args(config)
            return tmp_path
        return main

    monkeypatch.setattr(train_ddpm, "main", recorder("ddpm", train_ddpm))
    monkeypatch.setattr(train_segmenter, "main", recorder("segmenter", train_segmenter))
    config, data, model = DemoConfig(), tmp_path / "data", tmp_path / "models" / "nut"
    _train_ddpm(config, data, "nut", model)
    _train_segmenter(config, model)
    ddpm_argv = ["--data_dir", str(data), "--category", "nut", "--output_dir", str(model),
                 "--preset", "tiny", "--resolution", str(config.resolution), "--train_batch_size", "16",
                 "--num_epochs", "100000", "--max_train_steps", str(config.ddpm_steps), "--seed", str(config.seed),
                 "--report_to", "none", "--checkpointing_steps", "200", "--checkpoints_total_limit", "1",
                 "--resume_from_checkpoint", "latest", "--use_ema"]
    segmenter_argv = ["--model_dir", str(model), "--num_synthetic", str(config.num_synthetic),
                      "--num_epochs", "100000", "--max_train_steps", str(config.segmenter_steps),
                      "--train_batch_size", "16", "--seed", str(config.seed), "--checkpointing_steps", "200",
                      "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest",
                      "--calibration_batch_size", str(config.eval_batch_size)]
    assert vars(seen["ddpm"]) == vars(train_ddpm.parse_args(ddpm_argv))
    assert vars(seen["segmenter"]) == vars(train_segmenter.parse_args(segmenter_argv))
    with pytest.raises(ValueError, match="needs steps or minutes"):
        workflow.train_ddpm_to_budget(model)
