"""Whether Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1 set before the kernels were
imported), and the skip mark of the tests that need it (the CPU kernel tests)."""

from __future__ import annotations

from typing import Any

import pytest

from agentserve.kernels._triton_utils import HAS_TRITON


def is_interpreted(kernel: Any) -> bool:
    """Whether `kernel` (a @triton.jit function) was built by the interpreter."""
    return HAS_TRITON and type(kernel).__name__ == "InterpretedFunction"


def interpreter_only(kernel: Any) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not is_interpreted(kernel),
                              reason="needs triton with TRITON_INTERPRET=1 set before the kernels are imported")
