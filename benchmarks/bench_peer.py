"""``make bench-peer`` (issue 20, item 5): anomalib's DRAEM as a peer, on diffad's categories, splits and budget.

Runs with ``.venv-peer/bin/python`` (anomalib 2.x + the CPU torch; diffad is NOT installed there and is never
imported here). For each real category and seed, one *cell*:

1. **split**: diffad's own rule, written by ``peer_diffad.py split`` under diffad's venv
   (``load_mvtec(root, category, validation_fraction=0.2, seed=seed)``) to ``<cell>/split.json``. DRAEM trains on
   its ``train`` files only (the seeded 20% validation share is held out, as for diffad) and is tested on the
   whole ``test`` split.
2. **train**: anomalib's DRAEM torch model and loss (``anomalib.models.image.draem``: ``DraemModel``,
   ``DraemLoss``) and its anomaly generator (``PerlinAnomalyGenerator``, textures from ``--anomaly_source``, the
   shared DTD subset) in a plain torch loop with anomalib's optimiser (Adam, lr 1e-4) and schedule (x0.1 at
   epochs 400 and 600, counted in steps: never reached at a CPU budget), 256 px, batch 8, a
   budget in optimiser **steps** (``--steps``), one torch thread. No pretrained weights. Checkpointed every
   ``--checkpoint_every`` seconds (model, optimiser, schedule, RNG), so an interrupted cell resumes where it was;
   batches are a seeded permutation per epoch, so a resumed run draws the same batches. ``--device cuda``: the
   same initial weights, batches and anomaly draws (all made on the CPU), trained and tested on a GPU; only float
   rounding differs, and each cell records its device.
3. **test**: the model's softmax anomaly map at 256 px for every test image (batch 1, timed), and two image
   scores: ``anomalib`` (the model's own ``pred_score``: max of the map) and ``mean11`` (the DRAEM paper's rule as
   the issue states it: an 11x11 mean filter, ``avg_pool2d(stride=1, padding=5)``, then the max); ``mean21`` is the
   same with the 21x21 filter of the authors' released test code (``test_DRAEM.py``), for reference.
4. **metrics**: ``peer_diffad.py metrics`` under diffad's venv: ``diffad.metrics.compute_anomaly_metrics`` with
   diffad's own ground truth (image AUROC, image F1-max, pixel AUROC, AUPRO at 30% FPR), raw scores, no min-max.

Each cell writes ``<out>/<category>/seed<k>/metrics.json`` and is skipped when it exists; ``<out>/peer.json`` holds
per category mean ± std over seeds for every scoring rule, steps, CPU-minutes of training per cell and seconds
per test image, and the mean over categories as bench_quality.py takes it (per seed, then mean ± std over
seeds). On a GPU machine, with a copy of the shared data: ``DIFFAD_BENCH_DATA=<copy> python bench_peer.py --device
cuda --jobs 3 --diffad_python <the python that has diffad>``. ``--measure_steps N`` only times N training steps
(after 1 warm-up step) and prints seconds per step; use it to set ``--steps`` for another budget.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness import REAL_CATEGORIES, SHARED_DATA, mean_over_categories, peak_rss_mib

logger = logging.getLogger("bench_peer")

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the shared real data and category -> the MVTec AD-layout root that holds it (the same as bench_quality.py's)
SHARED, CATEGORIES = SHARED_DATA, REAL_CATEGORIES
#: default optimiser steps per cell: ~30 CPU-minutes on one thread at 256 px, batch 8 (~81 CPU-seconds a step,
#: measured with ``--measure_steps`` on the 2-core machine under load; see the README), the issue's training budget
#: per category, which diffad's default fills (DDPM ~13 CPU-minutes, head 12-17). About one epoch.
DEFAULT_STEPS = 22
QUICK_STEPS = 3
RULES = ("anomalib", "mean11", "mean21")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


# ---------------------------------------------------------------------------------------------------- data

def load_images(folder: Path, names: list[str], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) float in [0, 1]: RGB, bicubic resize when the file is not R x R (as diffad's loader)."""
    out = torch.empty(len(names), 3, resolution, resolution)
    for i, name in enumerate(names):
        with Image.open(folder / name) as im:
            im = im.convert("RGB")
            if im.size != (resolution, resolution):
                im = im.resize((resolution, resolution), Image.BICUBIC)
            out[i] = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    return out


