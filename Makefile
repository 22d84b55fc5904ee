# hydragpt: `make train` then `make sample` on a fresh clone; `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
# The torch requirement, installed before the package, and optionally the index to take it from
# (e.g. https://download.pytorch.org/whl/cpu for a CPU-only build); see README "Install".
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
# Extra Hydra overrides for train.py / sample.py, e.g. `make train ARGS="train.max_iters=500"`.
ARGS ?=
# pytest workers (pytest-xdist), each running whole test modules: most tests wait on the processes they start.
TEST_WORKERS ?= 2
# Local path or URL of the raw corpus, e.g. `make train SOURCE=~/input.txt` (default: download).
SOURCE ?=
PREPARE_ARGS := $(if $(SOURCE),data.source=$(SOURCE),)

.PHONY: install data train sample test test-all lint format clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

data: install
	$(BIN)/python scripts/prepare.py data=shakespeare_char $(PREPARE_ARGS)

train: data
	$(BIN)/python scripts/train.py experiment=tiny_cpu $(ARGS)

sample: install
	$(BIN)/python scripts/sample.py ckpt=latest $(ARGS)

# The suite starts the scripts ~200 times: byte-compile once, so none recompiles the package (where
# PYTHONDONTWRITEBYTECODE is set, Python never caches what it compiles).
test: install
	$(BIN)/python -m compileall -q src tests
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadscope --durations=15

test-all: install
	$(BIN)/python -m compileall -q src tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache src/*.egg-info
