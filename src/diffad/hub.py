"""``diffad push``: publish a trained, calibrated model folder to the Hugging Face Hub.

Steps (each a function, so scripts and tests can run them separately):

1. :func:`check_publishable` refuses a folder that is not a diffad model, is not calibrated, or has no
   model card (``README.md``, written by ``diffad card``): exit code 2 with one line saying what to run.
2. :func:`assemble_hub_folder` copies an allow-list into a temporary folder: ``model_index.json``, the
   component folders' configs and safetensors (``unet/``, ``scheduler/``, ``segmenter/``, ``calibration/``),
   ``README.md`` and the training logs with local paths replaced by their last part; the pipeline's code
   (``pipeline.py`` and its siblings, ``calibration/anomaly_calibration.py``) is installed diffad's own files,
   never the folder's, with ``model_index.json`` pointed at them. Nothing is read through a symbolic link (a link is
   an error naming it); checkpoints, stray files, caches and pickles stay behind.
3. :func:`check_loads_offline` loads that folder with ``DiffusionPipeline.from_pretrained(folder,
   trust_remote_code=True)`` in a FRESH Python process with ``HF_HUB_OFFLINE=1``, a private
   ``HF_HOME`` and ``diffad`` made unimportable: exactly what a Hub user with diffusers alone gets. The only
   code it runs is diffad's own pipeline code (step 2), never code that came with the model folder.
4. :func:`push_model` then calls ``HfApi().create_repo`` and ``HfApi().upload_folder``;
   ``--dry-run`` stops right before and lists what would be uploaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import huggingface_hub
from huggingface_hub.utils import HFValidationError, validate_repo_id

from diffad.app import write_space
from diffad.model_folder import (CALIBRATION_COMPONENT, CARD_FILE, CODE_FILES, COMPONENT_CODE, COMPONENT_FILES,
                                 EXPORT_FILE, HANDLER_FILE, HUB_TOP_LEVEL_FILES, LOG_FILES, PIPELINE_FILE,
                                 calibration_config, components, is_exported, read_json, read_model_index)
from diffad.pipelines.self_aware_inpaint import folder as pipeline_folder, inspection as handler_module

__all__ = [
    "PushResult",
    "check_publishable",
    "assemble_hub_folder",
    "check_loads_offline",
    "push_model",
    "register",
    "run",
]

logger = logging.getLogger(__name__)

LOAD_CHECK_TIMEOUT_S = 600
#: What the load check loads a folder with: diffusers alone, or with diffad's runtime networks when exported.
_LOADS_WITH = {False: "diffusers alone", True: "diffusers and diffad.networks"}

_LOAD_CHECK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    if sys.argv[2] == "exported":  # `diffad export`'s networks are diffad.networks components: diffad[openvino]
        import diffad.networks
    else:
        sys.modules["diffad"] = None  # the check must pass with diffusers alone, as on a Hub user's machine
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    components = sorted(k for k, v in pipe.components.items() if v is not None)
    sampling = pipe.calibration.sampling if pipe.is_calibrated else None
    print(json.dumps({"class": type(pipe).__name__, "calibrated": pipe.is_calibrated, "components": components,
                      "sampling": None if sampling is None else (sampling.preset_name or "custom")}))
    """
)


@dataclass
class PushResult:
    """What :func:`push_model` did: the files it (would have) uploaded, and the repo URL when uploaded."""

    repo_id: str
    files: list[str] = field(default_factory=list)
    uploaded: bool = False
    url: Optional[str] = None
    load_check: dict = field(default_factory=dict)
    #: ``--with-space``: the Space repo id, its files and, once uploaded, its URL.
    space_id: Optional[str] = None
    space_files: list[str] = field(default_factory=list)
    space_url: Optional[str] = None


