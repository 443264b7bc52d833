"""The tensor-parallel layers' weight loaders and sharding math, checked on the CPU at tp_size 2 (and
4 for replicated KV heads) by building one layer per rank and comparing with slices of the full
weights; the ranks' partial outputs, combined as the collectives would, equal the unsharded layer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.embedding import ParallelLMHead, VocabParallelEmbedding
from agentserve.model.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                     ReplicatedLinear, RowParallelLinear)
from agentserve.model.loader import build_model
from agentserve.model.parameter import WeightShapeError
from agentserve.testing import tiny_model_cached

HIDDEN, HEAD = 8, 4


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _identity(t: torch.Tensor) -> torch.Tensor:  # one rank's view of a collective; the test combines ranks
    return t


def test_column_parallel_holds_its_rows_and_outputs_concatenate() -> None:
    w, b, x = _rand(6, HIDDEN, seed=0), _rand(6, seed=1), _rand(3, HIDDEN, seed=2)
    outs = []
    for rank in range(2):
        layer = ColumnParallelLinear(HIDDEN, 6, bias=True, tp_size=2, tp_rank=rank)
        layer.weight.weight_loader(layer.weight, w)
        assert layer.bias is not None
        layer.bias.weight_loader(layer.bias, b)
        assert torch.equal(layer.weight, w[3 * rank:3 * rank + 3]) and torch.equal(layer.bias, b[3 * rank:3 * rank + 3])
        outs.append(layer(x))
    assert torch.allclose(torch.cat(outs, dim=-1), F.linear(x, w, b), atol=1e-6)


def test_merged_column_parallel_holds_matching_gate_and_up_slices() -> None:
    gate, up = _rand(6, HIDDEN, seed=3), _rand(6, HIDDEN, seed=4)
    for rank in range(2):
        layer = MergedColumnParallelLinear(HIDDEN, [6, 6], tp_size=2, tp_rank=rank)
        layer.weight.weight_loader(layer.weight, gate, 0)
        layer.weight.weight_loader(layer.weight, up, 1)
        rows = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(layer.weight, torch.cat([gate[rows], up[rows]]))
        # a checkpoint that already fuses gate and up loads the same slices
        fused = MergedColumnParallelLinear(HIDDEN, [6, 6], tp_size=2, tp_rank=rank)
        fused.weight.weight_loader(fused.weight, torch.cat([gate, up]))
        assert torch.equal(fused.weight, layer.weight)


@pytest.mark.parametrize("tp_size,num_heads,num_kv_heads", [(2, 4, 2), (4, 4, 2), (2, 2, 1)])
def test_qkv_parallel_splits_heads_and_replicates_scarce_kv_heads(tp_size: int, num_heads: int,
                                                                  num_kv_heads: int) -> None:
    q, k, v = (_rand(n * HEAD, HIDDEN, seed=s) for n, s in ((num_heads, 5), (num_kv_heads, 6), (num_kv_heads, 7)))
    bias = [_rand(n * HEAD, seed=s) for n, s in ((num_heads, 8), (num_kv_heads, 9), (num_kv_heads, 10))]
    heads_per_rank = num_heads // tp_size
    kv_replicas = max(1, tp_size // num_kv_heads)
    kv_per_rank = max(1, num_kv_heads // tp_size)
    for rank in range(tp_size):
        layer = QKVParallelLinear(HIDDEN, HEAD, num_heads, num_kv_heads, bias=True, tp_size=tp_size, tp_rank=rank)
        assert (layer.num_heads, layer.num_kv_heads, layer.num_kv_head_replicas) == (heads_per_rank, kv_per_rank,
                                                                                    kv_replicas)
        assert layer.bias is not None
        for sid, wt, bt in zip("qkv", (q, k, v), bias):
            layer.weight.weight_loader(layer.weight, wt, sid)
            layer.bias.weight_loader(layer.bias, bt, sid)
        qs = slice(rank * heads_per_rank * HEAD, (rank + 1) * heads_per_rank * HEAD)
        kv_rank = rank // kv_replicas
        ks = slice(kv_rank * kv_per_rank * HEAD, (kv_rank + 1) * kv_per_rank * HEAD)
        assert torch.equal(layer.weight, torch.cat([q[qs], k[ks], v[ks]]))
        assert torch.equal(layer.bias, torch.cat([bias[0][qs], bias[1][ks], bias[2][ks]]))
        fused = QKVParallelLinear(HIDDEN, HEAD, num_heads, num_kv_heads, tp_size=tp_size, tp_rank=rank)
        fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))
        assert torch.equal(fused.weight, layer.weight)


def test_row_parallel_partial_outputs_sum_to_the_full_layer() -> None:
    w, b, x = _rand(HIDDEN, 6, seed=11), _rand(HIDDEN, seed=12), _rand(3, 6, seed=13)
    total = torch.zeros(3, HIDDEN)
    for rank in range(2):
        layer = RowParallelLinear(6, HIDDEN, bias=True, tp_size=2, tp_rank=rank, all_reduce=_identity)
        layer.weight.weight_loader(layer.weight, w)
        assert layer.bias is not None
        layer.bias.weight_loader(layer.bias, b)
        cols = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(layer.weight, w[:, cols]) and torch.equal(layer.bias, b)
        total += layer(x[:, cols])  # the all-reduce's sum; the bias is added by rank 0 only
    assert torch.allclose(total, F.linear(x, w, b), atol=1e-5)


def test_vocab_parallel_embedding_and_lm_head_pad_the_last_slice() -> None:
    vocab = 11  # not divisible by 2: rank 1 holds 5 real rows and one zero padding row
    w, ids, h = _rand(vocab, HIDDEN, seed=14), torch.tensor([0, 5, 6, 10, 3]), _rand(2, HIDDEN, seed=15)
    embedded = torch.zeros(len(ids), HIDDEN)
    logit_slices = []
    for rank in range(2):
        emb = VocabParallelEmbedding(vocab, HIDDEN, tp_size=2, tp_rank=rank, all_reduce=_identity)
        emb.weight.weight_loader(emb.weight, w)
        real = w[6 * rank:6 * rank + 6]
        assert torch.equal(emb.weight[:len(real)], real) and not emb.weight[len(real):].any()
        embedded += emb(ids)
        head = ParallelLMHead(vocab, HIDDEN, tp_size=2, tp_rank=rank, all_gather=_identity)
        head.weight = emb.weight  # tied
        logit_slices.append(F.linear(h, head.weight))
    assert torch.equal(embedded, F.embedding(ids, w))
    # what all_gather + trimming the padding gives
    assert torch.allclose(torch.cat(logit_slices, dim=-1)[:, :vocab], F.linear(h, w), atol=1e-6)
    single = ParallelLMHead(vocab, HIDDEN)
    single.weight.weight_loader(single.weight, w)
    assert torch.equal(single.compute_logits(h), F.linear(h, w))


def test_loaders_reject_wrong_shapes_and_bad_partitions() -> None:
    layer = QKVParallelLinear(HIDDEN, HEAD, 4, 2, tp_size=2, tp_rank=0)
    with pytest.raises(WeightShapeError, match=r"\(6, 8\)"):
        layer.weight.weight_loader(layer.weight, torch.zeros(6, HIDDEN), "k")
    rep = ReplicatedLinear(HIDDEN, 4)
    with pytest.raises(WeightShapeError, match="the config implies"):
        rep.weight.weight_loader(rep.weight, torch.zeros(4, HIDDEN + 1))
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(HIDDEN, 5, tp_size=2, tp_rank=0)
    with pytest.raises(ValueError, match="needs an all_reduce"):
        RowParallelLinear(6, HIDDEN, tp_size=2, tp_rank=1)
    with pytest.raises(ValueError, match="tp_rank 2"):
        ColumnParallelLinear(HIDDEN, 6, tp_size=2, tp_rank=2)


def test_model_loader_fills_fused_params_and_names_what_is_missing(tmp_path: Path) -> None:
    src = tiny_model_cached("qwen2")  # qkv biases and tied embeddings
    arch = ArchConfig.from_dir(src)
    model = build_model(arch, torch.float32, torch.device("cpu"), src, "auto", 0)
    tensors = load_file(str(src / "model.safetensors"))
    attn = model.layers[1].self_attn
    q, k, v = (tensors[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q, k, v]))
    assert attn.qkv_proj.bias is not None
    assert torch.equal(attn.qkv_proj.bias, torch.cat([tensors[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    gate, up = (tensors[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up"))
    assert torch.equal(model.layers[1].mlp.gate_up_proj.weight, torch.cat([gate, up]))
    assert model.lm_head.weight is model.embed_tokens.weight
    assert torch.equal(model.embed_tokens.weight, tensors["model.embed_tokens.weight"])

    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    # Named as the checkpoint names it, not as the fused parameter it fills.
    with pytest.raises(ModelLoadError, match=r"\['model\.layers\.1\.self_attn\.k_proj\.bias'\]"):
        build_model(arch, torch.float32, torch.device("cpu"), tmp_path, "auto", 0)


def test_unquantized_method_keeps_the_gemv_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every linear layer and the lm_head multiply through kernels.gemv.linear (the Triton GEMV at
    M == 1 on CUDA under AGENTSERVE_GEMV), not a plain F.linear of their own."""
    from agentserve.model import quant

    shapes: list[tuple[int, ...]] = []

    def recording_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shapes.append(tuple(weight.shape))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(quant, "linear", recording_linear)
    x = _rand(1, HIDDEN, seed=16)
    layers = [QKVParallelLinear(HIDDEN, HEAD, 2, 1), MergedColumnParallelLinear(HIDDEN, [6, 6]), ReplicatedLinear(HIDDEN, 3)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight)
        layer(x)
    head = ParallelLMHead(10, HIDDEN)
    torch.nn.init.normal_(head.weight)
    head.compute_logits(x)
    assert shapes == [(16, HIDDEN), (12, HIDDEN), (3, HIDDEN), (10, HIDDEN)]