def anomaly_generator(source: Path):
    """anomalib's ``PerlinAnomalyGenerator`` with texture images read by PIL.

    Its own reader is ``torchvision.io.read_image``, whose decoders do not work with the PyPI torchvision build
    on the CPU torch; the generator's logic is untouched.
    """
    from anomalib.data.utils.generators import perlin

    class _PILReader:
        class ImageReadMode:  # noqa: D106 - the one mode the generator asks for
            RGB = "RGB"

        _cache: dict[str, torch.Tensor] = {}

        @classmethod
        def read_image(cls, path: str, mode: str = "RGB") -> torch.Tensor:
            if path not in cls._cache:
                with Image.open(path) as im:
                    cls._cache[path] = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
            return cls._cache[path]

    perlin.io = _PILReader
    gen = perlin.PerlinAnomalyGenerator(anomaly_source_path=source, blend_factor=(0.1, 1.0))  # anomalib Draem's beta
    if not gen.anomaly_source_paths:
        raise SystemExit(f"no texture images under {source}")
    gen.anomaly_source_paths.sort()  # rglob order is the file system's: sort for reproducible draws
    return gen


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """Images of one step: consecutive slices of a seeded permutation per epoch (stateless, so resumable)."""
    out = []
    for k in range(step * batch, step * batch + batch):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[pos]))
    return out


# ---------------------------------------------------------------------------------------------------- train

def build(steps_per_epoch: int, source: Path, device: str = "cpu"):
    """anomalib's ``Draem``: model (on ``device``, initialised on the CPU from the seed, so every device starts
    from the same weights), loss, Adam lr 1e-4 and ``MultiStepLR`` x0.1 at epochs 400 and 600 (anomalib steps it
    once per epoch; here per step, so the milestones are those epochs counted in steps)."""
    from anomalib.models.image.draem.loss import DraemLoss
    from anomalib.models.image.draem.torch_model import DraemModel

    model = DraemModel(sspcab=False).to(device)
    loss_fn = DraemLoss().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    milestones = [400 * steps_per_epoch, 600 * steps_per_epoch]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    return model, loss_fn, opt, sched, anomaly_generator(source)


def train_step(model, loss_fn, opt, sched, gen, images: torch.Tensor) -> float:
    """One optimiser step. The anomalies are drawn on the CPU (the same draws on every device), then the batch
    moves to the model's device."""
    augmented, mask = gen(images)
    device = next(model.parameters()).device
    images, augmented, mask = images.to(device), augmented.to(device), mask.to(device)
    reconstruction, prediction = model(augmented)
    loss = loss_fn(images, reconstruction, mask, prediction)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return float(loss.detach())


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(cell: Path, train_x: torch.Tensor, steps: int, batch: int, seed: int, source: Path,
          checkpoint_every: float, device: str = "cpu") -> dict:
    """Train (or resume) one cell; returns the training log. Final weights: ``<cell>/model.pt``."""
    final = cell / "model.pt"
    log_path = cell / "train_log.json"
    if final.exists() and log_path.exists():
        return json.loads(log_path.read_text())
    torch.manual_seed(seed)
    n = train_x.shape[0]
    model, loss_fn, opt, sched, gen = build(math.ceil(n / batch), source, device)
    ckpt_path = cell / "checkpoint.pt"
    state = {"step": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0, "losses": []}
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        torch.set_rng_state(ck["rng"])
        state = ck["state"]
        logger.info("%s: resumed at step %d/%d", cell, state["step"], steps)
    model.train()
    cpu0, wall0, last_save = time.process_time(), time.perf_counter(), time.perf_counter()
    cpu_base, wall_base = state["cpu_seconds"], state["wall_seconds"]

    def checkpoint():
        state["cpu_seconds"] = cpu_base + time.process_time() - cpu0
        state["wall_seconds"] = wall_base + time.perf_counter() - wall0
        save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                     "rng": torch.get_rng_state(), "state": state}, ckpt_path)

    while state["step"] < steps:
        idx = batch_indices(state["step"], batch, n, seed)
        loss = train_step(model, loss_fn, opt, sched, gen, train_x[idx])
        state["step"] += 1
        state["losses"].append(round(loss, 5))
        if state["step"] % 10 == 0 or state["step"] == steps:
            logger.info("%s: step %d/%d loss %.4f (%.1f CPU-s/step so far)", cell.name, state["step"], steps, loss,
                        (cpu_base + time.process_time() - cpu0) / state["step"])
        if time.perf_counter() - last_save > checkpoint_every and state["step"] < steps:
            checkpoint()
            last_save = time.perf_counter()
    state["cpu_seconds"] = cpu_base + time.process_time() - cpu0
    state["wall_seconds"] = wall_base + time.perf_counter() - wall0
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, final.with_suffix(".tmp"))
    os.replace(final.with_suffix(".tmp"), final)
    log = {"steps": steps, "batch_size": batch, "train_images": n, "epochs": steps * batch / n, "device": device,
           "lr_milestones": sorted(sched.milestones),
           "cpu_minutes": state["cpu_seconds"] / 60, "wall_minutes": state["wall_seconds"] / 60,
           "cpu_seconds_per_step": state["cpu_seconds"] / steps,
           "final_loss_mean10": float(np.mean(state["losses"][-10:])), "losses": state["losses"]}
    log_path.write_text(json.dumps(log, indent=1))
    ckpt_path.unlink(missing_ok=True)
    return log