def check_publishable(model_dir: str | os.PathLike) -> dict:
    """Refuse folders that must not go to the Hub; return their model_index.json.

    Raises:
        FileNotFoundError: no model folder, no ``pipeline.py``, a component folder missing.
        ValueError: not calibrated, or calibrated by diffad 0.1 (``diffad calibrate``), or no model card
            (``diffad card``).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir} does not exist")
    index = read_model_index(model_dir)
    if CALIBRATION_COMPONENT not in components(index):
        raise ValueError(f"{model_dir} is not calibrated: run `diffad calibrate --model {model_dir} --data DIR "
                         "--category C` before pushing (a Hub model must answer pass/fail out of the box)")
    calibration = calibration_config(model_dir)
    if calibration is not None and calibration.get("sampling_config") is None:
        raise ValueError(f"{model_dir} was calibrated by diffad 0.1, which did not record its sampler: run "
                         f"`diffad calibrate --model {model_dir} --data DIR --category C` again before pushing")
    if not (model_dir / CARD_FILE).is_file():
        raise ValueError(f"{model_dir} has no model card ({CARD_FILE}): run `diffad card --model {model_dir} "
                         "--results RESULTS.json` before pushing")
    if not (model_dir / PIPELINE_FILE).is_file():
        raise FileNotFoundError(f"{model_dir} has no {PIPELINE_FILE}: re-save it with "
                                "SelfAwareInpaintPipeline.from_pretrained(dir).save_pretrained(dir)")
    for name in components(index):
        if not (model_dir / name).is_dir():
            raise FileNotFoundError(f"{model_dir}/model_index.json names component {name!r} but {model_dir / name} "
                                    "does not exist")
    return index


def _strip_local_paths(value):
    """JSON ``value`` with every absolute local path replaced by its last part (``/home/me/data/bottle`` ->
    ``bottle``)."""
    if isinstance(value, dict):
        return {k: _strip_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_local_paths(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith(("~", "./", "../"))):
        return Path(value).name
    return value


def _source_file(model_dir: Path, rel: str) -> Optional[Path]:
    """``model_dir/rel`` when it is a regular file inside ``model_dir``; a link (or a path through one) is refused."""
    path = model_dir / rel
    if not os.path.lexists(path):
        return None
    current = model_dir
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            raise ValueError(f"{current} is a symbolic link: diffad push never follows links; replace it with the "
                             "file itself")
    return path if path.is_file() else None


def assemble_hub_folder(model_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the files a Hub repo needs from ``model_dir`` into ``dest`` (created); return their relative paths.

    Only an allow-list is copied (:data:`HUB_TOP_LEVEL_FILES`, :data:`COMPONENT_FILES`), never through a symbolic
    link; the logs lose their local paths; and the pipeline's code (:data:`CODE_FILES`, and ``calibration/``'s
    module) is installed diffad's own files, never the folder's, with ``model_index.json`` pointed at them
    (``folder.write_code``, as ``save_pretrained`` does), so checking and publishing run no code from the folder; so
    is ``handler.py`` (Inference Endpoints' ``EndpointHandler``, :mod:`diffad.pipelines.self_aware_inpaint.inspection`),
    written into every repo."""
    model_dir, dest = Path(model_dir), Path(dest)
    index = check_publishable(model_dir)
    dest.mkdir(parents=True, exist_ok=True)
    package = Path(pipeline_folder.__file__).parent
    own_code = {rel: package / Path(rel).name
                for rel in (*CODE_FILES, *(f"{c}/{f}" for c, names in COMPONENT_CODE.items() for f in names))}
    own_code[HANDLER_FILE] = Path(handler_module.__file__)
    wanted = list(HUB_TOP_LEVEL_FILES)
    wanted += [f"{c}/{f}" for c in components(index) for f in COMPONENT_FILES.get(c, ())]
    files: list[str] = []
    for rel in wanted:
        source = _source_file(model_dir, rel)
        if rel in own_code:  # always written, diffad's own (below)
            if source is not None and source.read_bytes() != own_code[rel].read_bytes():
                logger.warning("%s differs from diffad's %s: publishing diffad's own", source, own_code[rel].name)
            files.append(rel)
            continue
        if source is None:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in LOG_FILES:
            (dest / rel).write_text(json.dumps(_strip_local_paths(read_json(source)), indent=2), encoding="utf-8")
        else:
            shutil.copyfile(source, dest / rel)
        files.append(rel)
    pipeline_folder.write_code(dest)  # the pipeline's code, and model_index.json pointed at it
    shutil.copyfile(own_code[HANDLER_FILE], dest / HANDLER_FILE)
    unknown = [c for c in components(index) if c not in COMPONENT_FILES]
    if unknown:
        raise ValueError(f"{model_dir}/model_index.json names components diffad does not publish: {unknown}")
    return sorted(files)


