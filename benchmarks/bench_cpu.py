"""``make bench-cpu`` (issue 15): every CPU backend of the default detector, in one run, on the same trained models.

For three bottle DDPMs -- the tiny preset at 64 px (``make bench-quality``'s seed-0 model, 1500 steps, or trained
here with that budget when bench-quality has not run), the small preset at 64 px and at 128 px (trained here from
the real bottle images: 200 and 80 steps, bf16 autocast, resumable) -- and five backends:

* ``torch fp32`` and ``torch bf16``: the model folder calibrated with ``diffad calibrate --precision fp32|bf16``;
* ``OpenVINO fp32``, ``OpenVINO bf16`` and ``ONNX fp32``: ``diffad export`` of the calibration of that precision;

it measures

* **quality**: image and pixel AUROC (and AUPRO) of the default map on the real bottle test split, each backend in
  its own process with the same noise;
* **peak memory**: a fresh process loading the model and running one call on 16 test images, its high-water mark
  reset after the images are read (``/proc/self/clear_refs``), so that it measures the backend;
* **speed**, interleaved in one process so that the machine's load hits every backend alike: the UNet forward pass
  (batch 16) and the default detector end to end (16 test images per call), median over rounds, and the ratio to
  ``torch fp32``.

Writes ``<out>/bench_cpu.json`` and ``<out>/table.md``; re-runs skip models, calibrations, exports and evaluations
already done. Run with one thread (the Makefile sets ``OMP_NUM_THREADS=1``)::

    OMP_NUM_THREADS=1 python benchmarks/bench_cpu.py --out bench_output/cpu
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from harness import peak_rss_mib, reset_peak_rss, rss_mib

from diffad.workflow import train_ddpm_to_budget

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT.parent / "shared/data/mvtec_subset"
CATEGORY = "bottle"
#: name -> (preset, resolution, DDPM steps when trained here)
MODELS = {
    "tiny 64 px": ("tiny", 64, 1500),
    "small 64 px": ("small", 64, 200),
    "small 128 px": ("small", 128, 80),
}
#: Models taken from another benchmark when it has run: bench-quality's bottle seed-0 DDPM (1500 steps).
REUSED = {"tiny 64 px": REPO_ROOT / "bench_output/quality/bottle/seed0/models/bottle"}
BACKENDS = ("torch fp32", "torch bf16", "OpenVINO fp32", "OpenVINO bf16", "ONNX fp32")


def slug(text: str) -> str:
    return text.replace(" ", "_")


def train(folder: Path, preset: str, resolution: int, steps: int, seed: int) -> None:
    """The DDPM of ``training/train_ddpm.py`` with a step budget (bf16 autocast, resumes from ``latest``)."""
    if (folder / "model_index.json").is_file():
        return
    train_ddpm_to_budget(folder, steps=steps, seed=seed, checkpointing_steps=40, data_dir=DATA, category=CATEGORY,
                         preset=preset, resolution=resolution, train_batch_size=16, random_flip=True, use_ema=True,
                         learning_rate=1e-3, lr_warmup_steps=20, mixed_precision="bf16")


def backend_folders(model: Path, work: Path, seed: int) -> dict[str, Path]:
    """Calibrate DDPM-only copies of ``model`` in fp32 and bf16 (the real ``diffad calibrate``) and export them (the real
    ``diffad export``): one model folder per backend."""
    from diffad.calibration import calibrate_model
    from diffad.export import export_model
    from diffad.pipelines.self_aware_inpaint import SelfAwareInpaintPipeline

    folders = {}
    for precision in ("fp32", "bf16"):
        folder = work / f"torch_{precision}"
        if not (folder / "calibration" / "config.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            pipe = SelfAwareInpaintPipeline.from_pretrained(model)  # the DDPM alone: the default needs no segmenter
            SelfAwareInpaintPipeline(unet=pipe.unet, scheduler=pipe.scheduler).save_pretrained(folder)
            calibrate_model(folder, DATA, CATEGORY, config="fast", precision=precision, seed=seed, batch_size=16)
        folders[f"torch {precision}"] = folder
    for label, fmt, precision in (("OpenVINO fp32", "openvino", "fp32"), ("OpenVINO bf16", "openvino", "bf16"),
                                  ("ONNX fp32", "onnx", "fp32")):
        folder = work / f"{fmt}_{precision}"
        if not (folder / "export.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            export_model(folders[f"torch {precision}"], folder, fmt=fmt, precision=precision)
        folders[label] = folder
    return folders


def quality_worker(folder: str, out: str, seed: int) -> None:
    """In a fresh process: evaluate ``folder``'s default detector on the bottle test split, write JSON."""
    from diffad.data import load_mvtec
    from diffad.detect import load_pipeline
    from diffad.evaluation import evaluate_pipeline

    torch.set_num_threads(1)
    pipe = load_pipeline(folder)
    split = load_mvtec(DATA, CATEGORY, resolution=pipe.resolution, seed=seed)["test"]
    ev = evaluate_pipeline(pipe, split, methods=("self_aware",), batch_size=16, seed=seed, progress=False,
                           num_figure_rows=0)
    m = ev.metrics[f"self_aware/{pipe.default_map('self_aware')}"]
    Path(out).write_text(json.dumps({k: m[k] for k in ("image_auroc", "pixel_auroc", "aupro", "seconds_per_image",
                                                       "unet_passes_per_image")}))


