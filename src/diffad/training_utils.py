"""What diffad's training scripts share: checkpoint discovery and rotation, the training log, seeded
augmentations, the output-folder lock, progress and the time budget.

Checkpoint folders are written crash-safely through :mod:`diffad.files` and carry a marker file written last
(:data:`CHECKPOINT_MARKER`); :func:`latest_checkpoint` only takes folders that have it.

Other people's files: one run at a time writes an output folder (:func:`output_folder_lock`, an OS lock held by
the training scripts' ``main``), and in a checkpoint diffad deletes only the files its marker lists
(:func:`delete_checkpoint`); a checkpoint holding anything else is renamed aside, kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save_file

from diffad.files import PathLike, atomic_write_json, commit_directory, file_lock, incomplete_path, to_jsonable

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = [
    "BEST_WEIGHTS",
    "CHECKPOINT_PREFIX",
    "CHECKPOINT_MARKER",
    "TrainingLog",
    "TrainingProgress",
    "holds_output_folder",
    "output_folder_lock",
    "delete_checkpoint",
    "estimate_training_memory",
    "augment_batch",
    "available_memory",
    "check_training_memory",
    "checkpoint_step",
    "latest_checkpoint",
    "list_checkpoints",
    "namespace_from_config",
    "resolve_training_args",
    "parse_int_list",
    "resolve_resume",
    "rotate_checkpoints",
    "save_checkpoint",
    "time_budget_spent",
]

logger = logging.getLogger(__name__)

# The best-by-validation weights inside a checkpoint folder.
BEST_WEIGHTS = "best_unet.safetensors"

CHECKPOINT_PREFIX = "checkpoint"
CHECKPOINT_MARKER = "diffad_training_state.json"
#: diffad's own tensors in a checkpoint (the EMA's shadow weights), in safetensors: never a pickle.
STATE_TENSORS = "diffad_state.safetensors"
_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
#: The lock file a training run holds in its output folder.
TRAIN_LOCK_NAME = ".diffad-train.lock"

# --------------------------------------------------------------------------- the output folder


@contextlib.contextmanager
def output_folder_lock(folder: PathLike, flag: str = "--output_dir") -> Iterator[None]:
    """Hold ``folder/.diffad-train.lock`` (:func:`file_lock`) for a training run: a second run into the same folder
    fails at once with one line (``ValueError``) instead of overwriting the first one's checkpoints and weights."""
    folder = Path(folder)
    lock = file_lock(folder / TRAIN_LOCK_NAME, blocking=False)
    try:
        lock.__enter__()
    except BlockingIOError:
        raise ValueError(f"another diffad training run is writing to {folder}: wait for it to finish, or pass "
                         f"another {flag}") from None
    try:
        yield
    finally:
        lock.__exit__(None, None, None)


