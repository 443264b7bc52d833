"""Shared plumbing for the Triton kernels: optional import, backend choice, small launch helpers.

Triton is optional (it is not installable everywhere the CPU engine runs), so the kernel modules
import `triton`/`tl` from here. Without Triton, `triton.jit` becomes an identity decorator: the
kernel functions still define (their `tl.constexpr` annotations are strings thanks to
`from __future__ import annotations` in each kernel module) but are never launched, because the
dispatchers only pick Triton when `triton_enabled_for(...)` is true.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch

try:  # pragma: no cover - exercised implicitly by every import
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - platforms without triton wheels
    HAS_TRITON = False

    class _TritonStub:
        """Just enough of `triton` for the kernel modules to import without it."""

        @staticmethod
        def jit(fn: Callable[..., Any] | None = None, **_: Any) -> Any:
            if fn is None:
                return lambda f: f
            return fn

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    triton = _TritonStub()  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

__all__ = ["HAS_TRITON", "triton", "tl", "set_backend", "get_backend", "triton_enabled_for", "cdiv",
           "next_pow2", "num_sms", "dot_modes", "INTERPRET", "pdl_begin", "pdl_launch", "set_pdl"]

# Programmatic dependent launch (Hopper+): grid-dependency control lets a kernel's programs start
# while the previous kernel in the stream drains, hiding the ~1-3 us launch gap between the ~290
# small kernels of a batch-1 decode step. Each kernel launched this way calls `gdc_wait()` before it
# reads anything an earlier kernel wrote and before its first store (the caching allocator reuses
# buffers, so an early store could clobber a predecessor's input), then `gdc_launch_dependents()`.
# Since every such kernel waits, its completion still implies its predecessor's, so kernels
# launched normally after it keep full stream order.
try:  # pragma: no cover - depends on the installed Triton
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    from triton.backends.nvidia.compiler import CUDAOptions

    _HAS_PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
except ImportError:  # pragma: no cover
    gdc_wait = gdc_launch_dependents = None  # referenced only under USE_PDL=True, which needs them
    _HAS_PDL = False

# True when Triton runs its CPU interpreter (tests); kernels then see CPU tensors.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

_VALID_BACKENDS = ("auto", "torch", "triton")
# "auto": Triton for CUDA tensors when Triton is importable, the torch reference otherwise.
# "torch": always the reference (debugging, A/B comparisons on the GPU).
# "triton": like auto, but the choice is explicit; CPU tensors still take the reference because
# compiled Triton kernels cannot read host memory.
_backend: str = os.environ.get("AGENTSERVE_KERNEL_BACKEND", "auto")
if _backend not in _VALID_BACKENDS:
    _backend = "auto"


def set_backend(name: str) -> None:
    """Select the kernel backend for every dispatcher: "auto" (default), "torch" or "triton"."""
    global _backend
    if name not in _VALID_BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {_VALID_BACKENDS}")
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("kernel backend 'triton' requested but triton is not importable")
    _backend = name


def get_backend() -> str:
    return _backend


def triton_enabled_for(t: torch.Tensor) -> bool:
    """Whether a dispatcher should launch Triton for tensors living where `t` lives.

    A pure Python check (device type, a module global): no device sync, so it is safe inside CUDA
    graph capture."""
    return HAS_TRITON and _backend != "torch" and t.is_cuda


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device | None = None) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM); cached, no sync."""
    if device is None or device.type != "cuda":
        if not torch.cuda.is_available():
            return 132  # heuristics evaluated off-GPU (tests, planning) assume an H100
        index = torch.cuda.current_device()
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(index)


def dot_modes(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) for tl.dot on `dtype` tiles. The interpreter multiplies bf16 tl.dot
    operands as raw integers, so under it bf16 tiles are upcast to fp32 first; compiled kernels feed
    bf16 to the tensor cores. fp32 stays IEEE-exact."""
    upcast = INTERPRET and dtype == torch.bfloat16
    return upcast, "ieee" if (dtype == torch.float32 or upcast) else "tf32"


# AGENTSERVE_PDL=0 turns programmatic dependent launch off (A/B runs; drivers without support).
_pdl_wanted: bool = os.environ.get("AGENTSERVE_PDL", "1") != "0"


def set_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launch on or off for kernels launched from now on (benchmarks'
    A/B runs). Kernels already captured in a CUDA graph keep the mode they were captured with."""
    global _pdl_wanted
    _pdl_wanted = enabled


@functools.lru_cache(maxsize=None)
def _pdl_capable(index: int) -> bool:
    # NVIDIA only: ROCm reports its own capability numbers, and griddepcontrol is PTX.
    return (_HAS_PDL and not INTERPRET and torch.version.hip is None
            and torch.cuda.get_device_capability(index)[0] >= 9)


def pdl_launch(t: torch.Tensor) -> dict[str, bool]:
    """Launch arguments for a kernel that takes `USE_PDL: tl.constexpr` and follows the protocol
    above: programmatic dependent launch on a Hopper (or newer) CUDA device, off elsewhere."""
    if _pdl_wanted and t.is_cuda and _pdl_capable(t.device.index if t.device.index is not None
                                                  else torch.cuda.current_device()):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    """The protocol's wait in every kernel that takes USE_PDL (see above): wait for the previous
    kernel, then let the next one launch. Nothing in the kernel may store before it, nor load what a
    kernel of the step writes. What none does may load before it, off the critical path: weights,
    constants (cos/sin, fp8 scales) and the step's metadata (positions, slots, seq lens, tile maps),
    all in place before the step's first kernel runs."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
