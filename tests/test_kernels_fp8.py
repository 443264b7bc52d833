"""FP8 kernels against their torch references in Triton's interpreter (tiny shapes; real shapes on
the GPU: tests/test_kernels_gpu_fp8.py): the FP8-weight GEMV and the per-token activation
quantizer; the KV write, the fused rotary + KV write and the paged attention paths (prefill chunk
with a cached prefix, decode, verification of k+1 tokens, split-KV decode) over e4m3 pages with
per-layer scales. Inputs and scales are fresh random draws.

Triton's interpreter (3.x) has a bug in fp32 -> e4m3 casts: when rounding carries out of the
mantissa it drops the carry instead of moving to the next binade (7.9 -> 4.0 where the GPU and
torch give 8.0). Kernel outputs are compared with `assert_e4m3_equal`, which accepts exactly that
case and nothing else; the KV write is also checked on inputs that need no rounding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import fp8_linear as fl  # noqa: E402
from agentserve.kernels import gemv, gemv_silu  # noqa: E402
from agentserve.kernels import kv_write as kvw  # noqa: E402
from agentserve.kernels import paged_attention as pa  # noqa: E402
from agentserve.kernels import rope_kv_write as rkv  # noqa: E402
from agentserve.kernels.fp8_utils import FP8_DTYPE, quantize_kv_ref  # noqa: E402
from agentserve.kernels.gemv import gemv_config  # noqa: E402
from helpers.paged_batch import random_paged_batch  # noqa: E402
from helpers.interpreter import interpreter_only  # noqa: E402

pytestmark = interpreter_only(fl._fp8_gemv_kernel)

E4M3_STEP = 2.0 ** -3  # relative spacing of e4m3 values (3 mantissa bits)


def assert_e4m3_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit-equal e4m3 values, except where `want` is a power of two and `got` half of it (the
    interpreter's dropped carry, see the module docstring)."""
    g, w = got.float(), want.float()
    mantissa, _ = torch.frexp(w)
    dropped_carry = (mantissa.abs() == 0.5) & (g == w / 2)
    ok = (g == w) | dropped_carry | (torch.isnan(g) & torch.isnan(w))
    assert bool(ok.all()), f"{int((~ok).sum())} e4m3 values differ, e.g. {g[~ok][:4]} vs {w[~ok][:4]}"


def _random_linear(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Rows of very different magnitudes: per-channel scales must not be one scale for all.
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g).mul(4).exp() / k ** 0.5
    wq, ws = fl.quantize_weight_per_channel(w)
    return w, wq, ws


def test_weight_quantization_per_channel_roundtrip() -> None:
    w, wq, ws = _random_linear(24, 40, seed=1)
    assert wq.dtype == FP8_DTYPE and ws.shape == (24,) and ws.dtype == torch.float32
    assert torch.allclose(wq.float().abs().amax(1), torch.full((24,), 448.0))  # each row uses the full range
    deq = fl.dequantize_weight(wq, ws)
    # Round to nearest: at most half a step of each row's largest magnitude's binade.
    assert ((deq - w).abs() <= w.abs().amax(1, keepdim=True) * E4M3_STEP / 2 + 1e-12).all()


