"""Programmatic dependent launch (kernels/_triton_utils.py): off wherever it cannot run (CPU tensors,
the interpreter), and on an H200 a decode-shaped chain of every kernel that uses it gives bitwise the
same results with it as without, in a CUDA graph and eagerly (a kernel that read its predecessor's
output before `gdc_wait` would race and differ)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import _triton_utils, activation, fp8_linear, gemv, lora, paged_attention  # noqa: E402
from agentserve.kernels import rmsnorm, rope_kv_write  # noqa: E402
from helpers.gpu_kernels import DEV, GPU_SKIPS, llama3_cos_sin  # noqa: E402


def test_pdl_is_off_for_host_tensors() -> None:
    assert _triton_utils.pdl_launch(torch.zeros(1)) == {"USE_PDL": False}


HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, PAGE, LAYERS = 4096, 32, 8, 128, 14336, 16, 4


def _weights(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=DEV).manual_seed(seed)

    def w(n: int, k: int) -> torch.Tensor:
        return (torch.randn(n, k, device=DEV, generator=g) / k ** 0.5).to(torch.bfloat16)

    qkv_out = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layers = []
    for _ in range(LAYERS):
        layer = {"qkv": w(qkv_out, HIDDEN), "o": w(HIDDEN, HEADS * HEAD_DIM), "gate_up": w(2 * INTER, HIDDEN),
                 "norm1": torch.rand(HIDDEN, device=DEV, generator=g).to(torch.bfloat16) + 0.5,
                 "norm2": torch.rand(HIDDEN, device=DEV, generator=g).to(torch.bfloat16) + 0.5}
        layer["down_q"], layer["down_s"] = fp8_linear.quantize_weight_per_channel(w(HIDDEN, INTER))
        # A rank-16 adapter on q/k/v in slot 1 of 2 (the shrink and expand kernels, PDL-launched too).
        layer["lora_a"] = torch.randn(2, 3, 16, HIDDEN, device=DEV, generator=g).to(torch.bfloat16) / HIDDEN ** 0.5
        layer["lora_b"] = torch.randn(2, 16, qkv_out, device=DEV, generator=g).to(torch.bfloat16) / 4
        layers.append(layer)
    return layers


def _decode_chain(x: torch.Tensor, layers: list[dict[str, torch.Tensor]], cache: dict) -> torch.Tensor:
    """A batch-1 decode step's kernel sequence (bf16 GEMVs, one FP8 GEMV per layer, split-KV attention)."""
    residual = x
    h = x
    for i, layer in enumerate(layers):
        h, residual = rmsnorm.rms_norm_triton(h, layer["norm1"], 1e-5, None if i == 0 else residual)
        qkv = gemv.gemv_triton(h, layer["qkv"])
        lora.add_lora(qkv, h, layer["lora_a"], layer["lora_b"], cache["lora_ranks"], cache["lora_scaling"],
                      cache["lora_meta"], [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM],
                      cache["lora_starts"])
        q, k, v = qkv.split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q = rope_kv_write.rope_and_write_kv_triton(
            q.view(1, HEADS, HEAD_DIM), k.view(1, KV_HEADS, HEAD_DIM), v.view(1, KV_HEADS, HEAD_DIM),
            cache["positions"], cache["cos_sin"], cache["k"][i], cache["v"][i], cache["slots"])
        attn = paged_attention.paged_attention_decode_split_triton(
            q, cache["k"][i], cache["v"][i], cache["block_tables"], cache["query_start_loc"], cache["seq_lens"],
            HEAD_DIM ** -0.5, 1, int(cache["max_seq_len"]), num_splits=4)
        h = gemv.gemv_triton(attn.view(1, -1), layer["o"])
        h, residual = rmsnorm.rms_norm_triton(h, layer["norm2"], 1e-5, residual)
        h = activation.silu_and_mul_triton(gemv.gemv_triton(h, layer["gate_up"]))
        h = fp8_linear.fp8_gemv_triton(h, layer["down_q"], layer["down_s"])
    return h + residual


def _cache(seed: int, context: int) -> dict:
    g = torch.Generator(device=DEV).manual_seed(seed)
    pages = context // PAGE + 1
    kv = [torch.randn(pages, PAGE, KV_HEADS, HEAD_DIM, device=DEV, generator=g).to(torch.bfloat16)
          for _ in range(2 * LAYERS)]
    return {"k": kv[:LAYERS], "v": kv[LAYERS:], "cos_sin": llama3_cos_sin(HEAD_DIM, 4096).to(DEV),
            "positions": torch.tensor([context], device=DEV), "slots": torch.tensor([context], device=DEV),
            "block_tables": torch.arange(pages, device=DEV, dtype=torch.int32)[None],
            "query_start_loc": torch.tensor([0, 1], device=DEV, dtype=torch.int32),
            "seq_lens": torch.tensor([context + 1], device=DEV, dtype=torch.int32),
            "max_seq_len": context + 1,
            "lora_meta": lora.build_lora_batch_meta(torch.tensor([1], device=DEV), 2),
            "lora_ranks": torch.tensor([[0, 0, 0], [16, 16, 16]], device=DEV, dtype=torch.int32),
            "lora_scaling": torch.full((2, 3), 2.0, device=DEV),
            "lora_starts": lora.slice_starts_for([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM],
                                                 torch.device(DEV))}


def _run(pdl: bool, graph: bool, x: torch.Tensor, layers: list, context: int) -> torch.Tensor:
    _triton_utils.set_pdl(pdl)
    try:
        cache = _cache(1, context)
        if not graph:
            return _decode_chain(x, layers, cache).clone()
        static_x = x.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compiles outside the capture
            _decode_chain(static_x, layers, _cache(1, context))
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _decode_chain(static_x, layers, cache)
        g.replay()
        torch.cuda.synchronize()
        return out.clone()
    finally:
        _triton_utils.set_pdl(os.environ.get("AGENTSERVE_PDL", "1") != "0")


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
@pytest.mark.parametrize("context", [37, 900])
@GPU_SKIPS[0]
@GPU_SKIPS[1]
@GPU_SKIPS[2]
def test_pdl_decode_chain_matches_plain_launches(graph: bool, context: int) -> None:
    probe = torch.zeros(1, device=DEV)
    _triton_utils.set_pdl(True)
    if not _triton_utils.pdl_launch(probe)["USE_PDL"]:
        pytest.skip("programmatic dependent launch needs a Hopper GPU and a Triton with launch_pdl")
    layers = _weights(0)
    x = torch.randn(1, HIDDEN, device=DEV, generator=torch.Generator(device=DEV).manual_seed(2)).to(torch.bfloat16)
    plain = _run(False, graph, x, layers, context)
    for _ in range(3):  # a race would show as a difference in some replay
        assert torch.equal(_run(True, graph, x, layers, context), plain)
    assert plain.abs().sum() > 0
