# tinygptv-edge: every target sets itself up first, so each works on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DIST   ?= dist

.PHONY: setup test test-slow lint format clean export-onnx train-default demo demo-reference

setup: $(STAMP)

# torch==2.13.0 is pinned in the `export` extra (a CPU wheel); ggml-python builds ggml from source;
# the native kernels (runtime/language/kernels/*.c) are compiled by the editable install; their fast
# paths are picked at run time.
$(STAMP): pyproject.toml $(wildcard runtime/language/kernels/*.c runtime/language/kernels/*.h) Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[export,dev,serve,ray]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# tests/data/: small exports of the shipped model + the PyTorch reference's goldens, for the torch-free
# tier (tests/helpers/shipped_data.py). Run after the model, an exporter or a file format changes.
.PHONY: test-data test-aarch64
test-data: setup
	$(PY) tests/data/make.py

# The torch-free tier, the measurements on tests/data and the demo answer on emulated aarch64
# (Cortex-A76 = Pi 5, Cortex-A72 = Pi 4) in an arm64 Debian chroot under qemu-user (root; cached in
# ~/.cache/tinygptv-edge/aarch64). See docs/raspberry-pi.md.
test-aarch64:
	bash .ci/aarch64.sh

# The layer rule (pyproject [tool.importlinter]): runtime <- export <- calib. import-linter walks one
# folder tree per package, so the three folders are laid out under tinygptv_edge/ in build/layers first.
# mypy type-checks runtime/ there too (pyproject [tool.mypy]; it cannot follow the editable install's
# mapped folders), against the Protocols in runtime/interfaces.py.
LAYERS := build/layers
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	rm -rf $(LAYERS) && mkdir -p $(LAYERS)/tinygptv_edge
	cp tinygptv_edge/*.py $(LAYERS)/tinygptv_edge/ && cp -r runtime export calib $(LAYERS)/tinygptv_edge/
	cd $(LAYERS) && PYTHONPATH=. $(CURDIR)/$(VENV)/bin/lint-imports $(CURDIR)/pyproject.toml
	cd $(LAYERS) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p tinygptv_edge.runtime

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(DIST) .pytest_cache

# SOURCE: the model source flags every model-loading target passes on (default: the shipped model), e.g.
# SOURCE="--phi2 phi-2/ --eva eva_vit_g.pth --blip2 blip2_pretrained_flant5xxl.pth --stage-ckpt S3.pth"
# or SOURCE="--model my-model/" (docs/official-checkpoints.md).
SOURCE ?=

# Vision graph: dist/vision.fp32.onnx + dist/vision.int8.onnx from the shipped model.
# CALIB_IMAGES=DIR picks the calibration images (default: synthetic VQA images in dist/calib-images).
# MEMORY_BUDGET=1.5G (both export targets): export the vision x language pair `make report` measured
# best among those whose predicted low-memory peak fits (from $(DIST)/report/report.json; docs/report.md),
# instead of INT8 + GGUF_LEVEL.
CALIB_IMAGES ?=
MEMORY_BUDGET ?=
BUDGET_FLAGS = $(if $(MEMORY_BUDGET),--memory-budget $(MEMORY_BUDGET) --report $(DIST)/report/report.json)
export-onnx: setup
	$(PY) -m tinygptv_edge export-onnx --out $(DIST) $(SOURCE) $(if $(CALIB_IMAGES),--calib-images $(CALIB_IMAGES)) \
		$(BUDGET_FLAGS)

# Language model as GGUF in $(DIST)/: GGUF_LEVEL (default Q4_0), GGUF_MODEL (single-checkpoint folder;
# default: the shipped model), GGUF_ARGS (more flags, e.g. --imatrix-images DIR).
GGUF_LEVEL ?= Q4_0
.PHONY: export-gguf
export-gguf: setup
	$(VENV)/bin/tinygptv-edge export-gguf $(if $(MEMORY_BUDGET),$(BUDGET_FLAGS),--level $(GGUF_LEVEL)) \
		--out $(DIST) $(SOURCE) $(if $(GGUF_MODEL),--model $(GGUF_MODEL)) $(GGUF_ARGS)

# The shipped default model: train from scratch on the synthetic VQA set, writing export/default_model/
# (weights, config, tokenizer, training.json, loss curve). Its recipe (training.json records it): the
# varied data, a 128 px input in 16 px patches, stage 1 on 10000 images with half of each batch
# mirrored; run on 1 thread (its time: docs/benchmarks.md).
# TRAIN_EXTRA: flags after TRAIN_ARGS, e.g. the issue #31 candidate (conversations, paired exists
# questions, camera chain v2; not the shipped model, docs/default-model.md) into a scratch folder:
#   make train-default TRAIN_EXTRA='$(CONVO_ARGS) --out /tmp/m'
CONVO_ARGS := --conversations 0.3 --exists pair --camera-style v2 --camera 0.4 --noisy-sigma 16 28
TRAIN_EXTRA ?=
TRAIN_ARGS ?= --seed 0 --data varied --image-size 128 --patch-size 16 --pretrain-steps 6000 \
	--train-images 10000 --pretrain-mirror --test-images 90 --eval-images 90 --threads 1
train-default: setup
	$(PY) -m tinygptv_edge.cli train $(TRAIN_ARGS) $(TRAIN_EXTRA)

DEMO_IMAGE    ?= export/data/example.png
DEMO_QUESTION ?= What colour is the circle?

# The README's first command: set up, export both graphs from the shipped model (INT8 vision,
# Q4_0 language) into $(DIST)/, then answer a question about the example image with the runtime
# (onnxruntime + ggml, no torch), printing the answer and its timings.
demo: export-onnx export-gguf
	$(VENV)/bin/tinygptv-edge run --dist $(DIST) --image $(DEMO_IMAGE) --prompt "$(DEMO_QUESTION)" --json

# The same question answered by the PyTorch reference (no export).
demo-reference: setup
	$(PY) -m tinygptv_edge.cli reference $(SOURCE) --image $(DEMO_IMAGE) --prompt "$(DEMO_QUESTION)"

# Accuracy report: every vision x language level of the shipped model vs fp32 + F32, on its VQA test split.
# Builds the exports it needs into $(DIST)/report/artifacts (cached); writes report.{json,md,html}.
# REPORT_ARGS: more flags, e.g. --max-size-mib 200, --cells axes, --vision int8-minmax --language Q4_K_M.
# The paper's data sets instead of the VQA split: REPORT_ARGS="--paper-set gqa=PATH ..." (docs/paper-sets.md).
REPORT_ARGS ?=
.PHONY: report
report: setup
	$(VENV)/bin/tinygptv-edge report --out $(DIST)/report $(SOURCE) $(REPORT_ARGS)

# Answer a question about an image with the models in $(DIST)/ (IMAGE=path PROMPT="question" [RUN_ARGS=--stream]).
IMAGE  ?=
PROMPT ?= Describe this image.
.PHONY: run bench-pipeline
run: setup
	$(VENV)/bin/tinygptv-edge run --dist $(DIST) $(if $(IMAGE),--image $(IMAGE)) --prompt "$(PROMPT)" $(RUN_ARGS)

# Developer benchmarks (bench/; results in docs/benchmarks.md), not the on-device `tinygptv-edge bench`.
# Full-size runtime benchmark (random weights): resident vs low-memory peak RSS, first token, tok/s.
bench-pipeline: setup
	$(PY) bench/pipeline.py

.PHONY: bench-decoder
# decoder speed/memory against stock llama.cpp (full size, random weights; see bench/decoder.py)
bench-decoder: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/decoder.py


# OpenAI-compatible server on the models in $(DIST)/ (http://127.0.0.1:8080; SERVE_ARGS: more flags,
# e.g. --api-key KEY --cache-dir .cache/images --port 9000). See docs/serve.md.
SERVE_ARGS ?=
.PHONY: serve bench-serve
serve: setup
	$(VENV)/bin/tinygptv-edge serve --dist $(DIST) $(SERVE_ARGS)

# Server vs Pipeline at full size (random weights): first token for new/repeated images, tok/s, peak RSS.
bench-serve: setup
	$(PY) bench/serve.py