@pytest.mark.parametrize("m,n,k,bias", [(1, 40, 64, False), (1, 33, 100, True), (3, 16, 48, True), (2, 40, 1024, True)])
def test_fp8_gemv_matches_reference(m: int, n: int, k: int, bias: bool) -> None:
    _, wq, ws = _random_linear(n, k, seed=m * 100 + n)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = fl.fp8_gemv_triton(x, wq, ws, b)
    ref = fl.fp8_linear_ref(x, wq, ws, b)
    assert y.shape == (m, n) and y.dtype == x.dtype
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    # explicit tiles (the GPU benchmark's sweep): several row blocks and K iterations
    tiles = fl.GemvConfig("fma", 8, 32, num_warps=1, num_stages=1)
    plain = fl.fp8_gemv_triton(x, wq, ws, b, config=tiles)
    torch.testing.assert_close(plain, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k", [100, 256, 40])  # a ragged tail, even chunks, one partial chunk
def test_fp8_weights_before_the_wait_give_the_same_values(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # W_FIRST (AGENTSERVE_FP8_WEIGHTS_BEFORE_WAIT): the first weight chunk loaded before the PDL wait, the same
    # chunks summed in the same order: bitwise equal, plain GEMV and gate_up + SiLU.
    _, wq, ws = _random_linear(34, k, seed=k)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    cfg = fl.GemvConfig("fma", 8, 64, num_warps=1, num_stages=1)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return fl.fp8_gemv_triton(x, wq, ws, config=cfg), gemv_silu.gemv_silu_mul_triton(x, wq, cfg, ws)

    monkeypatch.setattr(gemv, "FP8_WEIGHTS_BEFORE_WAIT", False)
    plain = run()
    monkeypatch.setattr(gemv, "FP8_WEIGHTS_BEFORE_WAIT", True)
    early = run()
    assert torch.equal(plain[0], early[0]) and torch.equal(plain[1], early[1])
    torch.testing.assert_close(early[0].float(), fl.fp8_linear_ref(x.float(), wq, ws), atol=2e-2, rtol=2e-2)


def test_fp8_gemv_heuristic_tiles_are_the_h200_sweeps_winners() -> None:
    # ~8 KB of weights per program, the fewest rows (4 to 32) keeping M x blocks <= 4 per SM: the tiles
    # that won (or tied) on the H200 for the FP8 Llama-3.2-1B draft's o / down, qkv and gate_up at M = 1
    # and 2 (benchmarks/RESULTS.md, 2026-12-04), and the Llama-3.1-8B's qkv and o at M = 1; a vocabulary's
    # lm_head stops at 32 rows.
    want = {(2048, 2048, 1): (4, 2048), (2048, 2048, 2): (8, 1024), (2048, 8192, 1): (4, 2048),
            (3072, 2048, 1): (8, 1024), (3072, 2048, 2): (16, 512), (16384, 2048, 1): (32, 256),
            (16384, 2048, 2): (32, 256), (6144, 4096, 1): (16, 512), (4096, 4096, 1): (8, 1024),
            (128256, 4096, 1): (32, 256)}  # 1B gate_up at M = 2: 32 x 256 15.9 us, 64 x 128 15.8
    for (n, k, m), tile in want.items():
        cfg = fl.fp8_gemv_config(n, k, 132, m)  # no device name: the heuristic
        assert (cfg.kind, cfg.block_n, cfg.block_k) == ("fma", *tile), (n, k, m)
        assert cfg.num_warps == (8 if tile[0] == 16 else 4)
    # A K the tile's chunk does not divide: the 16-bit GEMV's heuristic.
    assert fl.fp8_gemv_config(40, 100, 132, 1) == gemv_config(1, 40, 100, 132)


def test_fp8_gemv_tables_take_precedence_per_kernel_and_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentserve.kernels import fp8_gemv_tiles as tiles

    table = tmp_path / "tiles.json"
    table.write_text(json.dumps({"device": "GPU X", "tiles": [
        {"kernel": "gemv_silu", "n": 16384, "k": 2048, "m": 2, "block_n": 32, "block_k": 128, "num_warps": 8}]}))
    monkeypatch.setenv("AGENTSERVE_FP8_GEMV_TILES", str(table))
    tiles._table.cache_clear()
    try:
        hit = fl.fp8_gemv_config(16384, 2048, 132, 2, kernel="gemv_silu", device_name="GPU X")
        assert (hit.block_n, hit.block_k, hit.num_warps) == (32, 128, 8)
        for kernel, m in [("gemv", 2), ("gemv_silu", 1)]:  # other entries: the heuristic
            assert fl.fp8_gemv_config(16384, 2048, 132, m, kernel=kernel, device_name="GPU X") == \
                tiles.heuristic_tile(16384, 2048, 132, m)
        with pytest.raises(ValueError, match="unknown kernel"):
            fl.fp8_gemv_config(16384, 2048, 132, 2, kernel="gemm", device_name="GPU X")
        monkeypatch.setenv("AGENTSERVE_FP8_GEMV_TILES", str(tmp_path / "missing.json"))
        tiles._table.cache_clear()
        with pytest.raises(FileNotFoundError, match="AGENTSERVE_FP8_GEMV_TILES"):
            fl.fp8_gemv_config(16384, 2048, 132, 2, device_name="GPU X")
        for bad in ['{"tiles": [{"kernel": "gemv", "n": 8}]}', '{"tiles": [{"kernel": "gemm", "n": 1, "k": 1, "m": 1, '
                    '"block_n": 1, "block_k": 1, "num_warps": 4}]}', "not json"]:
            table.write_text(bad)
            monkeypatch.setenv("AGENTSERVE_FP8_GEMV_TILES", str(table))
            tiles._table.cache_clear()
            with pytest.raises(ValueError, match="FP8 GEMV tile table .*tiles.json"):
                fl.fp8_gemv_config(16384, 2048, 132, 2, device_name="GPU X")
    finally:
        tiles._table.cache_clear()
    assert tiles.table_path("NVIDIA H200").name == "fp8_gemv_NVIDIA_H200.json"
    monkeypatch.delenv("AGENTSERVE_FP8_GEMV_TILES")
    shipped = tiles._table("NVIDIA H200")  # the shipped table parses
    tiles._table.cache_clear()
    assert shipped[("gemv_silu", 16384, 2048, 2)].block_n == 64


def test_fp8_gemv_rejects_large_batches() -> None:
    _, wq, ws = _random_linear(16, 32, seed=3)
    with pytest.raises(ValueError, match="M <="):
        fl.fp8_gemv_triton(torch.randn(fl.GEMV_LIMIT_M + 1, 32), wq, ws)


def test_quantize_per_token_matches_reference() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 70, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 0.0, 5.0])[:, None]
    xq, xs = fl.quantize_per_token_triton(x)
    rq, rs = fl.quantize_per_token_ref(x)
    torch.testing.assert_close(xs, rs)
    assert torch.isfinite(xq.float()).all() and (xq.float()[3] == 0).all()  # an all-zero row stays zero
    assert (rq.float().abs().amax(1)[[0, 1, 2, 4]] == 448.0).all()  # each row's absmax maps to 448
    assert_e4m3_equal(xq, rq)


