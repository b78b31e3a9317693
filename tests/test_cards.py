"""Model cards: the template renders, and huggingface_hub parses back the metrics we put in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffad.cli import main
from tiny_components import CHEAP_CONFIG, saved_tiny_pipeline

RESULTS = [
    {"category": "weave", "method": "self_aware", "anomaly_map": "multiscale",
     "image_auroc": 0.9125, "pixel_auroc": 0.883, "aupro": 0.71, "image_f1_max": 0.87},
    {"category": "weave", "method": "self_aware", "anomaly_map": "learned", "image_auroc": 0.95, "pixel_auroc": 0.93},
    {"category": "weave", "method": "denoise", "anomaly_map": "multiscale", "image_auroc": 0.8},
    {"category": "nut", "method": "self_aware", "anomaly_map": "multiscale", "image_auroc": 0.5},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A saved (uncalibrated) tiny pipeline with a training_log.json as train_ddpm.py writes it."""
    folder = saved_tiny_pipeline(tmp_path_factory.mktemp("cards") / "model", calibrated=False)
    log = {"config": {"data_dir": "/data/synthetic", "category": "weave", "preset": "tiny", "resolution": 32,
                      "learning_rate": 2e-4, "train_batch_size": 16, "seed": 0,
                      "data_source": {"dataset": "diffad-synthetic", "license": "apache-2.0", "license_file": None}},
           "epochs": [{"epoch": 0, "train_loss": 0.5, "val_loss": 0.4}, {"epoch": 1, "train_loss": 0.2, "val_loss": 0.25}],
           "summary": {"best_epoch": 1, "best_val_loss": 0.25, "total_optimizer_steps": 40}}
    (folder / "training_log.json").write_text(json.dumps(log))
    return folder


def test_card_metadata_round_trips_through_huggingface_hub(model_dir, tmp_path):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from diffad.cards import make_model_card

    card = make_model_card(model_dir, RESULTS, repo_id="acme/diffad-weave")
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)
    assert loaded.data.library_name == "diffusers"
    assert loaded.data.license == "apache-2.0"
    assert {"anomaly-detection", "diffusion"} <= set(loaded.data.tags)
    name, evals = model_index_to_eval_results(loaded.data.to_dict()["model-index"])
    assert name == "diffad-weave"
    got = {(e.metric_config, e.metric_type): e.metric_value for e in evals}
    # only the model's category ("weave" from training_log.json), every metric we put in
    assert got == {
        ("self_aware/multiscale", "image_auroc"): 0.9125, ("self_aware/multiscale", "pixel_auroc"): 0.883,
        ("self_aware/multiscale", "aupro"): 0.71, ("self_aware/multiscale", "image_f1_max"): 0.87,
        ("self_aware/learned", "image_auroc"): 0.95, ("self_aware/learned", "pixel_auroc"): 0.93,
        ("denoise", "image_auroc"): 0.8,
    }
    assert {e.dataset_config for e in evals} == {"weave"} and {e.dataset_split for e in evals} == {"test"}
    assert {e.task_type for e in evals} == {"anomaly-detection"}
    text = loaded.text
    assert 'DiffusionPipeline.from_pretrained("acme/diffad-weave", trust_remote_code=True)' in text
    assert 'SelfAwareInpaintPipeline.from_pretrained("acme/diffad-weave")' in text
    assert "| learning_rate | 0.0002 |" in text and "| best_val_loss | 0.25 |" in text
    assert "| self_aware/multiscale | 0.912 | 0.883 | 0.710 | 0.870 |" in text
    assert "Semchyshyn" in text and "## Intended use and limits" in text
    # the usage snippets show the current API: one call, every map by name; the sampler is fixed by calibrating
    assert 'out.anomaly_maps["combined"]' in text and 'out.is_anomalous["combined"]' in text
    assert "anomaly_map=" not in text and "mode=" not in text
    assert 'pipe.calibrate(normal_images, config="thesis")' in text and "diffad calibrate --config thesis" in text
    assert "not calibrated yet" in text  # this model has no calibration


