"""Kernels (installed as agentserve.kernels): one concern a file, each a Triton kernel with a torch
reference beside it. The engine calls the dispatching function; on CPU it is the torch reference.

`set_backend("torch")` forces the references everywhere (also on CUDA), `set_backend("auto")`
(the default; also `"triton"`) uses Triton for CUDA tensors. The environment variable
AGENTSERVE_KERNEL_BACKEND sets the initial value."""

from ._triton_utils import HAS_TRITON, get_backend, set_backend

__all__ = ["HAS_TRITON", "get_backend", "set_backend"]
