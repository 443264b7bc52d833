"""The GEMV kernels compiled to sm_90 PTX on a machine without a GPU, and their K loop's body: for the test
that the loops hold no barrier (tests/test_kernels_compile_sm90.py) and benchmarks/gemv_loop_ptx.py. Call
it in a process without TRITON_INTERPRET (the interpreter compiles nothing)."""

from __future__ import annotations

import re
from typing import Any

# Launch signatures of the fma GEMV kernels (kernels/gemv.py, fp8_linear.py, gemv_silu.py).
GEMV = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr", "EVEN_K": "constexpr", "USE_PDL": "constexpr"}
FP8_GEMV = {**GEMV, "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "W_FIRST": "constexpr"}
FP8_SILU = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "ws_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32",
            "I": "i32", "K": "i32", "stride_xm": "i32", "stride_wn": "i32", "stride_ym": "i32",
            "HAS_SCALE": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_I": "constexpr", "BLOCK_K": "constexpr",
            "EVEN_K": "constexpr", "USE_PDL": "constexpr", "W_FIRST": "constexpr"}
# What the runtime specialises as divisible by 16 for these shapes, so the loads vectorise as on the device.
DIVISIBLE = ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "ws_ptr", "N", "I", "K", "stride_xm", "stride_wn", "stride_ym")


def compile_ptx(kernel: Any, signature: dict[str, str], constexprs: dict[str, Any], num_warps: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE if n in signature}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": 1}).asm["ptx"]


def k_loop(ptx: str) -> list[str]:
    """The instructions of the longest backward-branch body (the K loop), without labels and directives."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) for m in [re.match(r"^(\$L__BB\d+_\d+):", line.strip())] if m}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i and i - labels[m.group(1)] > len(best):
            best = lines[labels[m.group(1)]:i + 1]
    assert best, "no K loop found"
    return [line.strip() for line in best if line.strip() and not line.strip().startswith(("$", "//", "{", "}", "."))]
