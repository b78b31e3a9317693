"""diffad app's logic without a browser (tests/test_app_browser.py drives the page itself)."""

from __future__ import annotations

import csv
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.app import Inspector, expand_uploads
from diffad.detect import detect, load_pipeline
from tiny_components import saved_tiny_pipeline


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return saved_tiny_pipeline(tmp_path_factory.mktemp("app") / "model")


def _photos(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


def test_inspector_scores_as_detect_and_redecides_without_the_model(model, tmp_path):
    photos = _photos(tmp_path / "photos")
    pipe = load_pipeline(model)
    detect(model, [photos], tmp_path / "out", pipe=pipe)
    with (tmp_path / "out" / "results.csv").open() as handle:
        expected = {Path(r["file"]).name: r for r in csv.DictReader(handle)}
    inspector = Inspector(pipe)
    items = [inspector.inspect(photos / name) for name in sorted(expected)]
    name = inspector.default_map
    rows = {r["file"]: r for r in inspector.rows(items, name, inspector.threshold(name))}
    for file, row in expected.items():  # same score, same decision, same error column as detect
        assert rows[file]["score"] == row["score"] and rows[file]["decision"] == row["decision"], file
    assert rows["broken.png"]["decision"] == "error" and "broken.png: it is not an image" in rows["broken.png"]["error"]
    calls = inspector.model_calls
    assert calls == 3
    # moving the threshold below every score flips every decision to defect, with no model call
    low = inspector.rows(items, name, -1.0)
    assert [r["decision"] for r in low if r["file"] != "broken.png"] == ["defect"] * 3
    high = inspector.rows(items, name, 1e9)
    assert [r["decision"] for r in high if r["file"] != "broken.png"] == ["ok"] * 3
    # every map with a threshold comes from the same call
    assert set(items[0].scores) == set(inspector.map_names) >= {"combined", "multiscale", "noise_error"}
    assert inspector.model_calls == calls
    assert inspector.overlay(items[0], name).size == (40, 40)


def test_model_summary_shows_the_trained_category_and_the_cards_results_table(model, tmp_path):
    import shutil

    from diffad.app import Inspector, model_summary
    from diffad.detect import load_pipeline

    folder = tmp_path / "carded"
    shutil.copytree(model, folder)
    (folder / "training_log.json").write_text(json.dumps({"config": {"category": "weave"}, "epochs": [], "summary": {}}))
    (folder / "README.md").write_text("\n".join([
        "---", "license: apache-2.0", "---", "# card", "", "| hyper-parameter | value |", "|---|---|",
        "| category | weave |", "| preset | tiny |", "", "| method / map | Image AUROC | Pixel AUROC |", "|---|---|---|",
        "| self_aware/combined | 0.985 | 0.981 |", "| denoise/multiscale | 0.870 | 0.955 |", "", "text after"]))
    text = model_summary(folder, Inspector(load_pipeline(folder)))
    assert "**Category** `weave`." in text
    # a whole markdown table, separator included (without it the page shows raw pipes)
    assert "\n| method / map | Image AUROC | Pixel AUROC |\n|---|---|---|\n| self_aware/combined | 0.985 | 0.981 |\n" \
           "| denoise/multiscale | 0.870 | 0.955 |" in text
    assert "| preset | tiny |" not in text and "text after" not in text


def test_a_zip_contributes_its_images_and_nothing_outside(tmp_path):
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("parts/a.png", b"x")
        z.writestr("parts/notes.txt", b"x")
        z.writestr("../escape.png", b"x")
        z.writestr(".hidden.png", b"x")
    files = expand_uploads([str(archive), str(tmp_path / "single.png")], tmp_path / "work")
    read = [u.name for u in files if u.path is not None]
    assert read == ["batch.zip/parts/a.png", "single.png"]
    skipped = {u.name: u.error for u in files if u.path is None}  # every skipped member named, with its reason
    assert set(skipped) == {"batch.zip/parts/notes.txt", "batch.zip/../escape.png", "batch.zip/.hidden.png"}
    assert "outside the archive" in skipped["batch.zip/../escape.png"]
    assert not (tmp_path / "escape.png").exists()


def test_app_without_gradio_says_how_to_install(model, monkeypatch, capsys):
    import builtins

    from diffad.cli import main

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    assert main(["app", "--model", str(model)]) == 2
    assert "pip install 'diffad[app]'" in capsys.readouterr().err


def test_space_folder_loads_offline_against_a_hub_form_model_folder(model, tmp_path, monkeypatch):
    """`diffad space` writes app.py, requirements.txt and the Space front matter; app.py runs the same app over
    a model folder in exactly the form the Hub serves (what `diffad push` assembles)."""
    import runpy
    import shutil

    gradio = pytest.importorskip("gradio")
    from diffad.cli import main
    from diffad.hub import assemble_hub_folder

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# card\n")
    hub_form = tmp_path / "hub"
    assemble_hub_folder(folder, hub_form)
    space = tmp_path / "space"
    assert main(["space", "--model", str(folder), "--repo-id", "acme/diffad-part", "--out", str(space)]) == 0
    readme = (space / "README.md").read_text()
    assert readme.startswith("---\n") and "sdk: gradio" in readme and "app_file: app.py" in readme
    assert "- acme/diffad-part" in readme and "diffad[app]" in (space / "requirements.txt").read_text()
    monkeypatch.setenv("DIFFAD_MODEL", str(hub_form))
    module = runpy.run_path(str(space / "app.py"))  # not __main__: builds the page, does not launch it
    assert isinstance(module["demo"], gradio.Blocks) and module["MODEL"] == str(hub_form)


@pytest.mark.parametrize("argv, message", [
    (["space", "--repo-id", "not a repo id", "--out", "SPACE"], "--repo-id 'not a repo id' is not a valid Hub repo id"),
    (["space", "--repo-id", "acme/part", "--out", "SPACE", "--model", "NOWHERE"], "is not a diffad model folder"),
    (["app", "--port", "0"], "--port must be in 1..65535"),
    (["app", "--precision", "PRECISION"], "recalibrate with `diffad calibrate --model"),
])
def test_app_and_space_bad_input_is_one_line(model, tmp_path, capsys, argv, message):
    pytest.importorskip("gradio")
    from diffad.cli import main

    from diffad.detect import load_pipeline
    from diffad.precision import resolve_precision

    fitted = load_pipeline(model).calibration.sampling.precision
    other = "fp32" if fitted != "fp32" else ("bf16" if resolve_precision("bf16") == "bf16" else None)
    if "PRECISION" in argv and other is None:
        pytest.skip("this CPU runs only fp32: no other precision to ask for")
    argv = [a.replace("SPACE", str(tmp_path / "space")).replace("NOWHERE", str(tmp_path / "none"))
            .replace("PRECISION", other or "") for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(model)]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