def in_child(worker: str, folder: Path, out: Path, seed: int) -> dict:
    """Run ``--<worker>-worker`` (:func:`quality_worker` or :func:`memory_worker`) on ``folder`` in a fresh process,
    once: its JSON is written to ``out`` (under a temporary name until the child succeeds) and reused by re-runs."""
    if not out.is_file():
        tmp = out.with_suffix(".partial")
        subprocess.run([sys.executable, __file__, f"--{worker}-worker", str(folder), "--worker-out", str(tmp),
                        "--seed", str(seed)], check=True)
        tmp.replace(out)
    return json.loads(out.read_text())


def _test_images(resolution: int, seed: int) -> list:
    """16 test images spread over the bottle test split (good and defective), as PIL images."""
    from diffad.data import load_mvtec

    rows = load_mvtec(DATA, CATEGORY, resolution=resolution, seed=seed)["test"]
    return [rows[i]["image"].convert("RGB") for i in range(0, len(rows), max(1, len(rows) // 16))][:16]


def memory_worker(folder: str, out: str, seed: int) -> None:
    """In a fresh process: the peak resident memory of loading ``folder`` and one default call on 16 test images.
    The peak is reset (``/proc/self/clear_refs``) after the images are read, so it measures the backend."""
    import gc

    from diffad.detect import load_pipeline
    from diffad.pipelines.self_aware_inpaint import image_generator

    torch.set_num_threads(1)
    resolution = json.loads((Path(folder) / "unet" / "config.json").read_text())["sample_size"]
    images = _test_images(int(resolution), seed)
    gc.collect()
    baseline = rss_mib()
    reset_peak_rss()  # the high-water mark restarts from the current RSS
    pipe = load_pipeline(folder)
    pipe(images, generator=[image_generator(seed, im) for im in images], batch_size=16, output_type="np")
    Path(out).write_text(json.dumps({"peak_rss_mib": peak_rss_mib(), "baseline_rss_mib": baseline}))


def speed(folders: dict[str, Path], rounds: int, seed: int) -> dict:
    """UNet forward (batch 16) and the default detector on 16 test images, every backend interleaved per round."""
    from diffad.detect import load_pipeline
    from diffad.pipelines.self_aware_inpaint import image_generator

    pipes = {label: load_pipeline(folder) for label, folder in folders.items()}
    r = next(iter(pipes.values())).resolution
    images = _test_images(r, seed)
    x = torch.randn(16, 6, r, r, generator=torch.Generator().manual_seed(seed))
    t = torch.full((16,), 150, dtype=torch.long)
    forward: dict[str, list[float]] = {k: [] for k in pipes}
    end_to_end: dict[str, list[float]] = {k: [] for k in pipes}
    with torch.no_grad():
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            for label, pipe in pipes.items():
                with pipe._autocast(pipe.calibration.sampling):  # the precision the folder runs at
                    start = time.perf_counter()
                    pipe.unet(x, t)
                    forward[label].append(time.perf_counter() - start)
                start = time.perf_counter()
                pipe(images, generator=[image_generator(seed, im) for im in images], batch_size=16,
                     output_type="np")
                end_to_end[label].append((time.perf_counter() - start) / len(images))
    out = {}
    for name, times in (("forward_ms", forward), ("seconds_per_image", end_to_end)):
        base = statistics.median(times["torch fp32"][1:])
        for label, v in times.items():
            m = statistics.median(v[1:])
            out.setdefault(label, {})[name] = 1000 * m if name == "forward_ms" else m
            out[label][name.replace("_ms", "") + "_speedup"] = base / m
    return out


def table(result: dict) -> str:
    lines = ["Default detector (`combined`, 10 UNet passes) on the real bottle test split, one thread. Speed: "
             "interleaved in one process, median of rounds; quality: each backend in its own process, same noise; "
             "peak RSS: a fresh process loading the model and running one call on 16 test images (the images "
             "already read).", "",
             "| model | backend | forward (batch 16) ms | speed-up | s / image | speed-up | image AUROC | "
             "pixel AUROC | AUPRO | peak RSS MiB (over the process before loading) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for model, rows in result["models"].items():
        for label, v in rows.items():
            lines.append(f"| {model} | {label} | {v['forward_ms']:.1f} | {v['forward_speedup']:.2f}x | "
                         f"{v['seconds_per_image']:.4f} | {v['seconds_per_image_speedup']:.2f}x | "
                         f"{v['image_auroc']:.4f} | {v['pixel_auroc']:.4f} | {v['aupro']:.4f} | "
                         f"{v['peak_rss_mib']:.0f} (+{v['peak_rss_mib'] - v['baseline_rss_mib']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "bench_output/cpu"))
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated names of MODELS")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quality_worker:
        quality_worker(a.quality_worker, a.worker_out, a.seed)
        return 0
    if a.memory_worker:
        memory_worker(a.memory_worker, a.worker_out, a.seed)
        return 0
    torch.set_num_threads(1)
    from diffad.precision import cpu_has_bf16

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"category": CATEGORY, "cpu_has_bf16": cpu_has_bf16(), "threads": 1, "models": {},
                    "training": {}}
    for name in a.models.split(","):
        preset, resolution, steps = MODELS[name]
        work = out / slug(name)
        model = REUSED.get(name)
        if model is None or not (model / "model_index.json").is_file():
            model = out / "models" / f"{preset}_{resolution}"
            train(model, preset, resolution, steps, a.seed)
        log = model / "training_log.json"
        if log.is_file():
            summary = json.loads(log.read_text()).get("summary", {})
            result["training"][name] = {k: summary.get(k) for k in ("total_optimizer_steps", "train_seconds",
                                                                    "best_val_loss")}
        folders = backend_folders(model, work, a.seed)
        rows = {}
        for label in BACKENDS:
            quality = in_child("quality", folders[label], work / f"quality_{slug(label)}.json", a.seed)
            memory = in_child("memory", folders[label], work / f"memory_{slug(label)}.json", a.seed)
            rows[label] = {**quality, **memory}
        speed_file = work / "speed.json"
        if not speed_file.is_file():
            speed_file.write_text(json.dumps(speed(folders, a.rounds, a.seed), indent=2))
        for label, v in json.loads(speed_file.read_text()).items():
            rows[label].update(v)
        result["models"][name] = rows
        (out / "bench_cpu.json").write_text(json.dumps(result, indent=2))
        print(table(result), flush=True)
    (out / "table.md").write_text(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
