# Thin wrappers; the logic lives in scripts and packages.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-$(shell cat requirements-ci.txt pyproject.toml | sha256sum | cut -c1-16)

.PHONY: venv test lint demo bench protos chart clean

venv: $(STAMP)

$(STAMP): requirements-ci.txt pyproject.toml
	bash scripts/venv.sh $(VENV)
	@rm -f $(VENV)/.requirements-* && touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: venv lint
	bash scripts/test.sh $(PY)

demo: venv
	bash scripts/demo.sh $(PY)

bench: venv
	$(PY) bench/moe_layer.py

protos: venv
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
