# Two commands for a fresh machine: `make run` (the app) and `make test`. Both create .venv with pip first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the vLLM server's own venv (tests start a real server from it; docs/deployment.md)
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: run demo demo-models verify-demo test lint bench screenshots parity clean

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(VLLM_STAMP): requirements-vllm.txt
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

.venv-vllm: $(VLLM_STAMP)

## run: the app on http://127.0.0.1:7860 (MALLOC_ARENA_MAX=2: see docs/deployment.md, "Memory") (real weights from the HF cache; offline without them it says so and runs
## tiny random models). Pass options with ARGS, e.g. make run ARGS="--tiny" or ARGS="--auth alice:secret".
run: $(STAMP)
	MALLOC_ARENA_MAX=2 $(PY) -m app $(ARGS)

## demo: the command-line tools on the bundled example image, no download: the demo models where they are
## bundled (models/demo), else tiny random ones
DEMO_MODELS := $(if $(wildcard models/demo/chat/config.json),--demo,--tiny)
demo: $(STAMP)
	mkdir -p out
	$(PY) -m tokenizer_tap describe examples/scene.jpg $(DEMO_MODELS) --point 510,270 --box 380,330,640,560 \
		--scribble "175,260 170,330 176,400 172,470 178,540" --out out/overlay.png
	$(PY) -m assistant chat examples/scene.jpg $(DEMO_MODELS) --point 510,270 --ask "What is <region1>?" \
		--max-new-tokens 24

## demo-models: retrain the bundled demo models end to end on the synthetic world (seeded; models/demo/README.md
## says how long it took, how each stage ran and what they score). ARGS=--reuse keeps finished stages and resumes a
## stopped one from its last checkpoint; verify-demo re-measures the shipped bundle against its metrics.json
demo-models: $(STAMP)
	$(PY) -m finetune demo-models --out models/demo --work runs/demo $(ARGS)

verify-demo: $(STAMP)
	$(PY) -m finetune demo-models --verify models/demo

## test: the whole test suite, a real vLLM server included (parity tests need ../shared/reference; CI requires it)
test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_find.py
	$(PY) bench/bench_assistant.py
	$(PY) bench/bench_app.py
	$(PY) bench/bench_finetune.py
	$(PY) bench/bench_eval.py

## screenshots: refresh docs/screenshots from the browser tests (needs Debian chromium, see DEVELOPERS.md)
screenshots: $(STAMP)
	TAPCHAT_SCREENSHOTS=docs/screenshots $(PY) -m pytest -q tests/test_app_browser.py

parity: $(STAMP)
	$(PY) -m tokenizer_tap parity ../shared/reference/tap-parity/A

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache .ruff_cache
