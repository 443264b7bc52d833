"""What every section of benchmarks/kernel_suite.py shares: the head layouts,
the timer, random paged batches, and the byte and FLOP counts the figures divide by."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# Random paged batches are built by the kernel tests' helper (tests/helpers/paged_batch.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers.paged_batch import PagedBatch, random_paged_batch  # noqa: E402


@dataclass
class Shape:
    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16


LLAMA_8B = Shape("llama-3.1-8b", 32, 8, 128)
LLAMA_1B = Shape("llama-3.2-1b", 32, 8, 64)
QWEN_7B = Shape("qwen2.5-7b", 28, 4, 128)
SMOKE = Shape("smoke", 4, 2, 32, page_size=8, dtype=torch.float16)


@dataclass
class Timer:
    device: str
    results: dict[str, Any] = field(default_factory=dict)

    def ms(self, fn: Callable[[], Any]) -> float:
        if self.device != "cuda":  # smoke mode on CPU: one timed call, the numbers mean nothing
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        import triton.testing

        try:
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except TypeError:  # older triton without return_mode
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])


def kv_bytes(seq_lens: list[int], shape: Shape) -> int:
    return sum(seq_lens) * 2 * shape.num_kv_heads * shape.head_dim * torch.finfo(shape.dtype).bits // 8


def causal_flops(q_lens: list[int], ctx_lens: list[int], shape: Shape) -> float:
    keys_seen = 0
    for q, c in zip(q_lens, ctx_lens):
        keys_seen += q * c + q * (q + 1) // 2  # query i of the chunk sees c + i + 1 keys
    return 4.0 * shape.num_q_heads * shape.head_dim * keys_seen


def make_batch(shape: Shape, q_lens: list[int], ctx_lens: list[int], device: str) -> PagedBatch:
    return random_paged_batch(q_lens, ctx_lens, shape.num_q_heads, shape.num_kv_heads, shape.head_dim,
                              shape.page_size, shape.dtype, device, poison=False, seed=0)


def free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
