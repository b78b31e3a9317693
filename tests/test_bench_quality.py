"""benchmarks/bench_quality.py trains its DDPMs through the library's harness with the arguments it always used."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffad.training import train_ddpm
from diffad.training.train_ddpm import step_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_quality  # noqa: E402


def _old_argv(model: Path, data: Path, category: str, seed: int, ddpm_steps) -> list[str]:
    """The command line ``run_ddpm_phase`` built before it called ``train_ddpm_to_budget``."""
    argv = ["--data_dir", str(data), "--category", category, "--output_dir", str(model),
            "--seed", str(seed), "--report_to", "none", "--checkpointing_steps", "250",
            "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]
    return argv + (["--max_train_steps", str(ddpm_steps)] if ddpm_steps else [])


@pytest.mark.parametrize("ddpm_steps", [None, 400])
def test_run_ddpm_phase_trains_with_the_arguments_it_always_used(tmp_path, monkeypatch, ddpm_steps):
    data = tmp_path / "data"
    monkeypatch.setitem(bench_quality.CATEGORIES, "bottle", data)
    seen = []
    monkeypatch.setattr(train_ddpm, "main", lambda args: seen.append(train_ddpm.resolve_args(args)) or "")
    bench_quality.run_ddpm_phase(tmp_path / "out", "bottle", 2, ddpm_steps)
    (new,) = seen
    model = bench_quality.cell_dir(tmp_path / "out", "bottle", 2) / "models" / "bottle"
    old = train_ddpm.parse_args(_old_argv(model, data, "bottle", 2, ddpm_steps))
    differ = {k for k in vars(old) if getattr(old, k) != getattr(new, k)}
    # the harness's step budget sets --num_epochs unbounded; with --max_train_steps given it never binds
    assert differ == {"num_epochs"} and new.max_train_steps == old.max_train_steps == (ddpm_steps or 1500)
    assert step_plan(new, 209, 1) == step_plan(old, 209, 1)
    assert (new.seed, new.checkpointing_steps, new.checkpoints_total_limit, new.resume_from_checkpoint,
            new.report_to) == (2, 250, 1, "latest", "none")


def test_validation_set_calibrates_on_even_images_and_adds_one_defect_of_each_kind_in_turn(synthetic_root,
                                                                                            monkeypatch, tmp_path):
    import numpy as np
    import torch

    from diffad.data import images_to_tensor, load_mvtec
    from diffad.defects import ALL_DEFECT_KINDS

    category = next(p.name for p in synthetic_root.iterdir() if p.is_dir())
    from PIL import Image

    (tmp_path / "textures").mkdir()  # the blobs' texture photos (the bench: DTD's, beside the data)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
        tmp_path / "textures" / "noise.png")
    monkeypatch.setattr(bench_quality, "SHARED", tmp_path)
    monkeypatch.setitem(bench_quality.CATEGORIES, category, synthetic_root)
    split = load_mvtec(synthetic_root, category, resolution=64, seed=0)["validation"]
    normal = images_to_tensor([row["image"] for row in split], 64)

    def build(seed):
        return bench_quality.validation_set(category, seed, 64)

    calib, images, masks, labels, kinds = build(0)
    held = len(normal) // 2
    assert torch.equal(calib, normal[0::2]) and torch.equal(images[:held], normal[1::2])
    assert labels.tolist() == [0] * held + [1] * held and not masks[:held].any()
    assert kinds[held:] == [ALL_DEFECT_KINDS[i % len(ALL_DEFECT_KINDS)] for i in range(held)]
    changed = (images[held:] != normal[1::2]).any(1).numpy()
    assert masks[held:].any((1, 2)).all() and changed.any((1, 2)).all()
    again = build(0)
    assert torch.equal(again[1], images) and np.array_equal(again[2], masks)  # the same set every time
    assert not torch.equal(build(1)[1][held:], images[held:])  # another seed, other defects
    dense = bench_quality.validation_set(category, 0, 64, copies=len(ALL_DEFECT_KINDS))  # every kind on every image
    k = len(ALL_DEFECT_KINDS)
    assert torch.equal(dense[0], calib) and torch.equal(dense[1][:held], normal[1::2])
    assert dense[3].tolist() == [0] * held + [1] * (k * held) and dense[4][held:] == list(ALL_DEFECT_KINDS) * held
    for i in range(held):  # image i's k defects are drawn on image i: most of it is image i, unchanged
        for j in range(k):
            same = (dense[1][held + i * k + j] == normal[1::2][i]).all(0)
            assert same.float().mean() > 0.5 and not same[torch.from_numpy(dense[2][held + i * k + j])].all()
    assert torch.equal(dense[1][held], images[held])  # the first defect is the sparse set's first


def test_the_peers_rows_and_their_mean_over_categories_sit_beside_diffads(tmp_path):
    """make bench-peer's cells, summarised by bench_peer.py, give bench_quality's table the peer's rows per category
    and its mean over categories by diffad's rule: the categories' mean per seed, then mean ± std over seeds."""
    import json

    import numpy as np

    import bench_peer

    image = {("bottle", 0): 0.6, ("bottle", 1): 0.8, ("tire", 0): 0.4, ("tire", 1): 0.5}
    results = [{"category": c, "seed": s, "steps": 11, "epochs": 0.5, "train_images": 10, "test_images": 4,
                "device": "cuda", "cpu_minutes": 0.1, "wall_minutes": 0.1, "test_wall_seconds_per_image": 0.05,
                "test_cpu_seconds_per_image": 0.05,
                "metrics": {rule: {"image_auroc": v if rule == "mean11" else 0.5, "pixel_auroc": 0.7, "aupro": 0.3,
                                   "image_f1_max": 0.8} for rule in bench_peer.RULES}}
               for (c, s), v in image.items()]
    peer_json = tmp_path / "peer.json"
    peer_json.write_text(json.dumps(bench_peer.summarise(results, {})))
    summary = {"categories": {"bottle": {"default": {"num_seeds": 2}}}, "mean_over_categories": {}}
    bench_quality.add_peer_rows(summary, peer_json)

    name = "peer: DRAEM (paper: 11x11 mean, max)"
    assert summary["categories"]["bottle"][name]["image_auroc"]["mean"] == pytest.approx(0.7)
    assert summary["categories"]["tire"][name]["image_auroc"]["std"] == pytest.approx(0.05)
    per_seed = [np.mean([0.6, 0.4]), np.mean([0.8, 0.5])]
    row = summary["mean_over_categories"][name]
    assert row["num_seeds"] == 2
    assert row["image_auroc"]["mean"] == pytest.approx(np.mean(per_seed))
    assert row["image_auroc"]["std"] == pytest.approx(np.std(per_seed))
    assert summary["mean_over_categories"]["peer: anomalib DRAEM (its default score)"]["image_auroc"]["std"] == 0
    assert "| peer: DRAEM (paper: 11x11 mean, max) | 0.575 ± 0.075 |" in bench_quality.markdown(summary)


def test_the_mean_over_categories_pairs_the_same_seed_in_every_category(tmp_path, monkeypatch):
    """bench_quality paired each category's i-th finished seed: with tire's seed 0 missing it averaged bottle's seed
    0 with tire's seed 1. The benches' one rule (harness.mean_over_categories) pairs equal seeds and keeps only
    seeds that every category ran."""
    import numpy as np

    from harness import mean_over_categories

    cells = {("bottle", 0): {"image_auroc": 0.6, "aupro": 0.5}, ("bottle", 1): {"image_auroc": 0.8, "aupro": 0.7},
             ("tire", 1): {"image_auroc": 0.4, "aupro": float("nan")}, ("tire", 2): {"image_auroc": 0.9}}
    means = mean_over_categories(cells, ["bottle", "tire"], ["image_auroc", "aupro"])
    assert means == {"image_auroc": {"mean": pytest.approx(0.6), "std": 0.0, "n": 1}}  # seed 1 only; aupro NaN

    results = {("bottle", 0): 0.6, ("bottle", 1): 0.8, ("tire", 1): 0.4}
    monkeypatch.setattr(bench_quality, "phase_metrics", lambda out, category, seed, phase: (
        {key: {m: results[category, seed] for m in bench_quality.METRICS} for _, key in bench_quality.DETECTORS.values()}
        if (category, seed) in results else None))
    summary = bench_quality.summarize(tmp_path, ["bottle", "tire"], [0, 1])
    default = "self_aware combined + head (default, 10 passes)"
    row = summary["mean_over_categories"][default]
    assert row["num_seeds"] == 1 and row["image_auroc"]["mean"] == pytest.approx(np.mean([0.8, 0.4]))
    assert summary["categories"]["bottle"][default]["image_auroc"]["mean"] == pytest.approx(0.7)


def test_validation_means_weigh_each_category_and_seed_by_its_validation_images_when_pooled():
    """A category with 10 validation images moves AUROC in steps of 0.04: pooled, it weighs a fifth of one with 40;
    a detector not scored on validation in every category gets no mean."""
    def row(auroc, n):
        return {"validation": {"image_auroc": auroc, "pixel_auroc": auroc, "aupro": auroc}, "validation_images": n,
                "test": None}

    vt = {"metal_plate": {"detectors": {"a": row(0.9, 10), "b": row(0.6, 10)}, "agreement": {}},
          "tire": {"detectors": {"a": row(0.5, 40), "b": {"validation": None, "validation_images": None, "test": None}},
                   "agreement": {}}}
    means = bench_quality.validation_means(vt)
    assert list(means) == ["a"]
    assert means["a"]["image_auroc"]["plain"] == pytest.approx(0.7)
    assert means["a"]["aupro"]["pooled"] == pytest.approx((0.9 * 10 + 0.5 * 40) / 50)
    assert "| a | 2 | 0.700 / 0.580 | 0.700 / 0.580 | 0.700 / 0.580 |" in bench_quality.validation_markdown(vt)
    seed1 = {"metal_plate": {"detectors": {"a": row(0.5, 8)}, "agreement": {}}}  # another seed's split: pooled too
    both = bench_quality.validation_means(vt, seed1)["a"]
    assert both["cells"] == 3 and both["image_auroc"]["pooled"] == pytest.approx((9 + 20 + 4) / 58)


def test_bench_peer_names_a_device_torch_cannot_use_in_one_line_and_exits_2(monkeypatch, capsys):
    import bench_peer

    monkeypatch.setattr(sys, "argv", ["bench_peer.py", "--device", "gpu0"])
    with pytest.raises(SystemExit) as exit_info:
        bench_peer.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--device 'gpu0'" in err and "use cpu, or cuda" in err