def holds_output_folder(attr: str, flag: str, *, create: bool = True) -> Callable:
    """Decorate a training script's ``main(args)`` to run under :func:`output_folder_lock` of ``args.<attr>``,
    taken by the main process of the launch only (rank 0; the others write where it says). With ``create=False``
    a folder that does not exist is left to ``main`` to report."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def locked(args, *rest, **kwargs):
            folder = Path(getattr(args, attr))
            if os.environ.get("RANK", "0") != "0" or not (create or folder.is_dir()):
                return main(args, *rest, **kwargs)
            with output_folder_lock(folder, flag):
                return main(args, *rest, **kwargs)
        return locked
    return decorate


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: PathLike) -> Optional[int]:
    """The optimiser step of a checkpoint folder named ``checkpoint-<step>``, else ``None``."""
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def list_checkpoints(output_dir: PathLike) -> List[Path]:
    """Complete checkpoints in ``output_dir``, oldest (lowest step) first.

    A checkpoint is complete when its folder is named ``checkpoint-<step>`` and holds
    :data:`CHECKPOINT_MARKER` (written last, before the folder is renamed into place).
    Anything else (a temporary ``.checkpoint-N.incomplete``, or a ``checkpoint-N`` folder without
    the marker, e.g. copied by hand or written by another tool) is skipped with a warning.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        step = checkpoint_step(p)
        if step is None or not p.is_dir():
            continue
        if not (p / CHECKPOINT_MARKER).is_file():
            logger.warning("ignoring %s: it has no %s (a half-written checkpoint)", p, CHECKPOINT_MARKER)
            continue
        found.append((step, p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The complete checkpoint with the highest step in ``output_dir``, or ``None`` when there is none."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: PathLike, total_limit: Optional[int]) -> List[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit`` remain.

    Call it after a new checkpoint has been committed (so the newest is never at risk).
    ``None`` or 0 keeps everything.

    Returns:
        The deleted checkpoint folders.
    """
    if not total_limit:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = checkpoints[: max(0, len(checkpoints) - int(total_limit))]
    for p in doomed:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", p, total_limit)
        delete_checkpoint(p)
    return doomed


def delete_checkpoint(folder: Path) -> List[Path]:
    """Delete a checkpoint folder's files that diffad wrote (those its marker lists), then its empty folders. A
    checkpoint that still holds anything (a user's file; or no list: written by diffad 0.3 or earlier) is renamed
    to ``<name>.kept-<ns>``, so no resume takes it, and each kept file is named in a warning. Returns the kept
    files."""
    try:
        listed = json.loads((folder / CHECKPOINT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    root = folder.resolve()
    for rel in listed or []:
        path = folder / rel
        inside = not Path(rel).is_absolute() and ".." not in Path(rel).parts and path.parent.resolve().is_relative_to(root)
        if inside and (path.is_file() or path.is_symlink()):
            path.unlink()
    for dirpath, _, _ in os.walk(folder, topdown=False):
        if not os.listdir(dirpath):
            os.rmdir(dirpath)
    if not folder.exists():
        return []
    kept = sorted(p for p in folder.rglob("*") if not p.is_dir())
    aside = folder.with_name(f"{folder.name}.kept-{time.time_ns()}")
    os.replace(folder, aside)
    logger.warning("kept %s as %s: it holds files diffad did not write (%s)", folder, aside,
                   ", ".join(str(p.relative_to(folder)) for p in kept[:10]) or "no file list")
    return [aside / p.relative_to(folder) for p in kept]


# --------------------------------------------------------------------------- the training log


class TrainingLog:
    """The ``training_log.json`` of a run: configuration, one record per epoch, and a summary.

    Each epoch record is a dict (e.g. ``{"epoch": 3, "step": 120, "train_loss": 0.08,
    "val_loss": 0.07, ...}``). The log is part of a checkpoint's state (``state_dict`` /
    ``load_state_dict``) so a resumed run continues it instead of starting over.
    """

    def __init__(self, config: Optional[Dict[str, Any]] = None):
        self.config: Dict[str, Any] = dict(config or {})
        self.epochs: List[Dict[str, Any]] = []
        self.summary: Dict[str, Any] = {}

    def add_epoch(self, record: Dict[str, Any]) -> None:
        """Append (or, for an epoch that was recorded before a resume, replace) one epoch record."""
        record = to_jsonable(record)
        self.epochs = [e for e in self.epochs if e.get("epoch") != record.get("epoch")]
        self.epochs.append(record)
        self.epochs.sort(key=lambda e: e.get("epoch", 0))

    def state_dict(self) -> Dict[str, Any]:
        return {"config": to_jsonable(self.config), "epochs": list(self.epochs), "summary": to_jsonable(self.summary)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epochs = list(state.get("epochs", []))
        self.summary = dict(state.get("summary", {}))

    def save(self, path: PathLike) -> Path:
        """Write the log atomically to ``path``."""
        return atomic_write_json(path, self.state_dict())


# --------------------------------------------------------------------------- augmentation and flags


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    flip: bool = False,
    rot90: bool = False,
) -> torch.Tensor:
    """Per-sample random horizontal/vertical flips and 90-degree rotations, drawn from ``generator``.

    Off by default in training: many industrial parts are not symmetric (a transistor's
    legs, a screw's thread), so a flipped good part can look like a defect.

    Args:
        images: ``(B, C, H, W)`` with ``H == W`` when ``rot90``; any range.
        generator: a CPU ``torch.Generator``.
        flip: flip each image left-right and (independently) up-down with probability 0.5.
        rot90: rotate each image by k * 90 degrees, k uniform in {0, 1, 2, 3}.

    Returns:
        A new tensor of the same shape, dtype and device.
    """
    if not (flip or rot90):
        return images
    if rot90 and images.shape[-1] != images.shape[-2]:
        raise ValueError(f"rot90 needs square images, got {tuple(images.shape[-2:])}")
    b = images.shape[0]
    hflip = torch.rand(b, generator=generator) < 0.5
    vflip = torch.rand(b, generator=generator) < 0.5
    turns = torch.randint(0, 4, (b,), generator=generator)
    out = []
    for i in range(b):
        x = images[i]
        if flip and hflip[i]:
            x = x.flip(-1)
        if flip and vflip[i]:
            x = x.flip(-2)
        if rot90 and turns[i]:
            x = torch.rot90(x, int(turns[i]), dims=(-2, -1))
        out.append(x)
    return torch.stack(out)


def split_list(text: Union[str, Sequence[Any]]) -> list:
    """``"a,b c"`` -> ``["a", "b", "c"]`` (commas or spaces); a sequence as a list: what a list flag holds."""
    if not isinstance(text, str):
        return list(text)
    return [p for p in re.split(r"[,\s]+", text.strip()) if p]


def parse_int_list(text: Union[str, Sequence[int]]) -> tuple:
    """``"16,32,64"`` (or ``"16 32 64"``, or a sequence) -> ``(16, 32, 64)``; for argparse ``type=``."""
    if not isinstance(text, str):
        return tuple(int(v) for v in text)
    parts = split_list(text)
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def namespace_from_config(parser: argparse.ArgumentParser, config: Union[Mapping[str, Any], Any]) -> argparse.Namespace:
    """A training script's flags from a config object instead of a command line: ``config`` (a dataclass instance
    or a mapping) names flags by their destination (``{"preset": "tiny", "max_train_steps": 100}`` for
    ``--preset tiny --max_train_steps 100``); every other flag keeps its default. A string value goes through the
    flag's ``type`` as on the command line (``"16,32"`` for an integer list; a string default too, as argparse
    does).

    Raises:
        ValueError: a name that is no flag of ``parser``, a value outside a flag's choices, or a required flag
            missing, each in one line naming it.
    """
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise ValueError(f"expected a dataclass instance, a mapping, a Namespace or a command line, got "
                         f"{type(config).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest != argparse.SUPPRESS and a.dest != "help"}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"{parser.prog}: unknown settings {unknown}: each must be a flag name without the dashes "
                         f"(see --help)")
    args = argparse.Namespace()
    for dest, action in actions.items():
        if dest not in values and action.required:
            raise ValueError(f"{parser.prog}: the setting {dest!r} (--{dest}) is required")
        value = values.get(dest, action.default)
        if isinstance(value, str) and callable(action.type):
            value = action.type(value)
        if action.choices is not None and value is not None and value not in action.choices:
            raise ValueError(f"{parser.prog}: {dest}={value!r} is not one of {list(action.choices)}")
        setattr(args, dest, value)
    return args


def resolve_training_args(config: Union[argparse.Namespace, Sequence[str], Mapping[str, Any], Any, None], *,
                          parse_args: Callable[[Optional[Sequence[str]]], argparse.Namespace],
                          parser: Callable[[], argparse.ArgumentParser],
                          finish: Callable[[argparse.Namespace], argparse.Namespace]) -> argparse.Namespace:
    """A training script's parsed flags from what its ``main`` was given: a ``Namespace`` as it is (what
    ``parse_args`` returned), a command line (None: ``sys.argv[1:]``) through ``parse_args``, a dataclass instance
    or mapping of flag names through :func:`namespace_from_config` of ``parser()`` and then ``finish`` (the
    script's defaults and checks, as ``parse_args`` applies them)."""
    if isinstance(config, argparse.Namespace):
        return config
    if config is None or (isinstance(config, Sequence) and not isinstance(config, str)):
        return parse_args(config)
    return finish(namespace_from_config(parser(), config))


# --------------------------------------------------------------------------------------
# Checkpoints, shared by train_ddpm.py and train_segmenter.py
# --------------------------------------------------------------------------------------
def ema_state(ema) -> tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """An ``EMAModel``'s state as JSON-able scalars and named tensors (for :data:`STATE_TENSORS`)."""
    state = ema.state_dict()
    tensors = {f"ema.{i}": t.detach().cpu().contiguous() for i, t in enumerate(state.pop("shadow_params"))}
    return to_jsonable(state), tensors


def load_ema_state(ema, scalars: Dict[str, Any], checkpoint: Path) -> None:
    """Restore an ``EMAModel`` from :func:`ema_state`'s parts saved in ``checkpoint``."""
    from safetensors.torch import load_file

    path = checkpoint / STATE_TENSORS
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no {STATE_TENSORS} (its EMA state): it was written by diffad "
                                "0.2, which pickled it; resume it with diffad 0.2 or start a new run")
    tensors = load_file(str(path))
    shadow = [tensors[f"ema.{i}"] for i in range(len(tensors))]
    device = ema.shadow_params[0].device if ema.shadow_params else "cpu"
    ema.load_state_dict({**scalars, "shadow_params": [t.to(device) for t in shadow]})


