"""What a page or a LoRA slot held for an earlier request never reaches a later one: the CPU engine's
attention ignores the slots past a row's context whatever they hold, a slot's untargeted projections are
zeroed when an adapter moves in, and an adapter whose weights overflow the serving dtype is refused at load
(served, its requests answered token 0 for ever, and its inf KV poisoned the pages' next owners). Also: an
adapter's files replaced while its first load reads them are refused, as at a re-read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import agentserve.lora.adapter as adapter_module
from agentserve import SamplingParams
from agentserve.kernels import lora as lora_kernels
from agentserve.kernels import paged_attention as pa
from agentserve.llm import LLM
from agentserve.lora.peft_config import LoRAAdapterError
from agentserve.testing import tiny_model_cached
from helpers.lora import build_peft_adapter
from helpers.paged_batch import random_paged_batch

SCALE = 0.37


@pytest.mark.parametrize("poison", [float("inf"), float("-inf"), float("nan")])
def test_attention_reference_ignores_whatever_lies_past_each_context(poison: float) -> None:
    batch = random_paged_batch([9, 1, 4, 1], [21, 40, 11, 3], 4, 2, 16, 8, torch.float32, seed=7)
    k_clean, v_clean = batch.clean_caches()
    want = pa.paged_attention_ref(*batch.args(k_clean, v_clean), SCALE, batch.max_query_len, batch.max_seq_len)
    # Every NaN the helper planted (slots past a context, pages no table holds) becomes `poison`.
    k_bad = torch.where(torch.isnan(batch.k_cache), poison, batch.k_cache)
    v_bad = torch.where(torch.isnan(batch.v_cache), poison, batch.v_cache)
    got = pa.paged_attention_ref(*batch.args(k_bad, v_bad), SCALE, batch.max_query_len, batch.max_seq_len)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    assert torch.equal(v_bad.isnan() | v_bad.isinf(), torch.isnan(batch.v_cache))  # the caches are not written


def test_lora_reference_reads_nothing_past_a_slots_rank() -> None:
    """Rows past a slot's rank (a rank-0 projection: all of them) may hold what an earlier adapter left there;
    the reference multiplied them by a zero mask, so a stale inf gave NaN in the active rows."""
    g = torch.Generator().manual_seed(4)
    ranks = torch.tensor([[4, 0], [2, 3]], dtype=torch.int32)  # [slot, slice]
    lora_a = torch.randn(2, 2, 4, 16, generator=g)              # [slot, slice, rank, in]
    lora_b = torch.randn(2, 4, 16, generator=g)                 # [slot, rank, out]: slices of 8 columns
    scaling = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    x, y = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    slots = torch.tensor([0, 1, -1, 1, 0, -1], dtype=torch.int32)
    want = y.clone()
    for t, slot in enumerate(slots.tolist()):
        for s in range(2) if slot >= 0 else ():
            r = int(ranks[slot, s])
            cols = slice(8 * s, 8 * s + 8)
            want[t, cols] += scaling[slot, s] * (lora_b[slot, :r, cols].T @ (lora_a[slot, s, :r] @ x[t]))
    lora_a[0, 1] = float("inf")        # slot 0's untargeted second slice
    lora_a[1, 0, 2:] = float("inf")    # slot 1's rows past rank 2
    lora_b[0, :, 8:] = float("inf")
    lora_b[1, 3:] = float("inf")
    got = y.clone()
    lora_kernels.add_lora_ref(got, x, lora_a, lora_b, ranks, scaling, slots, [8, 8])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _overflowing_copy(src: Path, dst: Path, module: str, value: float, dtype: torch.dtype) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    state = {k: v.to(dtype) for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
    key = f"base_model.model.model.layers.0.{module}.lora_B.weight"
    state[key][0, 0] = value
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_weights_beyond_the_serving_dtype_are_refused_and_slots_start_clean(tmp_path: Path) -> None:
    base = tiny_model_cached("qwen2")
    full = build_peft_adapter(base, tmp_path / "full", r=4, target_modules=["q_proj", "v_proj", "down_proj"], seed=1)
    qv = build_peft_adapter(base, tmp_path / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=2)
    llm = LLM(str(base), device="cpu", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    # Finite as stored (fp64), inf in fp32: refused at load, naming the module and the dtype.
    huge = _overflowing_copy(full, tmp_path / "huge", "self_attn.v_proj", 1e300, torch.float64)
    with pytest.raises(LoRAAdapterError, match=r"layer 0 v_proj has values beyond torch.float32's range"):
        llm.load_adapter("huge", str(huge))
    # A slot the full adapter used, then taken by a q/v-only one: its MLP A / B are zeroed, not left behind.
    llm.load_adapter("full", str(full))
    llm.load_adapter("qv", str(qv))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate([5, 6, 7], params, adapter="full")
    llm.generate([5, 6, 7], params, adapter="qv")
    manager = llm.engine.lora_manager
    assert manager is not None
    down = manager._slots["down_proj"]
    assert int(down.ranks[0].abs().sum()) == 0
    assert not down.lora_a[0].any() and not down.lora_b[0].any()
    llm.close()


def test_a_checkpoint_saved_into_the_directory_during_its_first_load_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first load noted the files, read the config, then the weights: a trainer's save in between
    served one checkpoint's weights with the other's scaling (neither checkpoint), silently."""
    base = tiny_model_cached("qwen2")
    old = build_peft_adapter(base, tmp_path / "old", r=4, lora_alpha=16, target_modules=["q_proj"], seed=31)
    new = build_peft_adapter(base, tmp_path / "new", r=4, lora_alpha=128, target_modules=["q_proj"], seed=32)
    live = tmp_path / "live"
    shutil.copytree(old, live)
    read_weights = adapter_module._read_weights

    def saved_meanwhile(path: Path) -> object:
        if path == live:
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copy(new / name, live / name)
        return read_weights(path)

    llm = LLM(str(base), device="cpu", dtype="float32", enable_lora=True, max_loras=1, max_lora_rank=8)
    monkeypatch.setattr(adapter_module, "_read_weights", saved_meanwhile)
    with pytest.raises(LoRAAdapterError, match="changed since"):
        llm.load_adapter("x", str(live))
    monkeypatch.setattr(adapter_module, "_read_weights", read_weights)
    llm.load_adapter("x", str(live))  # loaded again: the files as they are now
    llm.close()