def _with_data(model_dir: Path, folder: Path, data_dir: Path, recorded: dict | None = None) -> Path:
    """A copy of ``model_dir`` whose training log says it was trained on ``data_dir`` (and recorded ``recorded``)."""
    import shutil

    shutil.copytree(model_dir, folder)
    log = json.loads((model_dir / "training_log.json").read_text())
    log["config"].pop("data_source")
    log["config"]["data_dir"] = str(data_dir)
    if recorded is not None:
        log["config"]["data_source"] = recorded
    (folder / "training_log.json").write_text(json.dumps(log))
    return folder


MVTEC_LICENSE = "Attribution-NonCommercial-ShareAlike 4.0 International\n\n=====\n\nCreative Commons Corporation..."
MVTEC_README = ('Paul Bergmann, Michael Fauser, David Sattlegger, and Carsten Steger, "A Comprehensive Real-World '
                'Dataset for Unsupervised Anomaly Detection", CVPR 2019\n\nCopyright 2019 MVTec Software GmbH')


def test_case19_the_card_licence_comes_from_the_data_never_from_its_path(model_dir, tmp_path, capsys):
    """Issue 23, case 19: the licence came from the substring "mvtec" in the data path."""
    from diffad.cards import make_model_card

    # MVTec AD under a neutral name: its license.txt and readme.txt say what it is
    parts = tmp_path / "line3-photos" / "weave"
    parts.mkdir(parents=True)
    (parts / "license.txt").write_text(MVTEC_LICENSE)
    (parts / "readme.txt").write_text(MVTEC_README)
    card = make_model_card(_with_data(model_dir, tmp_path / "a", parts.parent), RESULTS)
    assert card.data.license == "cc-by-nc-sa-4.0" and "mvtec-ad" in card.data.tags and "non-commercial" in card.text
    # "mvtec" in the path of an MIT-licensed folder is not MVTec AD
    own = tmp_path / "not_mvtec_at_all"
    own.mkdir()
    (own / "LICENSE").write_text("MIT License\n\nCopyright (c) 2026 ACME\n\nPermission is hereby granted, free of charge")
    card = make_model_card(_with_data(model_dir, tmp_path / "b", own), RESULTS)
    assert card.data.license == "mit" and "mvtec-ad" not in card.data.tags and "non-commercial" not in card.text
    # what training recorded wins when the data folder is gone (another machine)
    recorded = {"dataset": "mvtec_ad", "license": "cc-by-nc-sa-4.0", "license_file": "/gone/license.txt"}
    card = make_model_card(_with_data(model_dir, tmp_path / "c", tmp_path / "gone" / "mvtec", recorded), RESULTS)
    assert card.data.license == "cc-by-nc-sa-4.0" and "mvtec-ad" in card.data.tags
    # no licence known: refused in one line naming --license; an explicit --license is taken as it is
    unknown = _with_data(model_dir, tmp_path / "d", tmp_path / "mvtec_anomaly_detection")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    capsys.readouterr()
    assert main(["card", "--model", str(unknown), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no licence file" in err and "pass --license" in err
    assert not (unknown / "README.md").exists()
    assert main(["card", "--model", str(unknown), "--results", str(results), "--license", "other"]) == 0
    assert make_model_card(unknown, RESULTS, license="cc-by-4.0").data.license == "cc-by-4.0"


@pytest.mark.parametrize("category", ["weave: x\nlicense: mit\n---\ninjected: true", "a: b", "line\nbreak",
                                      "'quoted\"", "- item"])
def test_case19_a_category_with_a_colon_or_newline_cannot_break_or_inject_front_matter(model_dir, tmp_path,
                                                                                       category):
    """Issue 23, case 19: all YAML front matter is generated from data by a YAML library (ModelCardData)."""
    import shutil

    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from diffad.cards import make_model_card, write_model_card

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    log = json.loads((model_dir / "training_log.json").read_text())
    log["config"]["category"] = category
    (folder / "training_log.json").write_text(json.dumps(log))
    rows = [{**row, "category": category} for row in RESULTS if row["category"] == "weave"]
    write_model_card(make_model_card(folder, rows), folder)
    loaded = ModelCard.load(folder / "README.md")
    metadata = loaded.data.to_dict()
    assert set(metadata) == {"library_name", "license", "tags", "metrics", "model-index"}  # nothing injected
    assert metadata["license"] == "apache-2.0" and metadata["tags"] == make_model_card(model_dir, RESULTS).data.tags
    name, evals = model_index_to_eval_results(metadata["model-index"])
    assert name == f"diffad-{category}" and {e.dataset_config for e in evals} == {category} and len(evals) == 7


def test_normalize_results_accepts_nested_mappings():
    from diffad.cards import normalize_results

    rows = normalize_results({"metrics": {"weave": {"self_aware/multiscale": {"image_auroc": 0.9},
                                                    "denoise": {"image_auroc": 0.7, "pixel_auroc": 0.6}},
                                          "mean": {"denoise": {"image_auroc": 0.7}}}})
    assert {(r.category, r.method): r.metrics for r in rows} == {
        ("weave", "self_aware/multiscale"): {"image_auroc": 0.9},
        ("weave", "denoise"): {"image_auroc": 0.7, "pixel_auroc": 0.6}}
    with pytest.raises(ValueError, match="no metrics"):
        normalize_results({"weave": {"x": 1}})


def test_card_command_writes_readme(model_dir, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(RESULTS))
    assert main(["card", "--model", str(model_dir), "--results", str(results)]) == 0
    readme = model_dir / "README.md"
    assert readme.is_file() and readme.read_text().startswith("---\n")
    assert not list(model_dir.glob(".README*"))  # no temporary file left behind


def test_card_command_bad_input(model_dir, tmp_path, capsys):
    assert main(["card", "--model", str(model_dir), "--results", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("diffad card: error: results file") and "diffad evaluate" in err[0]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["card", "--model", str(model_dir), "--results", str(bad)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps(RESULTS))
    assert main(["card", "--model", str(model_dir), "--results", str(ok), "--category", "screw"]) == 2
    assert "no results for category 'screw'" in capsys.readouterr().err
    assert main(["card", "--model", str(tmp_path), "--results", str(ok)]) == 2
    assert "not a diffad model folder" in capsys.readouterr().err


def test_normalize_results_reads_diffad_evaluate_files():
    from diffad.cards import normalize_results

    per_category = {"category": "nut", "metrics": {"self_aware/learned": {"image_auroc": 0.93, "seconds_per_image": 0.2,
                                                                          "num_images": 50}},
                    "settings": {"seed": 0}}
    rows = normalize_results(per_category)
    assert [(r.category, r.method, r.metrics) for r in rows] == [("nut", "self_aware/learned", {"image_auroc": 0.93})]
    whole = {"categories": {"nut": {"denoise/multiscale": {"image_auroc": 0.8, "aupro": 0.5}},
                            "weave": {"self_aware/multiscale": {"image_auroc": 0.9}}},
             "mean": {"denoise/multiscale": {"image_auroc": 0.8}}, "settings": {"methods": ["denoise"]}}
    assert sorted((r.category, r.method) for r in normalize_results(whole)) == [
        ("nut", "denoise/multiscale"), ("weave", "self_aware/multiscale")]


def test_card_of_a_calibrated_model_names_its_sampler(model_dir, tmp_path):
    """A calibrated model's card says which sampling config every call runs (read from calibration/config.json)."""
    import shutil

    from diffad.cards import make_model_card
    from diffad.pipelines.self_aware_inpaint import SamplingConfig

    calibrated = saved_tiny_pipeline(tmp_path / "calibrated")  # calibrated with CHEAP_CONFIG: not a preset
    shutil.copy(model_dir / "training_log.json", calibrated / "training_log.json")
    config_path = calibrated / "calibration" / "config.json"
    assert json.loads(config_path.read_text())["sampling_config"] == CHEAP_CONFIG.to_dict()
    text = make_model_card(calibrated, RESULTS).text
    assert "the `custom` sampling config, which every call runs" in text and "not calibrated yet" not in text
    config = json.loads(config_path.read_text())
    config["sampling_config"] = SamplingConfig.thesis().to_dict()
    config_path.write_text(json.dumps(config))
    assert "the `thesis` sampling config, which every call runs" in make_model_card(calibrated, RESULTS).text


def test_card_states_the_false_positive_rate_the_model_was_calibrated_for(model_dir, tmp_path):
    """The target false-positive rate, the precision and the number of images are the calibration's, whatever the
    training log says (it never held them): a model calibrated for 20% false alarms must not be sold as 5%."""
    import shutil

    from diffad.cards import make_model_card
    from tiny_components import random_images, tiny_pipeline

    pipe = tiny_pipeline()
    pipe.calibrate(random_images(6), config=CHEAP_CONFIG, target_false_positive_rate=0.2,
                   generator=torch.Generator().manual_seed(0))
    folder = tmp_path / "calibrated_at_20"
    pipe.save_pretrained(folder)
    shutil.copy(model_dir / "training_log.json", folder / "training_log.json")
    text = " ".join(make_model_card(folder, RESULTS).text.split())
    assert "set for about 20% false alarms on normal images" in text and "5% false alarms" not in text
    assert "fitted on 6 held-out normal images" in text and "(networks in fp32)" in text


def test_card_of_an_uncalibrated_model_promises_no_false_positive_rate(model_dir):
    from diffad.cards import make_model_card

    text = " ".join(make_model_card(model_dir, RESULTS).text.split())
    assert "not calibrated yet" in text and "% false alarms" not in text


def test_case19_the_card_refuses_results_made_by_another_model(synthetic_root, tmp_path, capsys, caplog):
    """Issue 23, case 19: ``diffad card`` took another model's results without a word; ``diffad evaluate`` records
    which calibration made them, and the card checks it against the model folder's."""
    import logging
    import shutil

    from tiny_components import calibrate_cheaply, random_images, tiny_pipeline

    log = {"config": {"category": "weave", "preset": "tiny", "resolution": 32,
                      "data_source": {"dataset": "diffad-synthetic", "license": "apache-2.0"}}}
    models = {}
    for name, seed in (("ours", 0), ("theirs", 1)):
        pipe = calibrate_cheaply(tiny_pipeline(seed=seed), random_images(4, seed=seed))
        models[name] = tmp_path / name
        pipe.save_pretrained(models[name])
        (models[name] / "training_log.json").write_text(json.dumps(log))
    assert main(["evaluate", "--model", str(models["theirs"]), "--data", str(synthetic_root), "--category", "weave",
                 "--methods", "self_aware", "--out", str(tmp_path / "eval"), "--figure-rows", "0",
                 "--batch-size", "16"]) == 0
    capsys.readouterr()
    for results in (tmp_path / "eval" / "metrics.json", tmp_path / "eval" / "metrics" / "weave.json"):
        assert main(["card", "--model", str(models["ours"]), "--results", str(results)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--results {results} were made by another model" in err, err
        assert str(models["theirs"]) in err and f"diffad evaluate --model {models['ours']}" in err
        assert not (models["ours"] / "README.md").exists()
        assert main(["card", "--model", str(models["theirs"]), "--results", str(results)]) == 0
    # a copy of the model (same calibration, another path) is the same model
    shutil.copytree(models["theirs"], tmp_path / "copy")
    assert main(["card", "--model", str(tmp_path / "copy"), "--results", str(results)]) == 0
    # results that record no model: taken, with a warning
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(RESULTS))
    with caplog.at_level(logging.WARNING, logger="diffad.cards"):
        assert main(["card", "--model", str(models["ours"]), "--results", str(bare)]) == 0
    assert "do not say which model made them" in caplog.text
