# The README's two commands: `make serve` and `make test`. Both create/refresh .venv and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-12)

.PHONY: serve test venv lint clean-cache

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	rm -f $(VENV)/.installed-*
	touch $@

serve: venv
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-1} $(VENV)/bin/hywia serve

test: venv
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -ra tests

lint: venv
	$(VENV)/bin/ruff check hywia server tests benchmarks scripts
