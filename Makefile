# Two commands for a fresh machine: `make run` (demo) and `make test`. Both create .venv with pip first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint bench parity clean

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

## run: describe regions of the bundled example image, then ask about one (tiny random models, no download)
run: $(STAMP)
	mkdir -p out
	$(PY) -m tokenizer_tap describe examples/scene.jpg --tiny --point 510,270 --box 380,330,640,560 \
		--scribble "175,260 170,330 176,400 172,470 178,540" --out out/overlay.png
	$(PY) -m assistant chat examples/scene.jpg --tiny --point 510,270 --ask "What is <region1>?" \
		--max-new-tokens 24

## test: the whole test suite (parity tests need ../shared/reference; CI requires it)
test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_tokenizer.py
	$(PY) bench/bench_assistant.py

parity: $(STAMP)
	$(PY) -m tokenizer_tap parity ../shared/reference/tap-parity/A

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
