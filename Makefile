# diffad: every command a newcomer needs. `make test` sets everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test test-browser test-slow demo app-screenshot bench-train bench-speed bench-real bench-quality bench-quality-quick bench-cpu bench-peer bench-peer-quick peer-venv bench-atline detector-candidates bench-segmenter anomaly-samples clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: 2.13.0 is the CPU wheel on disk; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected: failing"; exit 1; fi; exit $$rc

# diffad app in headless Chromium: Debian's chromium + chromium-driver (installed when absent, never downloaded by
# selenium), gradio + selenium from PyPI; the test is skipped where no browser could be installed.
test-browser: venv
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get install -y -q chromium chromium-driver >/dev/null || \
		 (apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null)) || \
		echo "could not install chromium: the browser test will be skipped"
	$(PY) -m pip install --quiet -e '.[browser]'
	SE_OFFLINE=true $(PY) -m pytest -q -m 'browser or not slow' tests/test_app.py tests/test_app_browser.py

# The browser test over the demo's weave model (run `make demo` first) and two of its test photos, a good one and a
# defective one: screenshots at the calibrated threshold and at 0 in bench_output/app_screenshot/.
DEMO_OUT ?= demo_output
app-screenshot: venv
	$(PY) -m pip install --quiet -e '.[browser]'
	DIFFAD_APP_MODEL=$(DEMO_OUT)/models/weave \
	DIFFAD_APP_PHOTOS=$(DEMO_OUT)/data/weave/test/good/000.png:$(DEMO_OUT)/data/weave/test/hole/000.png \
	DIFFAD_SCREENSHOT_DIR=bench_output/app_screenshot SE_OFFLINE=true $(PY) -m pytest -q -m browser tests/test_app_browser.py

test-slow: venv
	$(PY) -m pytest -q -m slow tests

# Eyeball the DRAEM-style synthetic anomalies: a 4x4 grid of samples.
anomaly-samples: venv
	$(PY) benchmarks/anomaly_samples.py --out bench_output/anomaly_samples.png

# Training speed of the `small` preset at 64 px on this CPU, and its loss after a fixed budget.
bench-train: venv
	$(PY) benchmarks/bench_train.py --minutes 5

# The end-to-end demo on the built-in synthetic data (about 10-13 min on 2 cores; re-runs skip finished steps).
demo: venv
	$(PY) -m diffad.cli demo --out demo_output

# The thesis sampling config (301 passes) against the fast one (10 passes), tiny and small models,
# on the real bottle images and the synthetic default: s/image, passes, AUROC, peak memory -> JSON.
BENCH_OUT ?= bench_output
bench-speed: venv
	mkdir -p $(BENCH_OUT)
	$(PY) -c "from diffad import make_synthetic_dataset; make_synthetic_dataset('$(BENCH_OUT)/synthetic', seed=0, resolution=64)"
	for preset in tiny small; do \
	  OMP_NUM_THREADS=1 $(PY) benchmarks/bench_speed.py --data_dir ../shared/data/mvtec_subset --category bottle --train_preset $$preset --train_minutes 8 --train_output_dir $(BENCH_OUT)/bottle_$$preset --resolution 64 --max_test_images 24 --output $(BENCH_OUT)/bench_speed_bottle_$$preset.json || exit 1; \
	  OMP_NUM_THREADS=1 $(PY) benchmarks/bench_speed.py --data_dir $(BENCH_OUT)/synthetic --category nut --train_preset $$preset --train_minutes 8 --train_output_dir $(BENCH_OUT)/nut_$$preset --resolution 64 --max_test_images 24 --output $(BENCH_OUT)/bench_speed_nut_$$preset.json || exit 1; \
	done

# Learned (segmenter) against multi-scale anomaly maps on the synthetic default and the real MVTec subset.
bench-segmenter: venv
	$(PY) benchmarks/bench_segmenter.py --resolution 64 --ddpm_minutes 4 --segmenter_minutes 10 --threads 1 --work_dir bench_output/segmenter

# Real MVTec AD categories (../shared/data/mvtec_subset): tiny DDPM + segmenter per category on CPU, then the
# Table 4.1-style table for denoise, self-aware multi-scale and self-aware learned (re-runs skip finished steps).
bench-real: venv
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_real.py --preset tiny --resolution 64 --ddpm_steps 1500 --segmenter_steps 500 --out $(BENCH_OUT)/real

# The default detector (`diffad train`'s cpu preset: 256 px working resolution, 64 px crops and tiles, 1500 steps;
# the fast sampler; maps combined, noise_error, multiscale) and denoising, on the five real categories (bottle, tire,
# metal_plate, transistor, toothbrush) x 3 seeds, budgets in optimiser steps, precision auto; seed 0 also on
# VALIDATION (synthetic scratches, cracks, pits, stains and DRAEM blobs on held-out good parts); `--phases
# ddpm,default,whole` also runs the UNet on the whole image (it lost to tiles). Resumable; about 5 CPU-hours.
bench-quality: venv
	$(PY) benchmarks/bench_quality.py --out $(BENCH_OUT)/quality --jobs 2

