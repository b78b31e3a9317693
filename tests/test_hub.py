"""`diffad push`: refusals, the assembled folder, the offline load check, the upload call (recorded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffad.cli import main
from tiny_components import calibrate_cheaply, tiny_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """``ready``: calibrated, with a card and training leftovers; ``uncalibrated``; ``no_card``; ``old_calibration``:
    ready but calibrated by diffad 0.1 (no sampling config)."""
    root = tmp_path_factory.mktemp("hub")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "uncalibrated")
    (root / "uncalibrated" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    calibrate_cheaply(pipe)
    pipe.save_pretrained(root / "no_card")
    shutil.copytree(root / "no_card", root / "ready")
    (root / "ready" / "README.md").write_text("---\nlicense: apache-2.0\nlibrary_name: diffusers\n---\n# card\n")
    (root / "ready" / "training_log.json").write_text(json.dumps({"config": {}}))
    (root / "ready" / "checkpoint-10").mkdir()
    (root / "ready" / "checkpoint-10" / "optimizer.bin").write_bytes(b"x" * 100)
    (root / "ready" / "unet" / "stale.bin").write_bytes(b"pickle")
    shutil.copytree(root / "ready", root / "old_calibration")
    config_path = root / "old_calibration" / "calibration" / "config.json"
    config_path.write_text(json.dumps(dict(json.loads(config_path.read_text()), sampling_config=None)))
    return {name: root / name for name in ("ready", "uncalibrated", "no_card", "old_calibration")}


EXPECTED_FILES = [
    "README.md", "anomaly_calibration.py", "calibration/anomaly_calibration.py", "calibration/config.json",
    "calibration/diffusion_pytorch_model.safetensors", "folder.py", "handler.py", "images.py", "maps.py",
    "model_index.json", "pipeline.py", "scheduler/scheduler_config.json", "tiles.py", "training_log.json",
    "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
]


def test_assemble_copies_only_what_the_hub_needs(folders, tmp_path):
    from diffad.hub import assemble_hub_folder

    files = assemble_hub_folder(folders["ready"], tmp_path / "repo")
    assert files == EXPECTED_FILES
    on_disk = sorted(p.relative_to(tmp_path / "repo").as_posix() for p in (tmp_path / "repo").rglob("*") if p.is_file())
    assert on_disk == EXPECTED_FILES  # no checkpoints, no pickles


def test_push_dry_run_checks_loading_and_uploads_nothing(folders, capsys, monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda *a, **k: calls.append((a, k)))
    code = main(["push", "--model", str(folders["ready"]), "--repo-id", "acme/diffad-weave", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and calls == []
    assert "dry run: would upload 16 files to acme/diffad-weave" in out
    assert "SelfAwareInpaintPipeline" in out and "calibration, scheduler, unet" in out
    assert "sampling config: custom" in out  # the tiny model is calibrated with a cheap custom config
    for name in EXPECTED_FILES:
        assert f"  {name}\n" in out


def test_push_calls_create_repo_and_upload_folder(folders, monkeypatch):
    import huggingface_hub

    from diffad.hub import push_model

    recorded: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            recorded["token"] = token

        def create_repo(self, **kwargs):
            recorded["create_repo"] = kwargs
            return "https://huggingface.co/acme/diffad-weave"

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            recorded["files"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            recorded["upload_folder"] = kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # the real fresh-process check is exercised by the dry-run test; here only its call is recorded
    checked = []
    monkeypatch.setattr("diffad.hub.check_loads_offline",
                        lambda folder: checked.append(sorted(p.name for p in Path(folder).iterdir())) or {"calibrated": True})
    result = push_model(folders["ready"], "acme/diffad-weave", private=True, token="hf_x")
    assert result.uploaded and result.url == "https://huggingface.co/acme/diffad-weave"
    assert recorded["token"] == "hf_x"
    assert recorded["create_repo"] == {"repo_id": "acme/diffad-weave", "repo_type": "model", "private": True,
                                       "exist_ok": True}
    assert recorded["upload_folder"]["repo_id"] == "acme/diffad-weave"
    assert recorded["files"] == EXPECTED_FILES
    assert checked == [sorted({f.split("/")[0] for f in EXPECTED_FILES})]  # checked before the upload


def test_push_with_space_uploads_the_space_after_the_model(folders, monkeypatch, capsys):
    import huggingface_hub

    calls: list = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, **kwargs):
            calls.append(("create_repo", kwargs))
            return f"https://huggingface.co/{'spaces/' if kwargs['repo_type'] == 'space' else ''}{kwargs['repo_id']}"

        def upload_folder(self, **kwargs):
            folder = Path(kwargs["folder_path"])
            calls.append(("upload_folder", {"repo_id": kwargs["repo_id"], "repo_type": kwargs["repo_type"],
                                            "files": {p.name: p.read_text() for p in folder.iterdir()
                                                      if kwargs["repo_type"] == "space"}}))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("diffad.hub.check_loads_offline", lambda folder: {"calibrated": True})
    code = main(["push", "--model", str(folders["ready"]), "--repo-id", "acme/diffad-weave", "--with-space"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [(name, kw["repo_type"], kw["repo_id"]) for name, kw in calls] == [
        ("create_repo", "model", "acme/diffad-weave"), ("upload_folder", "model", "acme/diffad-weave"),
        ("create_repo", "space", "acme/diffad-weave"), ("upload_folder", "space", "acme/diffad-weave")]
    assert calls[2][1]["space_sdk"] == "gradio"
    space = calls[3][1]["files"]
    assert sorted(space) == ["README.md", "app.py", "requirements.txt"]
    assert '"acme/diffad-weave"' in space["app.py"] and "sdk: gradio" in space["README.md"]
    assert "uploaded the Space (README.md, app.py, requirements.txt) to https://huggingface.co/spaces/acme" in out

    calls.clear()  # another Space id, and a dry run that lists the Space and uploads nothing
    code = main(["push", "--model", str(folders["ready"]), "--repo-id", "acme/diffad-weave", "--with-space",
                 "acme/weave-station", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and calls == []
    assert "and the Space acme/weave-station (gradio): README.md, app.py, requirements.txt" in out
    code = main(["push", "--model", str(folders["ready"]), "--repo-id", "acme/diffad-weave", "--with-space", "a/b/c"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--with-space 'a/b/c' is not a valid Hub repo id" in err[0]


def test_push_offline_is_refused_before_uploading(folders, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", "--model", str(folders["ready"]), "--repo-id", "acme/x"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


@pytest.mark.parametrize("which, message", [
    ("uncalibrated", "is not calibrated: run `diffad calibrate"),
    ("no_card", "has no model card (README.md): run `diffad card"),
    ("old_calibration", "was calibrated by diffad 0.1, which did not record its sampler: run `diffad calibrate"),
])
def test_push_refuses_unfinished_models(folders, capsys, which, message):
    code = main(["push", "--model", str(folders[which]), "--repo-id", "acme/x", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("diffad push: error: ") and message in err[0]


def test_push_bad_repo_id_and_missing_folder(folders, tmp_path, capsys):
    assert main(["push", "--model", str(folders["ready"]), "--repo-id", "bad id!", "--dry-run"]) == 2
    assert "is not a valid Hub repo id" in capsys.readouterr().err
    assert main(["push", "--model", str(tmp_path / "nope"), "--repo-id", "acme/x", "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_load_check_fails_on_a_broken_folder(folders, tmp_path):
    from diffad.hub import assemble_hub_folder, check_loads_offline

    assemble_hub_folder(folders["ready"], tmp_path / "repo")
    (tmp_path / "repo" / "pipeline.py").write_text("raise ImportError('broken pipeline file')\n")
    with pytest.raises(RuntimeError, match="does not load with diffusers alone"):
        check_loads_offline(tmp_path / "repo")


def test_push_installs_diffads_own_code_in_a_folder_saved_with_one_pipeline_file(folders, tmp_path):
    """A folder saved before the code was split (``calibration: ["pipeline", ...]``, ``calibration/pipeline.py``, no
    siblings) or carrying code of its own: the Hub folder gets diffad's files, model_index.json pointed at them, and
    loads with diffusers alone."""
    from diffad.hub import assemble_hub_folder, check_loads_offline
    from diffad.pipelines.self_aware_inpaint import folder as pipeline_folder

    old = tmp_path / "old"
    shutil.copytree(folders["ready"], old)
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps(dict(index, calibration=["pipeline", "AnomalyCalibration"])))
    (old / "calibration" / "anomaly_calibration.py").rename(old / "calibration" / "pipeline.py")
    for name in ("anomaly_calibration.py", "folder.py", "images.py", "tiles.py"):
        (old / name).unlink()
    marker = tmp_path / "ran.txt"
    (old / "maps.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")  # must never run
    assert assemble_hub_folder(old, tmp_path / "repo") == EXPECTED_FILES
    package = Path(pipeline_folder.__file__).parent
    for rel in EXPECTED_FILES:
        if rel.endswith(".py") and rel != "handler.py":
            assert (tmp_path / "repo" / rel).read_bytes() == (package / Path(rel).name).read_bytes(), rel
    assert json.loads((tmp_path / "repo" / "model_index.json").read_text())["calibration"] == [
        "anomaly_calibration", "AnomalyCalibration"]
    assert check_loads_offline(tmp_path / "repo")["calibrated"] and not marker.exists()
