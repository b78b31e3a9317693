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


@pytest.mark.parametrize("category", ["weave", "weave: x\nsdk: docker\n---\ninjected: true", "a: b", "line\nbreak"])
def test_space_front_matter_cannot_be_broken_or_injected_by_the_category(category):
    """Issue 23 case 19: every YAML front matter is built from data, the Space's too."""
    import yaml

    from diffad.app import space_readme

    readme = space_readme(category, "acme/diffad-part", "5.0.0")
    assert readme.startswith("---\n")
    front, body = readme[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert set(meta) == {"title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "models"}
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and meta["models"] == ["acme/diffad-part"]
    assert meta["title"] == " ".join(f"diffad {category}".split()) and "\n" not in meta["title"]
    assert body.lstrip().startswith("# diffad")


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


# ------------------------------------------------------------------ the threshold from a histogram


def _stored_heldout_scores(model: Path, key: str) -> np.ndarray:
    """The held-out scores as saved on disk, read without diffad: the calibration's safetensors and config."""
    import json

    from safetensors.numpy import load_file

    names = json.loads((model / "calibration" / "config.json").read_text())["threshold_names"]
    return load_file(model / "calibration" / "diffusion_pytorch_model.safetensors")["heldout_scores"][names.index(key)]


def _figure_parts(fig) -> tuple[list[float], list[float], float]:
    """(bar heights, inspected scores, threshold line's x) of a :func:`diffad.figures.score_histogram` figure."""
    ax = fig.axes[0]
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    inspected = list(lines["inspected"].get_xdata()) if "inspected" in lines else []
    threshold = lines["threshold"].get_xdata()
    assert threshold[0] == threshold[1]
    return [p.get_height() for p in ax.patches], inspected, float(threshold[0])


def test_false_positive_rate_is_the_share_of_stored_heldout_scores_above_the_threshold(model):
    inspector = Inspector(load_pipeline(model))
    for name in inspector.map_names:
        stored = _stored_heldout_scores(model, f"self_aware/{name}")
        assert len(stored) == 4 and np.array_equal(inspector.heldout_scores(name), stored)
        ordered = np.sort(stored)
        for threshold in (ordered[0] - 1.0, *ordered, (ordered[1] + ordered[2]) / 2, inspector.threshold(name)):
            expected = float(np.mean(stored > threshold))
            assert inspector.false_positive_rate(name, float(threshold)) == expected, (name, threshold)
            text = inspector.false_positive_text(name, float(threshold))
            assert f"**{expected:.1%}**" in text and f"{int(np.sum(stored > threshold))} of 4 held-out" in text
        # at a held-out score, that score itself passes (decisions are score > threshold): 3 of the 4 are above
        assert inspector.false_positive_rate(name, float(ordered[0])) == 0.75


def test_histogram_draws_heldout_scores_threshold_and_this_sessions_scores(model, tmp_path):
    photos = _photos(tmp_path / "photos")
    inspector = Inspector(load_pipeline(model))
    name = inspector.default_map
    items = [inspector.inspect(p) for p in sorted(photos.iterdir())]  # three photos and a broken file
    heights, inspected, line = _figure_parts(inspector.histogram(name, 0.5, items))
    assert sum(heights) == 4 and line == 0.5  # every held-out normal image in a bar
    assert sorted(inspected) == sorted(it.scores[name] for it in items if not it.error) and len(inspected) == 3
    heights, inspected, line = _figure_parts(inspector.histogram(name, 0.25))
    assert sum(heights) == 4 and line == 0.25 and inspected == []


def test_page_updates_the_rate_and_histogram_per_session(model, tmp_path):
    """The page's own event functions: inspecting and moving the threshold redraw one session's histogram and rate;
    another session's inspected scores stay out of it."""
    pytest.importorskip("gradio")
    from diffad.app import SessionFolders, build_app

    photos = _photos(tmp_path / "photos")
    inspector = Inspector(load_pipeline(model))
    folders = SessionFolders()
    demo = build_app(inspector, model, folders=folders)
    try:
        fns = {block.fn.__name__: block.fn for block in demo.fns.values() if block.fn is not None}
        name, threshold = inspector.default_map, inspector.threshold(inspector.default_map)
        files = [str(p) for p in sorted(photos.iterdir())]
        first = fns["inspect"](files, None, name, threshold)
        second = fns["inspect"](files[:1], None, name, threshold)  # another browser session, one photo
        session = first[0]
        assert first[0] is not second[0]
        assert len(_figure_parts(first[-1])[1]) == 3 and len(_figure_parts(second[-1])[1]) == 1
        moved = float(np.sort(inspector.heldout_scores(name))[1])
        *_, rate, figure = fns["redecide"](session, name, moved)
        assert _figure_parts(figure)[2] == moved and len(_figure_parts(figure)[1]) == 3
        assert "**50.0%** (2 of 4 held-out normal images" in rate
        assert "**50.0%**" not in first[-2]  # the calibrated threshold's rate was shown before
    finally:
        folders.close()


def test_a_calibration_without_heldout_scores_says_so(model, tmp_path):
    """A folder calibrated before the scores were stored: no rate, a sentence saying why, a histogram of what there
    is (threshold and inspected scores), nothing crashes."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(model, old)
    weights = old / "calibration" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["heldout_scores"]
    save_file(tensors, weights)
    config = json.loads((old / "calibration" / "config.json").read_text())
    del config["stores_heldout_scores"]
    (old / "calibration" / "config.json").write_text(json.dumps(config))
    inspector = Inspector(load_pipeline(old))
    name = inspector.default_map
    assert inspector.heldout_scores(name) is None and inspector.false_positive_rate(name, 0.5) is None
    assert "No histogram" in inspector.false_positive_text(name, 0.5) and "recalibrate" in \
        inspector.false_positive_text(name, 0.5)
    photos = _photos(tmp_path / "photos")
    heights, inspected, line = _figure_parts(inspector.histogram(name, 0.5, [inspector.inspect(photos / "0.png")]))
    assert heights == [] and len(inspected) == 1 and line == 0.5
