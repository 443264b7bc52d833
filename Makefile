PYTHON ?= python3
STAMP := .venv-stamp

.PHONY: demo test install

# Installs the package with its dev extras into the current Python (torch pinned first, so that
# pip never replaces the CPU wheel with a CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -m pip install -q torch
	$(PYTHON) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m agentserve.cli demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -x --durations=15
