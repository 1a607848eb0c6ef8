# losscc: two commands. `make demo` runs the main job, `make test` runs every test.
# Both create the project's Python environment (.venv, pinned torch for libtorch) if missing.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PYTHON ?= python3
CARGO ?= cargo

# tch builds against the libtorch inside the project environment's torch package.
export LIBTORCH_USE_PYTORCH := 1
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

LOSSCC := target/release/losscc
DATA := tests/data/asl-vectors

.PHONY: all venv build test demo results clean

all: build

$(VENV)/.installed: requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	@touch $@

venv: $(VENV)/.installed

build: venv
	$(CARGO) build --release --workspace --bins --examples

test: build
	$(CARGO) test --release --workspace
	$(VENV)/bin/python -m unittest discover -s tests/python -v

demo: build
	@echo "== check every example metric =="
	$(LOSSCC) check examples/*.metric
	@echo
	@echo "== the relaxed IR of boundary F1 (four curves, the published layout) =="
	$(LOSSCC) check examples/bf1.metric --emit relaxed
	@echo "== evaluate BIoU with identity curves on a reference batch =="
	$(LOSSCC) eval examples/biou.metric --logits $(DATA)/case1_logits.npy --labels $(DATA)/case1_labels.npy --set tol=3
	@echo
	@echo "== train a small network with the mIoU surrogate, in a user's own tch loop =="
	target/release/examples/train_tch examples/miou.metric
	@echo
	@echo "== compile the mIoU loss to ONNX with its gradient, and train PyTorch and JAX models with it =="
	@mkdir -p out
	$(LOSSCC) compile examples/miou_biou.metric -o out/miou_biou.onnx
	$(LOSSCC) compile examples/miou.metric --grad -o out/miou.grad.onnx
	$(VENV)/bin/python examples/python/train_with_onnx_loss.py out/miou.grad.onnx --steps 200
	$(VENV)/bin/python examples/python/train_jax.py out/miou.grad.onnx --steps 150
	@echo
	@echo "== search the BIoU loss's curves with PPO on the built-in scenes (quick preset, CPU) =="
	rm -rf out/search-biou
	$(LOSSCC) search examples/biou.metric --preset quick --out out/search-biou
	@echo
	@echo "== retrain from scratch: cross-entropy, BIoU surrogate with identity curves, BIoU surrogate with searched curves =="
	$(LOSSCC) train --loss ce --iters 300 > out/train-ce.json
	$(LOSSCC) train examples/biou.metric --iters 300 > out/train-biou-identity.json
	$(LOSSCC) train examples/biou.metric --params out/search-biou/best.params.json --iters 300 > out/train-biou-searched.json
	$(VENV)/bin/python scripts/side_by_side.py cross-entropy=out/train-ce.json \
		"BIoU identity"=out/train-biou-identity.json "BIoU searched"=out/train-biou-searched.json
	@echo "search report: out/search-biou/report.md (plots: reward.svg, curves.svg)"

# Regenerate docs/results.md: searches for every target, every loss over 3 seeds, PPO against random
# search over 3 search seeds and the PPO settings tried, and the transfer to a PyTorch U-Net
# (2-core CPU, ~38 min from scratch; steps already under out/results are reused).
# `make results RESULTS_ARGS=--all-tries` adds the costlier tries (σ 0.1, 48 candidates; ~22 min).
results: build
	$(VENV)/bin/python scripts/results.py --losscc $(LOSSCC) --seeds 3 --out out/results --doc docs/results.md $(RESULTS_ARGS)

clean:
	$(CARGO) clean
