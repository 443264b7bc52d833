"""Shared pieces of the GPU kernel tests (tests/test_kernels_gpu_*.py): the skip conditions, the
device, the tolerances, and Llama-3.1's rotary cos/sin table.

Import it only after the test module has set TRITON_INTERPRET (on a machine without CUDA): it
imports the kernels, and the interpreter must be chosen before triton is first imported."""

from __future__ import annotations

import math

import pytest
import torch

from agentserve.kernels import paged_attention as pa
from agentserve.kernels._triton_utils import HAS_TRITON
from .interpreter import is_interpreted

_INTERPRETED = is_interpreted(pa._paged_attention_kernel)
# Each GPU test module adds these to its own `pytest.mark.gpu` (benchmarks/gpu_suite.sh finds the
# GPU modules by grepping for "mark.gpu", so the mark itself stays written in every module).
GPU_SKIPS = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not HAS_TRITON, reason="needs triton"),
    pytest.mark.skipif(_INTERPRETED, reason="GPU tests need compiled Triton: unset TRITON_INTERPRET"),
]

DEV = "cuda"
LOW = [torch.bfloat16, torch.float16]
TOL16 = dict(atol=2e-2, rtol=2e-2)
TOL32 = dict(atol=1e-4, rtol=1e-4)


def llama3_cos_sin(head_dim: int, max_pos: int) -> torch.Tensor:
    """Llama-3.1 rope (theta 500000, factor 8, low 1, high 4, original 8192), as transformers builds it."""
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    factor, low, high, old_len = 8.0, 1.0, 4.0, 8192.0
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    inv_freq = torch.where(is_medium, smoothed, scaled)
    freqs = torch.arange(max_pos, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEV)
