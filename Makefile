PYTHON ?= python3
# One stamp per interpreter: `make test` with another Python (a second venv) installs into that one.
STAMP := .venv-stamp-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.executable.encode()).hexdigest()[:12])')

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