def check_loads_offline(folder: str | os.PathLike, *, timeout: float = LOAD_CHECK_TIMEOUT_S) -> dict:
    """Load ``folder`` with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` in a fresh,
    offline process where ``diffad`` cannot be imported; return what it reported. A ``diffad export`` folder
    (``export.json``) is loaded after ``import diffad.networks`` instead: its networks are that module's components.

    Raises:
        RuntimeError: the folder does not load (the child's last error line is in the message),
            or it loads as an uncalibrated pipeline.
    """
    with tempfile.TemporaryDirectory(prefix="diffad-load-check-") as hf_home:
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=hf_home, HF_DATASETS_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1")
        exported = is_exported(folder)
        proc = subprocess.run([sys.executable, "-c", _LOAD_CHECK_SCRIPT, str(Path(folder).resolve()),
                               "exported" if exported else "torch"],
                              env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        alone = _LOADS_WITH[exported]
        raise RuntimeError(f"the Hub folder does not load with {alone}: {lines[-1] if lines else proc.returncode}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report.get("calibrated"):
        raise RuntimeError("the Hub folder loads but its pipeline is not calibrated")
    return report


def push_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    dry_run: bool = False,
    commit_message: Optional[str] = None,
    space_id: Optional[str] = None,
) -> PushResult:
    """Assemble, check and upload ``model_dir`` as the Hub model repo ``repo_id``.

    Args:
        model_dir: a calibrated model folder with a model card.
        repo_id: ``ORG/NAME`` (or ``NAME`` for the token's user).
        private: create the repo private.
        token: a Hub token (default: ``huggingface_hub``'s, from ``HF_TOKEN`` or ``hf auth login``).
        dry_run: stop before ``create_repo``/``upload_folder``; the result lists what would be uploaded.
        commit_message: the upload's commit message.
        space_id: also write the Space of ``diffad space`` for ``repo_id`` and upload it as the Gradio Space
            ``space_id`` (Spaces and models have separate namespaces: ``repo_id`` itself is a fine choice).

    Raises:
        ValueError / FileNotFoundError: a bad repo id or a model that may not be published.
        RuntimeError: the assembled folder does not load offline.
    """
    for flag, value in (("--repo-id", repo_id), ("--with-space", space_id)):
        try:
            if value is not None:
                validate_repo_id(value)
        except HFValidationError as exc:
            raise ValueError(f"{flag} {value!r} is not a valid Hub repo id (ORG/NAME): {exc}") from exc
    if not dry_run and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError("HF_HUB_OFFLINE is set: unset it to push (the Makefile sets it for tests), "
                         "or pass --dry-run")
    result = PushResult(repo_id=repo_id, space_id=space_id)
    with tempfile.TemporaryDirectory(prefix="diffad-hub-") as tmp:
        folder = Path(tmp) / "repo"
        result.files = assemble_hub_folder(model_dir, folder)
        logger.info("checking that %s loads offline in a fresh process", folder)
        result.load_check = check_loads_offline(folder)
        space = Path(tmp) / "space"
        if space_id is not None:
            result.space_files = sorted(p.name for p in write_space(model_dir, repo_id, space))
        if dry_run:
            return result
        api = huggingface_hub.HfApi(token=token)
        repo_url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or f"Upload diffad model from {Path(model_dir).name}")
        result.uploaded = True
        result.url = str(repo_url)
        if space_id is not None:  # after the model: the Space loads it by its id on start
            space_url = api.create_repo(repo_id=space_id, repo_type="space", space_sdk="gradio", private=private,
                                        exist_ok=True)
            api.upload_folder(folder_path=str(space), repo_id=space_id, repo_type="space",
                              commit_message=f"diffad app for {repo_id}")
            result.space_url = str(space_url)
    return result


def register(subparsers) -> None:
    """Add ``diffad push`` to the ``diffad`` command."""
    parser = subparsers.add_parser(
        "push", help="publish a calibrated model with its card to the Hugging Face Hub",
        description="Assemble the Hub folder (weights, calibration, model_index.json, the pipeline code, README.md), "
                    "check it loads with diffusers alone in a fresh offline process, then upload it. Refuses an "
                    "uncalibrated model or one without a model card (exit 2).")
    parser.add_argument("--model", required=True, help="the model folder")
    parser.add_argument("--repo-id", required=True, help="the Hub model repo, ORG/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--dry-run", action="store_true", help="assemble and check, list the files, upload nothing")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--with-space", nargs="?", const="", default=None, metavar="SPACE_ID",
                        help="also upload the Gradio Space of `diffad space` that serves the model (default Space "
                             "id: the model's --repo-id; Spaces have their own namespace)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``diffad push``: exit 0, 2 for a model that may not be published, 1 when the check or upload fails."""
    space_id = None if args.with_space is None else (args.with_space or args.repo_id)
    result = push_model(args.model, args.repo_id, private=args.private, token=args.token, dry_run=args.dry_run,
                        space_id=space_id)
    if not result.uploaded:
        print(f"dry run: would upload {len(result.files)} files to {args.repo_id} "
              f"({'private' if args.private else 'public'}); the folder loads with "
              f"{_LOADS_WITH[EXPORT_FILE in result.files]} "
              f"({result.load_check.get('class')}, components: {', '.join(result.load_check.get('components', []))}, "
              f"sampling config: {result.load_check.get('sampling')}):")
        for name in result.files:
            print(f"  {name}")
        if space_id is not None:
            print(f"and the Space {space_id} (gradio): {', '.join(result.space_files)}")
    else:
        print(f"uploaded {len(result.files)} files to {result.url}")
        if result.space_url:
            print(f"uploaded the Space ({', '.join(result.space_files)}) to {result.space_url}")
    return 0