# bottle and tire, one seed, 400 DDPM steps, the default detector: for iterating (~30 min).
# Issue 12's choice of default, on VALIDATION data with subtle synthetic defects (never a test split), with
# bench-quality's seed-0 DDPMs of the three real categories (~5 min).
detector-candidates: venv
	for c in bottle tire metal_plate; do d=../shared/data/more_real; [ $$c = bottle ] && d=../shared/data/mvtec_subset; \
		OMP_NUM_THREADS=1 $(PY) benchmarks/detector_candidates.py --model $(BENCH_OUT)/quality/$$c/seed0/models/$$c \
		--data_dir $$d --category $$c --defects subtle --output $(BENCH_OUT)/candidates_$$c.json || exit 1; done

# Every CPU backend (torch fp32/bf16, OpenVINO fp32/bf16, ONNX fp32) of the default detector on the real bottle test
# split: tiny 64 px (bench-quality's bottle seed-0 DDPM), small 64 px and small 128 px (trained here, 200 and 80
# steps): AUROCs and peak memory per backend, interleaved speed ratios. Resumable; ~1 h with the training.
bench-cpu: venv
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_cpu.py --out $(BENCH_OUT)/cpu

bench-quality-quick: venv
	$(PY) benchmarks/bench_quality.py --out $(BENCH_OUT)/quality --quick --jobs 2

# The peer (issue 20): anomalib's DRAEM (no pretrained weights) on the same five real categories, splits (diffad's
# load_mvtec rule, written by diffad's venv), 256 px and step budget (~30 CPU-minutes per cell on one thread), 3 seeds,
# scored with diffad's metric code. Its own venv .venv-peer, never in diffad's dependencies. Resumable. The PyPI
# torchvision is a CUDA build: its two unguarded register_fake calls are made conditional (no CPU wheel exists here).
PEER_VENV := .venv-peer
PEER_PY := $(PEER_VENV)/bin/python
$(PEER_VENV)/.installed:
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip
	$(PEER_PY) -m pip install --quiet torch==2.13.0
	$(PEER_PY) -m pip install --quiet anomalib==2.7.0 torch==2.13.0 torchvision==0.28.0
	sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\{0,1\}nms\)")$$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' \
		"$$($(PEER_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
	$(PEER_PY) -W ignore -c "import torchvision; from anomalib.models.image.draem.torch_model import DraemModel"
	touch $@

peer-venv: $(PEER_VENV)/.installed

# 5 categories x 3 seeds, 22 steps (~81 CPU-s each) per cell, one cell at a time (a cell peaks at ~11 GB of RSS at
# batch 8, 256 px: two at once do not fit beside other work in 24 GB). ~9 CPU-hours, see the README. On a GPU machine
# the same steps and draws take minutes: bench_peer.py --device cuda --jobs 3 (DIFFAD_BENCH_DATA: the data's copy).
bench-peer: venv peer-venv
	OMP_NUM_THREADS=1 $(PEER_PY) benchmarks/bench_peer.py --out $(BENCH_OUT)/peer --jobs 1

# One seed, 3 steps, the five categories, whole test splits: checks the whole path (~45 CPU-minutes).
bench-peer-quick: venv peer-venv
	OMP_NUM_THREADS=1 $(PEER_PY) benchmarks/bench_peer.py --out $(BENCH_OUT)/peer_quick --quick --jobs 1

# Latency at the line: POST /inspect (diffad serve) and diffad watch (photo written -> row in the CSV) with two DDPMs
# trained 100 steps on the synthetic weave and calibrated: tiny at 64 px, and the cpu preset inspecting 256 px photos
# in 64 px tiles (its working resolution). ~10 min with the training; re-runs reuse the models.
ATLINE := $(BENCH_OUT)/atline
bench-atline: venv
	for spec in "64 tiny" "256 cpu"; do set -- $$spec; \
	  test -f $(ATLINE)/model$$1/calibration/config.json || ( \
	    $(PY) -c "from diffad import make_synthetic_dataset; make_synthetic_dataset('$(ATLINE)/data$$1', seed=0, resolution=$$1)" && \
	    OMP_NUM_THREADS=1 $(PY) -m diffad.cli train --data_dir $(ATLINE)/data$$1 --category weave --preset $$2 \
	      --resolution $$1 --max_train_steps 100 --checkpointing_steps 100000 --seed 0 --report_to none \
	      --output_dir $(ATLINE)/model$$1 && \
	    OMP_NUM_THREADS=1 $(PY) -m diffad.cli calibrate --model $(ATLINE)/model$$1 --data $(ATLINE)/data$$1 \
	      --category weave ) || exit 1; \
	  OMP_NUM_THREADS=1 $(PY) benchmarks/bench_atline.py --model $(ATLINE)/model$$1 \
	    --photos $(ATLINE)/data$$1/weave/test --output $(ATLINE)/latency_$$1.json || exit 1; \
	done
