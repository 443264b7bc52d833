"""Chat message handling and template rendering stay free of the engine and torch (agentserve/errors.py
holds the exception types they raise), so that a render worker, a client-side tool or a test can use
them without loading a model runtime. Checked in a fresh interpreter: this one has torch loaded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["agentserve.chat.render", "agentserve.chat.messages", "agentserve.chat.tools",
                                    "agentserve.errors"])
def test_chat_modules_import_neither_torch_nor_the_engine(module: str) -> None:
    code = (f"import json, sys; import {module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.') "
            "or m == 'agentserve.engine' or m.startswith('agentserve.engine.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing {module} loaded {loaded[:10]}"
