"""GPU (`pytest -m gpu`): every tile of this GPU's shipped FP8 GEMV table (kernels/configs/, read by
kernels/fp8_gemv_tiles.py) at its own shape and M against the reference (dequantize, then an fp32
matmul), for both kernels (the plain GEMV; gate_up + SiLU against the reference's silu_and_mul); and the
engine's lookups returning them."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from agentserve.kernels import fp8_gemv_tiles, fp8_linear, gemv, gemv_silu
from agentserve.kernels._triton_utils import num_sms
from helpers.gpu_kernels import DEV, GPU_SKIPS

pytestmark = [pytest.mark.gpu, *GPU_SKIPS]


def _entries() -> list[dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    path = fp8_gemv_tiles.table_path(torch.cuda.get_device_name(0))
    return json.loads(path.read_text())["tiles"] if path.exists() else []


ENTRIES = _entries()


@pytest.mark.skipif(not ENTRIES, reason="no shipped FP8 GEMV table for this GPU")
@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e['kernel']}-{e['n']}x{e['k']}-m{e['m']}")
def test_shipped_tile_matches_the_reference(entry: dict[str, Any]) -> None:
    n, k, m = entry["n"], entry["k"], entry["m"]
    tile = gemv.GemvConfig("fma", entry["block_n"], entry["block_k"], num_warps=entry["num_warps"], num_stages=1)
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    weight_q, scale = fp8_linear.quantize_weight_per_channel(torch.randn(n, k, device=DEV) / k ** 0.5)
    # The engine's lookup (no override file) returns the shipped tile.
    assert fp8_linear.fp8_gemv_config(n, k, num_sms(x.device), m, kernel=entry["kernel"],
                                      device_name=fp8_gemv_tiles.device_name_of(x.device)) == tile
    ref = fp8_linear.fp8_linear_ref(x.float(), weight_q, scale)  # fp32
    if entry["kernel"] == "gemv":
        out = fp8_linear.fp8_gemv_triton(x, weight_q, scale, config=tile)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    else:
        out = gemv_silu.gemv_silu_mul_triton(x, weight_q, tile, weight_scale=scale)
        gate, up = ref[:, : n // 2], ref[:, n // 2:]
        torch.testing.assert_close(out.float(), torch.nn.functional.silu(gate) * up, atol=3e-2, rtol=3e-2)