# ---------------------------------------------------------------------------------------------------- test

@torch.no_grad()
def predict(model, test_x: torch.Tensor) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Anomaly maps (N, R, R) and image scores per rule, batch 1, timed per image."""
    model.eval()
    device = next(model.parameters()).device
    maps, scores = [], {r: [] for r in RULES}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(test_x.shape[0]):
        out = model(test_x[i:i + 1].to(device))
        amap = out.anomaly_map.float().cpu()  # (1, R, R): softmax of the defect class (the copy waits for the GPU)
        scores["anomalib"].append(float(out.pred_score.reshape(-1)[0]))
        for k in (11, 21):
            pooled = torch.nn.functional.avg_pool2d(amap[:, None], k, stride=1, padding=k // 2)
            scores[f"mean{k}"].append(float(pooled.amax()))
        maps.append(amap[0].numpy().astype(np.float32))
    n = max(1, test_x.shape[0])
    timing = {"test_wall_seconds_per_image": (time.perf_counter() - wall0) / n,
              "test_cpu_seconds_per_image": (time.process_time() - cpu0) / n}
    return np.stack(maps), {k: np.asarray(v, np.float64) for k, v in scores.items()}, timing


def pick_test(rows: list[dict], limit: int | None) -> list[dict]:
    """All test rows, or (smoke runs) ``limit`` of them, half good and half defective, spread over each list."""
    if not limit or limit >= len(rows):
        return rows
    good = [r for r in rows if r["label"] == 0]
    bad = [r for r in rows if r["label"] == 1]
    n_good = max(1, min(len(good), limit // 2))
    n_bad = max(1, min(len(bad), limit - n_good))
    spread = lambda xs, k: [xs[round(i * (len(xs) - 1) / max(1, k - 1))] for i in range(k)]  # noqa: E731
    return spread(good, n_good) + spread(bad, n_bad)


# ---------------------------------------------------------------------------------------------------- cells

def run_cell(args, category: str, seed: int) -> dict:
    cell = args.out / category / f"seed{seed}"
    done = cell / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    split = json.loads((cell / "split.json").read_text())
    root = CATEGORIES[category]  # this machine's copy of the data (the split names files inside the category)
    folder = root / category
    torch.set_num_threads(args.threads)
    train_x = load_images(folder, split["train"], args.resolution)
    log = train(cell, train_x, args.steps, args.batch_size, seed, args.anomaly_source, args.checkpoint_every,
                args.device)
    del train_x
    from anomalib.models.image.draem.torch_model import DraemModel

    model = DraemModel(sspcab=False)
    model.load_state_dict(torch.load(cell / "model.pt", weights_only=True))
    model.to(args.device)
    rows = pick_test(split["test"], args.max_test_images)
    test_x = load_images(folder, [r["file_name"] for r in rows], args.resolution)
    maps, scores, timing = predict(model, test_x)
    np.savez_compressed(cell / "predictions.npz", file_names=np.asarray([r["file_name"] for r in rows]),
                        anomaly_maps=maps, **{f"score_{k}": v for k, v in scores.items()})
    subprocess.run([str(args.diffad_python), str(REPO_ROOT / "benchmarks" / "peer_diffad.py"), "metrics",
                    "--cell", str(cell), "--root", str(root), "--category", category], check=True)
    result = {"category": category, "seed": seed, "resolution": args.resolution, "threads": args.threads,
              "test_images": len(rows), "test_images_total": len(split["test"]),
              **{k: v for k, v in log.items() if k != "losses"}, **timing,
              "peak_rss_gib": peak_rss_mib() / 1024,
              "metrics": json.loads((cell / "scores.json").read_text())["rules"]}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, done)
    if not args.keep_weights:
        (cell / "model.pt").unlink(missing_ok=True)
    return result


def summarise(results: list[dict], config: dict) -> dict:
    def ms(values: list[float]) -> dict:
        a = np.asarray(values, float)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "n": int(a.size)}

    out = {"config": config, "categories": {}}
    for category in dict.fromkeys(r["category"] for r in results):
        cells = sorted((r for r in results if r["category"] == category), key=lambda r: r["seed"])
        entry = {"seeds": [c["seed"] for c in cells], "rules": {},
                 "steps": cells[0]["steps"], "epochs": cells[0]["epochs"],
                 "train_images": cells[0]["train_images"], "test_images": cells[0]["test_images"],
                 "device": ",".join(sorted({c.get("device", "cpu") for c in cells})),
                 "cpu_minutes_per_cell": [round(c["cpu_minutes"], 2) for c in cells],
                 "wall_minutes_per_cell": [round(c["wall_minutes"], 2) for c in cells],
                 "test_wall_seconds_per_image": ms([c["test_wall_seconds_per_image"] for c in cells]),
                 "test_cpu_seconds_per_image": ms([c["test_cpu_seconds_per_image"] for c in cells])}
        for rule in RULES:
            entry["rules"][rule] = {m: ms([c["metrics"][rule][m] for c in cells]) for m in METRICS}
        out["categories"][category] = entry
    # bench_quality's rule, one helper: the mean over categories per seed (seeds every category ran), then mean ± std
    categories = list(out["categories"])
    out["mean_over_categories"] = {
        rule: mean_over_categories({(r["category"], r["seed"]): r["metrics"][rule] for r in results}, categories,
                                   METRICS)
        for rule in RULES}
    return out


def table(summary: dict) -> str:
    lines = ["| category | rule | image AUROC | pixel AUROC | AUPRO | image F1-max | steps | device | CPU-min/cell "
             "| s/image wall (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for category, e in summary["categories"].items():
        for rule in ("anomalib", "mean11"):
            r = e["rules"][rule]
            f = lambda m: f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f}"  # noqa: E731
            lines.append(f"| {category} | {rule} | {f('image_auroc')} | {f('pixel_auroc')} | {f('aupro')} | "
                         f"{f('image_f1_max')} | {e['steps']} | {e['device']} | {np.mean(e['cpu_minutes_per_cell']):.1f} | "
                         f"{e['test_wall_seconds_per_image']['mean']:.2f} ({e['test_cpu_seconds_per_image']['mean']:.2f}) |")
    return "\n".join(lines)


def measure(args) -> None:
    """Seconds per training step (1 warm-up step, then ``--measure_steps``), on bottle's first images."""
    torch.set_num_threads(args.threads)
    folder = CATEGORIES["bottle"] / "bottle" / "train" / "good"
    names = sorted(p.name for p in folder.iterdir())[:32]
    x = load_images(folder, names, args.resolution)
    torch.manual_seed(0)
    model, loss_fn, opt, sched, gen = build(math.ceil(x.shape[0] / args.batch_size), args.anomaly_source, args.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    cpu, wall = [], []
    for step in range(1 + args.measure_steps):
        idx = batch_indices(step, args.batch_size, x.shape[0], 0)
        c0, w0 = time.process_time(), time.perf_counter()
        train_step(model, loss_fn, opt, sched, gen, x[idx])
        c1, w1 = time.process_time() - c0, time.perf_counter() - w0
        logger.info("step %d%s: %.1f CPU-s, %.1f wall-s", step, " (warm-up)" if step == 0 else "", c1, w1)
        if step >= 1:
            cpu.append(c1)
            wall.append(w1)
    c0, w0 = time.process_time(), time.perf_counter()
    _, _, timing = predict(model, x[:8])
    result = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "resolution": args.resolution,
              "parameters_millions": n_params / 1e6, "steps_timed": len(cpu),
              "cpu_seconds_per_step_mean": float(np.mean(cpu)), "cpu_seconds_per_step_median": float(np.median(cpu)),
              "wall_seconds_per_step_mean": float(np.mean(wall)), "wall_seconds_per_step_median": float(np.median(wall)),
              "steps_in_15_cpu_minutes": int(900 / np.median(cpu)), **timing,
              "peak_rss_gib": peak_rss_mib() / 1024,
              "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.measure_output:
        args.measure_output.parent.mkdir(parents=True, exist_ok=True)
        args.measure_output.write_text(json.dumps(result, indent=1))


def _parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_output" / "peer")
    p.add_argument("--categories", default=",".join(CATEGORIES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help=f"optimiser steps per cell (default {DEFAULT_STEPS}, "
                   f"about 30 CPU-minutes on one thread; --quick: {QUICK_STEPS})")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads per cell process")
    p.add_argument("--device", default="cpu", help="where DRAEM trains and runs (e.g. cuda): the same steps, "
                   "batches and anomaly draws as on the CPU, float rounding aside; recorded in each cell")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once, each in its own process")
    p.add_argument("--anomaly_source", type=Path, default=SHARED / "textures")
    p.add_argument("--diffad_python", type=Path, default=REPO_ROOT / ".venv" / "bin" / "python",
                   help="diffad's interpreter, for the split and the metrics")
    p.add_argument("--checkpoint_every", type=float, default=300.0, help="seconds between training checkpoints")
    p.add_argument("--max_test_images", type=int, default=None, help="smoke runs only: a subset of the test split")
    p.add_argument("--keep_weights", action="store_true", help="keep <cell>/model.pt (about 0.4 GB per cell)")
    p.add_argument("--quick", action="store_true", help=f"one seed (0), {QUICK_STEPS} steps")
    p.add_argument("--measure_steps", type=int, default=0, help="only time this many training steps and exit")
    p.add_argument("--measure_output", type=Path, default=None)
    p.add_argument("--run-cell", dest="run_cell", default=None, help=argparse.SUPPRESS)
    return p


def _settings(args: argparse.Namespace) -> dict:
    """What a cell's figures depend on, recorded in ``<out>/config.json`` (and checked against an earlier run's)."""
    return {"model": "anomalib DRAEM (DraemModel, DraemLoss, PerlinAnomalyGenerator), no pretrained weights",
            "anomalib": _version("anomalib"), "torch": torch.__version__, "steps": args.steps,
            "batch_size": args.batch_size, "resolution": args.resolution, "threads_per_cell": args.threads,
            "optimizer": "Adam lr 1e-4, x0.1 at epochs 400 and 600 (anomalib's Draem)",
            "anomaly_source": _data_path(args.anomaly_source), "max_test_images": args.max_test_images,
            "split": "diffad.data.load_mvtec(root, category, validation_fraction=0.2, seed=seed): train on train, "
                     "test on the whole test split",
            "rules": {"anomalib": "the model's pred_score (max of the softmax anomaly map)",
                      "mean11": "11x11 mean filter (avg_pool2d stride 1, padding 5) on the map, then max",
                      "mean21": "21x21 mean filter (the authors' test_DRAEM.py), then max"},
            "metrics": "diffad.metrics.compute_anomaly_metrics (raw scores), pixel metrics on the softmax map"}


def _data_path(path: Path) -> str:
    """``path`` as recorded in a results folder: relative to the shared data where it lies there (a copy of the data
    on another machine is the same data), else as given."""
    try:
        return "<shared data>/" + Path(path).resolve().relative_to(SHARED_DATA.resolve()).as_posix()
    except ValueError:
        return str(path)


def _run_cells(args: argparse.Namespace, cells: list[tuple[str, int]]) -> None:
    """Run every cell not done yet, each in its own process (``--run-cell``), ``--jobs`` at once."""
    t0 = time.perf_counter()

    def launch(cell):
        category, seed = cell
        if (args.out / category / f"seed{seed}" / "metrics.json").exists():
            return
        cmd = [sys.executable, __file__, "--run-cell", f"{category}:{seed}", "--out", str(args.out),
               "--steps", str(args.steps), "--batch_size", str(args.batch_size), "--resolution", str(args.resolution),
               "--threads", str(args.threads), "--device", args.device, "--anomaly_source", str(args.anomaly_source),
               "--diffad_python", str(args.diffad_python), "--checkpoint_every", str(args.checkpoint_every)]
        if args.max_test_images:
            cmd += ["--max_test_images", str(args.max_test_images)]
        if args.keep_weights:
            cmd.append("--keep_weights")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        logger.info("cell %s seed %d: start", category, seed)
        subprocess.run(cmd, check=True, env=env)
        logger.info("cell %s seed %d: done (%.1f min since start)", category, seed, (time.perf_counter() - t0) / 60)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(launch, cells))


def main() -> None:
    p = _parser()
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out = args.out.resolve()
    try:
        if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device here")
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}; use cpu, or cuda on a machine with a GPU")
    if args.measure_steps:
        return measure(args)
    if args.quick:
        args.seeds = "0"
    if args.steps is None:
        args.steps = QUICK_STEPS if args.quick else DEFAULT_STEPS
    if args.run_cell:
        category, seed = args.run_cell.split(":")
        run_cell(args, category, int(seed))
        return

    categories = [c for c in args.categories.split(",") if c]
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        p.error(f"--categories: unknown {unknown}; choose from {', '.join(CATEGORIES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.diffad_python.exists():
        p.error(f"--diffad_python {args.diffad_python} not found: run `make venv` first (diffad's venv)")
    config = _settings(args)
    args.out.mkdir(parents=True, exist_ok=True)
    cfg_path = args.out / "config.json"
    keys = ("steps", "batch_size", "resolution", "max_test_images", "anomaly_source")
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        clash = {k: (old.get(k), config[k]) for k in keys if old.get(k) != config[k]}
        if clash:
            p.error(f"{args.out} holds cells run with other settings {clash}: pick another --out or delete it")
    cfg_path.write_text(json.dumps(config, indent=1))

    for category in categories:  # diffad's split, under diffad's venv
        subprocess.run([str(args.diffad_python), str(REPO_ROOT / "benchmarks" / "peer_diffad.py"), "split",
                        "--root", str(CATEGORIES[category]), "--category", category,
                        "--seeds", ",".join(map(str, seeds)), "--out", str(args.out)], check=True)

    cells = [(c, s) for c in categories for s in seeds]
    _run_cells(args, cells)

    results = [json.loads((args.out / c / f"seed{s}" / "metrics.json").read_text()) for c, s in cells]
    summary = summarise(results, config)
    (args.out / "peer.json").write_text(json.dumps(summary, indent=1))
    md = table(summary)
    (args.out / "table.md").write_text(md + "\n")
    print(md)
    print(f"wrote {args.out / 'peer.json'}")


def _version(name: str) -> str:
    from importlib.metadata import version

    try:
        return version(name)
    except Exception:  # noqa: BLE001
        return "unknown"


if __name__ == "__main__":
    main()