def test_reference_w8a8_emulation_is_close_to_exact() -> None:
    w, wq, ws = _random_linear(32, 64, seed=7)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(8))
    exact = x @ w.t()
    for quantize_input in (False, True):
        y = fl.fp8_linear_ref(x, wq, ws, quantize_input=quantize_input)
        rel = (y - exact).norm() / exact.norm()
        assert rel < 0.06, (quantize_input, float(rel))


# --- FP8 KV cache ---------------------------------------------------------------------------------

def _scales(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, generator=g) * 0.5 + 0.02, torch.rand(1, generator=g) * 0.5 + 0.02


def _pow2_scales(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-of-two scales: x * s / s is exact in fp32, so e4m3 grid values times s need no rounding."""
    g = torch.Generator().manual_seed(seed)
    return tuple(2.0 ** torch.randint(-5, 3, (1,), generator=g).float() for _ in range(2))  # type: ignore[return-value]


def _dequant(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return cache.float() * scale


@pytest.mark.parametrize("on_grid", [True, False])
def test_write_kv_fp8_matches_reference(on_grid: bool) -> None:
    """on_grid: values that are e4m3 numbers times power-of-two scales (no rounding: the stored
    bytes must be exact and dequantize to the input); else arbitrary values."""
    g = torch.Generator().manual_seed(11 + on_grid)
    tokens, heads, d, page, blocks = 7, 2, 16, 4, 5
    k_scale, v_scale = _pow2_scales(12) if on_grid else _scales(12)
    key, value = torch.randn(tokens, heads, d, generator=g) * 3, torch.randn(tokens, heads, d, generator=g)
    if on_grid:
        key = quantize_kv_ref(key, k_scale).float() * k_scale
        value = quantize_kv_ref(value, v_scale).float() * v_scale
    key[0, 0, 0] = 1e4 * float(k_scale)  # past e4m3's range after scaling: saturates, never NaN
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    slots[2] = -1
    caches = [torch.zeros(blocks, page, heads, d, dtype=FP8_DTYPE) for _ in range(4)]
    kvw.write_kv_triton(key, value, caches[0], caches[1], slots, k_scale, v_scale)
    kvw.write_kv_ref(key, value, caches[2], caches[3], slots, k_scale, v_scale)
    assert float(caches[2].float().max()) == 448.0 and float(caches[0].float().max()) == 448.0  # saturated
    if on_grid:
        assert torch.equal(caches[0].view(torch.uint8), caches[2].view(torch.uint8))
        assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))
        valid = slots >= 0
        flat = _dequant(caches[3], v_scale).view(-1, heads, d)
        assert torch.equal(flat[slots[valid]], value[valid])
    else:
        assert_e4m3_equal(caches[0], caches[2])
        assert_e4m3_equal(caches[1], caches[3])


def test_write_kv_fp8_needs_scales() -> None:
    cache = torch.zeros(2, 4, 1, 8, dtype=FP8_DTYPE)
    with pytest.raises(ValueError, match="k_scale"):
        kvw.write_kv_ref(torch.randn(1, 1, 8), torch.randn(1, 1, 8), cache, cache.clone(), torch.tensor([0]))


def test_rope_kv_write_fp8_matches_reference() -> None:
    g = torch.Generator().manual_seed(21)
    tokens, hq, hkv, d, page, blocks = 6, 4, 2, 16, 4, 4
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=g)
    angles = torch.rand(50, d // 2, generator=g) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1)
    positions = torch.randint(0, 50, (tokens,), generator=g)
    slots = torch.randperm(blocks * page, generator=g)[:tokens]
    k_scale, v_scale = _scales(22)

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (t[:, :hq * d].reshape(tokens, hq, d), t[:, hq * d:(hq + hkv) * d].reshape(tokens, hkv, d),
                t[:, (hq + hkv) * d:].reshape(tokens, hkv, d))

    caches = [torch.zeros(blocks, page, hkv, d, dtype=FP8_DTYPE) for _ in range(4)]
    q_tri = rkv.rope_and_write_kv_triton(*split(qkv.clone()), positions, cos_sin, caches[0], caches[1], slots,
                                         k_scale=k_scale, v_scale=v_scale)
    q_ref, _ = rkv.rope_and_write_kv_ref(*split(qkv.clone()), positions, cos_sin, caches[2], caches[3], slots,
                                         k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(q_tri, q_ref, atol=1e-5, rtol=1e-5)
    assert int((caches[2].float() != 0).sum()) > tokens * hkv * d // 2  # the slots were written
    assert_e4m3_equal(caches[0], caches[2])
    assert_e4m3_equal(caches[1], caches[3])


def _fp8_batch(q_lens: list[int], ctx_lens: list[int], hq: int, hkv: int, d: int, page: int, seed: int):
    """A random paged batch with its caches rounded to e4m3 under random per-layer scales. Returns
    the batch (fp8 caches, NaN poison kept: e4m3fn has NaN) and the scales."""
    batch = random_paged_batch(q_lens, ctx_lens, hq, hkv, d, page, torch.float32, seed=seed)
    k_scale, v_scale = _scales(seed + 1)
    batch.k_cache = quantize_kv_ref(batch.k_cache, k_scale)
    batch.v_cache = quantize_kv_ref(batch.v_cache, v_scale)
    return batch, k_scale, v_scale


def _reference(batch, k_scale: torch.Tensor, v_scale: torch.Tensor, scale: float) -> torch.Tensor:
    # The reference reads every gathered slot (masking multiplies by 0): give it NaN-free pages.
    clean_k = quantize_kv_ref(torch.nan_to_num(batch.k_cache.float(), nan=0.0), torch.ones(1))
    clean_v = quantize_kv_ref(torch.nan_to_num(batch.v_cache.float(), nan=0.0), torch.ones(1))
    return pa.paged_attention_ref(*batch.args(clean_k, clean_v), scale, batch.max_query_len, batch.max_seq_len,
                                  k_scale, v_scale)


SCALE = 0.37


@pytest.mark.parametrize("hq,hkv,d,page", [(4, 2, 16, 4), (2, 1, 24, 8)])
def test_unified_attention_fp8_mixed_batch(hq: int, hkv: int, d: int, page: int) -> None:
    """Prefill chunk over a cached prefix, decode, verification (k+1 = 4), fresh prompt."""
    batch, k_scale, v_scale = _fp8_batch([9, 1, 4, 6], [21, 40, 11, 0], hq, hkv, d, page, seed=d + page)
    out = pa.paged_attention_triton(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len,
                                    k_scale=k_scale, v_scale=v_scale)
    ref = _reference(batch, k_scale, v_scale, SCALE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_split_kv_decode_fp8() -> None:
    batch, k_scale, v_scale = _fp8_batch([1, 1, 1], [70, 5, 33], 4, 2, 16, 8, seed=31)
    out = pa.paged_attention_decode_split_triton(*batch.args(), SCALE, 1, batch.max_seq_len, num_splits=3,
                                                 k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, _reference(batch, k_scale, v_scale, SCALE), atol=1e-4, rtol=1e-4)


def test_fp8_attention_reference_close_to_unquantized() -> None:
    """The fp8 pages cost accuracy only through e4m3 rounding of K and V (scales undone exactly)."""
    batch = random_paged_batch([5, 1], [12, 30], 4, 2, 16, 4, torch.float32, seed=41, poison=False)
    exact = pa.paged_attention_ref(*batch.args(), SCALE, batch.max_query_len, batch.max_seq_len)
    k_scale, v_scale = _scales(42)
    fp8 = pa.paged_attention_ref(batch.q, quantize_kv_ref(batch.k_cache, k_scale),
                                 quantize_kv_ref(batch.v_cache, v_scale), batch.block_tables, batch.query_start_loc,
                                 batch.seq_lens, SCALE, batch.max_query_len, batch.max_seq_len, k_scale, v_scale)
    assert float((fp8 - exact).abs().max()) < 0.08
    assert float((fp8 - exact).norm() / exact.norm()) < 0.05


def test_fp8_attention_needs_scales() -> None:
    batch, _, _ = _fp8_batch([1], [3], 2, 1, 16, 4, seed=51)
    with pytest.raises(ValueError, match="k_scale"):
        pa.paged_attention_triton(*batch.args(), SCALE, 1, batch.max_seq_len)


