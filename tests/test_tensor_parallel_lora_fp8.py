"""Tensor parallelism on the CPU (two ranks over gloo) with LoRA adapters and FP8: greedy tokens at
tensor_parallel_size=2 are the one-rank tokens.

- LoRA: a mixed batch of base rows and two adapters (one on all seven projections, one on k / o /
  down only: both column-parallel and row-parallel shards), adapters loaded after start-up and
  reloaded under the same name, slots reused (max_loras=1), and a model whose single KV head is
  replicated on both ranks (its k / v LoRA columns are too). Each rank's slots hold its shard.
- FP8: online quantization (quantization="fp8"), the fp8 KV cache, and FP8 checkpoints with channel,
  tensor and 128x128-style block scales. The scales a rank computes itself (row-parallel layers,
  KV calibration) are the one-rank scales; block scales whose split falls inside a block are refused.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from agentserve import SamplingParams
from agentserve.kernels.fp8_utils import FP8_DTYPE
from agentserve.llm import LLM
from agentserve.lora.manager import MultiLoRAManager
from agentserve.model.arch_config import ModelLoadError
from agentserve.model.llama import CausalLM
from agentserve.testing import tiny_model_cached
from helpers.fp8_checkpoints import (Quantizer, block_quantizer, channel_quantizer, compressed_tensors_config,
                                     tensor_quantizer, write_checkpoints)
from helpers.lora import ALL_MODULES, build_peft_adapter

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS: list[list[int]] = [[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11] * 6, [300, 301, 5] * 9 + [7]]
ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", num_blocks=64)
LORA: dict[str, Any] = dict(enable_lora=True, max_lora_rank=16)
# Two adapters: every projection (column- and row-parallel), and k / o / down only. B is scaled up
# so that each adapter's greedy tokens differ from the base model's (checked, not assumed).
ADAPTERS: dict[str, dict[str, Any]] = {
    "all": dict(r=8, lora_alpha=16, target_modules=list(ALL_MODULES)),
    "kod": dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "down_proj"]),
}


def tokens(llm: LLM, adapters: Optional[list[Optional[str]]] = None) -> list[list[int]]:
    """Every prompt under each of `adapters` (None: the base model), in one generate call."""
    names = adapters or [None]
    outs = llm.generate([p for _ in names for p in PROMPTS], GREEDY, adapter=[n for n in names for _ in PROMPTS])
    return [o.outputs[0].token_ids for o in outs]


def model_of(llm: LLM) -> CausalLM:
    return llm.engine.runner.model


def manager_of(llm: LLM) -> MultiLoRAManager:
    manager = llm.engine.runner.lora_manager
    assert manager is not None
    return manager


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tp_adapters")


def adapters_for(base: Path, root: Path) -> dict[str, Path]:
    out = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items(), start=1):
        d = root / base.name / name
        out[name] = d if d.is_dir() else build_peft_adapter(base, d, seed=seed, scale=3.0, **cfg)
    return out


# --- LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_mixed_lora_batch_matches_one_rank(arch: str, adapter_root: Path) -> None:
    base = tiny_model_cached(arch)
    dirs = {n: str(p) for n, p in adapters_for(base, adapter_root).items()}
    names: list[Optional[str]] = [None, "all", "kod"]
    with LLM(str(base), **ENGINE, **LORA, max_loras=2, lora_modules=dirs) as llm:
        one = tokens(llm, names)
        whole = {f: manager_of(llm).stack(0, f) for f in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    with LLM(str(base), **ENGINE, **LORA, max_loras=2, lora_modules=dirs, tensor_parallel_size=2) as llm:
        two = tokens(llm, names)
        manager = manager_of(llm)
        # Rank 0's slots hold its shard: column-parallel B and row-parallel A are cut in half.
        for fused, cut in (("qkv_proj", "b"), ("gate_up_proj", "b"), ("o_proj", "a"), ("down_proj", "a")):
            stack, ref = manager.stack(0, fused), whole[fused]
            a_div, b_div = (1, 2) if cut == "b" else (2, 1)
            assert stack.lora_a.shape[-1] * a_div == ref.lora_a.shape[-1]
            assert stack.lora_b.shape[-1] * b_div == ref.lora_b.shape[-1]
        assert manager.num_slot_loads == 2
    assert two == one
    n = len(PROMPTS)
    base_rows, all_rows, kod_rows = one[:n], one[n:2 * n], one[2 * n:]
    assert all_rows != base_rows and kod_rows != base_rows and all_rows != kod_rows


def _load_reload_sequence(base: Path, dirs: dict[str, Path], **kw: Any) -> tuple[list[list[int]], int]:
    """Adapters loaded after start-up, one slot (every adapter change reloads it), then "kod"
    reloaded under its name with the other adapter's weights."""
    with LLM(str(base), **ENGINE, **LORA, max_loras=1, **kw) as llm:
        llm.load_adapter("all", str(dirs["all"]))
        llm.load_adapter("kod", str(dirs["kod"]))
        first = tokens(llm, [None, "all", "kod", "all"])
        llm.unload_adapter("kod")
        llm.load_adapter("kod", str(dirs["all"]))
        second = tokens(llm, ["kod"])
        return first + second, manager_of(llm).num_slot_loads


def test_adapters_loaded_reloaded_and_swapped_through_one_slot_match_one_rank(adapter_root: Path) -> None:
    """The model has one KV head, replicated on both ranks: the k / v LoRA columns are too."""
    base = tiny_model_cached("llama", num_heads=4, num_kv_heads=1)
    dirs = adapters_for(base, adapter_root)
    one, loads_one = _load_reload_sequence(base, dirs)
    two, loads_two = _load_reload_sequence(base, dirs, tensor_parallel_size=2)
    assert two == one
    assert loads_two == loads_one >= 3  # "all", "kod", the reloaded "kod" at least
    n = len(PROMPTS)
    assert one[4 * n:] == one[n:2 * n]  # the reloaded name serves the weights it was reloaded with