def save_checkpoint(accelerator: "Accelerator", output_dir: Path, step: int, state: Dict[str, Any],
                    best_weights: Optional[Dict[str, torch.Tensor]], total_limit: Optional[int],
                    tensors: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Save a resumable checkpoint ``output_dir/checkpoint-<step>`` crash-safely.

    Every process writes its share (``accelerator.save_state``: model, optimiser, lr scheduler)
    into ``.checkpoint-<step>.incomplete``; then the main process adds the best weights and
    ``tensors`` (e.g. the EMA, :data:`STATE_TENSORS`) as safetensors and the training state (JSON, the
    marker file, written last) and renames the folder. accelerate's pickled RNG states are deleted: every
    random draw of diffad's training comes from a generator seeded by its position
    (:func:`seeded_generator`), and a checkpoint should hold no pickle.
    """
    dest = output_dir / f"checkpoint-{step}"
    tmp = incomplete_path(dest)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for pickled in tmp.glob("random_states_*.pkl"):
            pickled.unlink()
        if best_weights is not None:
            save_file({k: v.contiguous() for k, v in best_weights.items()}, str(tmp / BEST_WEIGHTS))
        if tensors:
            save_file(tensors, str(tmp / STATE_TENSORS))
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
        # the marker lists every file of the checkpoint: what a later clean-up may delete, and nothing else
        atomic_write_json(tmp / CHECKPOINT_MARKER, {**state, "files": [*files, CHECKPOINT_MARKER]})
        commit_directory(tmp, dest)
        rotate_checkpoints(output_dir, total_limit)
        logger.info("saved checkpoint %s", dest)
    accelerator.wait_for_everyone()
    return dest


def clear_checkpoints(output_dir: PathLike) -> List[Path]:
    """Remove every ``checkpoint-<step>`` folder directly in ``output_dir`` (``--overwrite_output_dir``: a new run
    must never resume an old run's checkpoints), deleting only the files diffad wrote (:func:`delete_checkpoint`:
    a folder holding other files is renamed aside, kept). Only real folders inside ``output_dir`` are touched: a
    symbolic link is unlinked, never followed. Returns the removed paths."""
    output_dir = Path(output_dir)
    removed: List[Path] = []
    if not output_dir.is_dir():
        return removed
    root = output_dir.resolve()
    for p in sorted(output_dir.iterdir()):
        if checkpoint_step(p) is None:
            continue
        if p.is_symlink():
            p.unlink()
        elif p.is_dir() and p.resolve().parent == root:
            delete_checkpoint(p)
        else:
            continue
        removed.append(p)
    if removed:
        logger.info("--overwrite_output_dir: removed %d old checkpoint(s) from %s: %s", len(removed), output_dir,
                    ", ".join(p.name for p in removed))
    return removed


def check_resume_config(path: Path, saved: Dict[str, Any], config: Dict[str, Any], keys: Sequence[str]) -> None:
    """Refuse to resume checkpoint ``path`` when the run that wrote it (``saved``: its marker's ``log.config``)
    differs from this run's ``config`` in any of ``keys``: one line naming the first difference."""
    old = (saved.get("log") or {}).get("config") or {}
    for key in keys:
        if key == "data_fingerprint" and key in old and key in config and to_jsonable(old[key]) != to_jsonable(
                config[key]):
            raise ValueError(f"--resume_from_checkpoint: {path} was trained on other images (their content "
                             "differs, whatever the folder's name); resume with that run's data, or start a new run "
                             "with --overwrite_output_dir or another --output_dir")
        if key in old and key in config and to_jsonable(old[key]) != to_jsonable(config[key]):
            raise ValueError(f"--resume_from_checkpoint: {path} belongs to a run with {key}={old[key]!r}, this run "
                             f"has {key}={config[key]!r}; resume with the same settings, or start a new run with "
                             "--overwrite_output_dir or another --output_dir")


def resolve_resume(args: argparse.Namespace, output_dir: Path) -> Optional[Path]:
    """The checkpoint to resume from, or ``None`` for a fresh start."""
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            logger.info("no complete checkpoint in %s: starting a new training run", output_dir)
        return path
    path = Path(args.resume_from_checkpoint)
    if not (path / CHECKPOINT_MARKER).is_file():
        raise FileNotFoundError(f"--resume_from_checkpoint {path} is not a complete checkpoint folder "
                                f"(no {CHECKPOINT_MARKER}); pass 'latest' or a checkpoint-<step> folder")
    return path


# --------------------------------------------------------------------------- progress and the time budget


class TrainingProgress:
    """A training progress bar with a real total: optimiser steps of ``max_steps``, or, with a time budget and no
    step limit, seconds of the budget (elapsed and remaining of the budget, the step count in the postfix),
    never a made-up step total.

    Args:
        max_steps: the step limit, or None when only ``time_budget`` bounds the run.
        time_budget: seconds, or None.
        initial_steps / initial_seconds: where a resumed run starts.
        desc: the bar's label; disable: no bar (other ranks).
    """

    def __init__(self, *, max_steps: Optional[int], time_budget: Optional[float], initial_steps: int = 0,
                 initial_seconds: float = 0.0, desc: str = "steps", disable: bool = False):
        from tqdm.auto import tqdm

        self.by_time = max_steps is None and bool(time_budget)
        if self.by_time:
            self.bar = tqdm(total=round(float(time_budget)), initial=min(round(initial_seconds), round(time_budget)),
                            desc=f"{desc} (time budget)", unit="s", disable=disable,
                            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
        else:
            self.bar = tqdm(total=max_steps, initial=initial_steps, desc=desc, disable=disable)

    def step(self, global_step: int, train_seconds: float, **postfix: Any) -> None:
        """One optimiser step done (``global_step`` in all, ``train_seconds`` of training so far)."""
        if self.by_time:
            self.bar.n = min(round(train_seconds), self.bar.total)
            self.bar.set_postfix(step=global_step, **postfix)
        else:
            self.bar.update(1)
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def time_budget_spent(accelerator: "Accelerator", train_seconds: float, time_budget: Optional[float]) -> bool:
    """Whether ``--max_train_minutes`` (``time_budget`` seconds; None = no budget) is spent on any rank.

    All ranks take part in one reduction, so every rank stops at the same optimiser step.
    """
    if time_budget is None:
        return False
    over = torch.tensor([float(train_seconds >= time_budget)], device=accelerator.device)
    return float(accelerator.reduce(over, reduction="sum")) > 0


# --------------------------------------------------------------------------------------
# Memory: refuse a run that cannot fit before it starts (the kernel's OOM killer gives no message)
# --------------------------------------------------------------------------------------
#: The smallest side (px) of the probe forwards that :func:`estimate_training_memory` scales up.
_PROBE_SIDE = 32


def available_memory(device: Union[str, torch.device, None] = None) -> int:
    """Bytes a new training run can still allocate on ``device``: a CUDA device's free memory
    (``torch.cuda.mem_get_info``), else the host's available memory (psutil's ``available``, or
    ``MemAvailable`` in ``/proc/meminfo``), capped by a cgroup v2 limit (``memory.max`` less ``memory.current``,
    plus the inactive page cache) when the process runs in a container with one.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        free = int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; /proc/meminfo is the fallback on Linux
        text = Path("/proc/meminfo").read_text()
        free = int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            stat = Path("/sys/fs/cgroup/memory.stat").read_text()
            cache = re.search(r"^inactive_file (\d+)", stat, re.M)  # page cache the kernel gives back first
            free = min(free, int(limit) - used + (int(cache.group(1)) if cache else 0))
    except (OSError, ValueError):
        pass
    return free


def _saved_for_backward(unet: torch.nn.Module, side: int) -> tuple:
    """``(total, largest)`` bytes autograd saves in a forward of ``unet`` (on the meta device: no memory, no
    arithmetic) on one ``side x side`` sample. Attention is counted as memory-efficient kernels (PyTorch's SDPA on
    CPU and GPU) hold it, a few tensors of its input's size, not the ``tokens x tokens`` matrix the meta device's
    reference implementation would save (the probe swaps ``F.scaled_dot_product_attention`` for one that saves
    that much, and puts it back)."""
    import torch.nn.functional as F

    def efficient_attention(query, key, value, *args, **kwargs):  # saves query, key, value and one product
        return (query * key + value) * value

    with torch.device("meta"):
        sample = torch.zeros(1, unet.config.in_channels, side, side)
        timestep = torch.zeros(1, dtype=torch.long)
    sizes: List[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    reference, F.scaled_dot_product_attention = F.scaled_dot_product_attention, efficient_attention
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            unet(sample, timestep)
    finally:
        F.scaled_dot_product_attention = reference
    return sum(sizes), max(sizes)


@functools.lru_cache(maxsize=16)
def _probe_unet(config_json: str) -> tuple:
    """``(probe side, saved bytes at it, saved bytes at twice it, the largest saved tensor there, parameters)`` of
    the ``UNet2DModel`` of ``config_json`` (cached: a run's flags are parsed more than once)."""
    from diffusers import UNet2DModel

    config = json.loads(config_json)
    with torch.device("meta"):
        unet = UNet2DModel(**config)
    probe = max(_PROBE_SIDE, 2 ** (len(config["block_out_channels"]) - 1))
    small, _ = _saved_for_backward(unet, probe)
    big, largest = _saved_for_backward(unet, 2 * probe)
    return probe, small, big, largest, sum(p.numel() for p in unet.parameters())


def estimate_training_memory(unet_config: Dict[str, Any], *, crop_size: int, resolution: int, batch_size: int,
                             eval_batch_size: int, use_ema: bool, mixed_precision: Optional[str] = None) -> int:
    """A conservative estimate, in bytes, of the peak memory of one DDPM training process.

    The UNet's activations are measured, not guessed: forward passes of ``UNet2DModel(**unet_config)`` on the meta
    device (no memory, no arithmetic) at two small probe sizes count the bytes autograd saves for the backward pass;
    their difference is the part that grows with the pixels (the rest is the saved weights), scaled to
    ``crop_size``. The peak is then

    * ``batch_size`` crops' saved activations times 1.5 plus two of the largest maps per crop (the backward pass's
      gradients and workspaces: a real step of the tiny UNet on 4 x 256 px crops peaked at 1.4 times the saved
      activations on CPU), or the validation pass's ``eval_batch_size`` crops with three of the largest maps each (no graph), whichever is
      larger; activations count half with ``mixed_precision`` fp16/bf16;
    * the parameters 4 times (weights, gradients, Adam's two moments), once more for the EMA and once for the best
      weights kept on the host;
    * the batch of ``resolution x resolution`` images and four crop-sized tensors per image (crop, noise, noisy
      image, self-conditioning estimate).

    Args:
        unet_config: ``UNet2DModel`` constructor arguments (:func:`diffad.presets.unet_kwargs`).
        crop_size: the UNet's input side ``R`` (px).
        resolution: the working resolution ``S`` the images are resized to (px).
        batch_size: training crops per process per step.
        eval_batch_size: validation crops per forward pass.
        use_ema: an exponential moving average of the weights is kept.
        mixed_precision: ``"fp16"``/``"bf16"`` halve the activations; anything else counts fp32.
    """
    probe, small, big, largest, num_params = _probe_unet(json.dumps(to_jsonable(unet_config), sort_keys=True))
    per_pixel = max(big - small, 0) / (3 * probe ** 2)
    shrink = 0.5 if mixed_precision in ("fp16", "bf16") else 1.0
    per_crop = per_pixel * crop_size ** 2 * shrink
    largest = largest * (crop_size / (2 * probe)) ** 2 * shrink
    activations = max(batch_size * (1.5 * per_crop + 2 * largest), eval_batch_size * 3 * largest)
    params = num_params * 4 * (4 + int(use_ema) + 1)
    images = batch_size * 3 * 4 * (resolution ** 2 + 4 * crop_size ** 2)
    return int(activations + params + images)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def check_training_memory(needed: int, *, what: str, fix: str, device: Union[str, torch.device, None] = None,
                          processes: int = 1) -> None:
    """Refuse, in one line (``ValueError``), a run whose estimated peak (``needed`` bytes per process, ``processes``
    of them sharing the host's memory on CPU) exceeds :func:`available_memory`, instead of letting the kernel kill
    it with no message.

    Args:
        needed: the estimate of one process (:func:`estimate_training_memory`).
        what: the run in words, e.g. ``"8 x 4096 px crops of 4096 px images (tiny preset)"``.
        fix: the flags to change, e.g. ``"lower --resolution, --crop_size or --train_batch_size"``.
        device: where the run allocates (default: CUDA when available, else the host).
        processes: training processes on this machine (CUDA: one device each, so not multiplied).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = needed * (processes if device.type == "cpu" else 1)
    free = available_memory(device)
    if total > free:
        where = "GPU memory" if device.type == "cuda" else "memory"
        raise ValueError(f"training on {what} needs about {_gib(total)} of {where} and {_gib(free)} is available: "
                         f"{fix}")
