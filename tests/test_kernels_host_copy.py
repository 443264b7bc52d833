"""The kernel copy from host memory (kernels/host_copy.py) in Triton's interpreter: every byte arrives for
sizes below, at and across its chunk and program strides, in bf16, fp8 and int32, from a slice inside a
larger buffer (a swap's slots are such slices); mismatched or odd-sized tensors are refused by name."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import host_copy  # noqa: E402
from agentserve.kernels.fp8_utils import FP8_DTYPE  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(host_copy._copy_words_kernel)


@pytest.mark.parametrize("words,programs", [(1, 4), (4095, 4), (4096, 1), (4097 * 3 + 5, 2), (9 * 4096, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8_DTYPE, torch.int32])
def test_every_byte_arrives(words: int, programs: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(words + programs)
    raw = torch.randint(-2**31, 2**31 - 1, (words + 7,), dtype=torch.int32, generator=g)
    src = raw[3:3 + words].view(torch.uint8).view(dtype)  # an interior slice, as swap slots are
    dst = torch.zeros_like(src)
    host_copy.copy_from_host(dst, src, programs=programs)
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))
    assert torch.equal(raw[3:3 + words], dst.view(torch.int32))


def test_an_empty_copy_does_nothing() -> None:
    host_copy.copy_from_host(torch.empty(0, dtype=torch.bfloat16), torch.empty(0, dtype=torch.bfloat16))


def test_mismatched_tensors_are_refused() -> None:
    with pytest.raises(ValueError, match="same elements"):
        host_copy.copy_from_host(torch.zeros(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.float32))
    with pytest.raises(ValueError, match="same elements"):
        host_copy.copy_from_host(torch.zeros(8), torch.zeros(6))
    with pytest.raises(ValueError, match="contiguous"):
        host_copy.copy_from_host(torch.zeros(4, 4), torch.zeros(4, 4).t())
    with pytest.raises(ValueError, match="32-bit words"):
        host_copy.copy_from_host(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3, dtype=torch.bfloat16))