def test_lora_over_fp8_weights_with_ngram_speculation_matches_one_rank(adapter_root: Path) -> None:
    """Adapters on FP8 layers (the delta joins the FP8 row-parallel partial output), in steps that
    verify n-gram drafts (rows with adapters run eagerly on every rank)."""
    base = tiny_model_cached("llama")
    dirs = {n: str(p) for n, p in adapters_for(base, adapter_root).items()}
    kw: dict[str, Any] = dict(**LORA, max_loras=2, lora_modules=dirs, quantization="fp8",
                              speculative_method="ngram", spec_dynamic=False)
    names: list[Optional[str]] = [None, "all", "kod"]
    with LLM(str(base), **ENGINE, **kw) as llm:
        one = tokens(llm, names)
    with LLM(str(base), **ENGINE, **kw, tensor_parallel_size=2) as llm:
        two = tokens(llm, names)
        assert llm.engine.metrics.spec_num_drafts > 0
    assert two == one


# --- FP8 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_online_fp8_matches_one_rank(arch: str) -> None:
    path = str(tiny_model_cached(arch))
    with LLM(path, **ENGINE, quantization="fp8") as llm:
        one = tokens(llm)
        attn = model_of(llm).layers[1].self_attn
        o_scale, qkv_scale = attn.o_proj.weight_scale.clone(), attn.qkv_proj.weight_scale.clone()
        o_weight = attn.o_proj.weight.float().clone()
    with LLM(path, **ENGINE, quantization="fp8", tensor_parallel_size=2) as llm:
        two = tokens(llm)
        attn = model_of(llm).layers[1].self_attn
        assert attn.o_proj.weight.dtype == FP8_DTYPE
        # Row-parallel: every output's scale, from the whole row (the max over both ranks' columns),
        # so rank 0's e4m3 weights are exactly the one-rank weights' first half of the columns.
        assert torch.equal(attn.o_proj.weight_scale, o_scale)
        k = attn.o_proj.input_size_per_partition
        assert torch.equal(attn.o_proj.weight.float(), o_weight[:, :k])
        # Column-parallel: the scales of this rank's q rows.
        q = attn.q_size
        assert torch.equal(attn.qkv_proj.weight_scale[:q], qkv_scale[:q])
    assert two == one


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fp8_kv_cache_matches_one_rank(arch: str) -> None:
    path = str(tiny_model_cached(arch))

    def kv_scales(llm: LLM) -> list[tuple[float, float]]:
        return [(float(layer.self_attn.k_scale), float(layer.self_attn.v_scale)) for layer in model_of(llm).layers]

    with LLM(path, **ENGINE, kv_cache_dtype="fp8") as llm:
        one = tokens(llm)
        scales_one = kv_scales(llm)
    with LLM(path, **ENGINE, kv_cache_dtype="fp8", tensor_parallel_size=2) as llm:
        two = tokens(llm)
        assert llm.engine.runner.kv_cache.layers[0][0].dtype == FP8_DTYPE
        # Calibrated on each rank's KV heads, the max taken over the ranks: the one-rank scales (up to
        # the float rounding of the calibration forward's all-reduces, which sum in another order).
        scales_two = kv_scales(llm)
        assert scales_two == [pytest.approx(s, rel=1e-5) for s in scales_one]
    assert two == one
    assert len(set(scales_one)) > 1  # per-layer scales: a wrong layer's scale would show


CHECKPOINTS: dict[str, tuple[Quantizer, dict[str, Any]]] = {
    "channel": (channel_quantizer(torch.float32), compressed_tensors_config("channel", None)),
    "tensor": (tensor_quantizer(False), compressed_tensors_config("tensor", None)),
    # 16 x 32 blocks: each rank's 16-row k / v and 32-column o_proj inputs are whole blocks.
    "block": (block_quantizer((16, 32)), {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                          "weight_block_size": [16, 32]}),
}


@pytest.mark.parametrize("scheme", list(CHECKPOINTS))
def test_fp8_checkpoints_match_one_rank(scheme: str, tmp_path: Path) -> None:
    quantizer, config = CHECKPOINTS[scheme]
    fp8, _ = write_checkpoints(tiny_model_cached("llama"), tmp_path, quantizer, config)
    with LLM(str(fp8), **ENGINE) as llm:
        one = tokens(llm)
        down_scale = model_of(llm).layers[0].mlp.down_proj.weight_scale.clone()
    with LLM(str(fp8), **ENGINE, tensor_parallel_size=2) as llm:
        two = tokens(llm)
        down = model_of(llm).layers[0].mlp.down_proj
        assert down.weight.dtype == FP8_DTYPE and down.tp_size == 2
        assert torch.equal(down.weight_scale, down_scale)  # row-parallel: the whole scale vector
    assert two == one


def test_block_scales_split_inside_a_block_are_refused(tmp_path: Path) -> None:
    """32-row blocks: each rank would hold 16 of k_proj's 32 rows, half a block."""
    fp8, _ = write_checkpoints(tiny_model_cached("llama"), tmp_path, block_quantizer((32, 32)),
                               {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]})
    before = set(multiprocessing.active_children())
    with pytest.raises(ModelLoadError, match=r"qkv_proj: tensor_parallel_size=2 gives each rank 16 of the 32 output "
                                             r"rows \(k\), not a multiple of the 32-row FP8 scale blocks"):
        LLM(str(fp8), **ENGINE, tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) == before
