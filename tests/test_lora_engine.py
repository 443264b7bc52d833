"""Multi-LoRA through the engine against PEFT on the same tiny weights (each adapter merged into the
base with merge_and_unload): greedy tokens identical for every adapter in one mixed batch with base
requests, more adapters than device slots (and than CPU-tier entries), ranks 4/8/16/64 over different
target-module sets, on the five tiny archs, under chunked prefill; prefix caching never hits across
adapters; reloading a name with other weights changes outputs; unload refusals; the per-step adapter
cap; base-only steps launch no LoRA kernel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # one test runs the engine through the Triton kernels

import pytest  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.errors import AdapterInUseError, AdapterNotFoundError, LoRANotEnabledError  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.lora import layers as lora_layers  # noqa: E402
from agentserve.lora.adapter import LoRAAdapterError  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from agentserve.testing.tiny import ARCHS  # noqa: E402
from helpers.interpreter import is_interpreted  # noqa: E402
from helpers.lora import ALL_MODULES, build_peft_adapter, peft_greedy  # noqa: E402

NEW_TOKENS = 6
TEXTS = ["The quick brown fox jumps over", "def add(a, b):\n    return a + b\n\nprint(add(2,"]
# name -> PEFT LoraConfig: ranks 4/8/16/64 over different target sets (rsLoRA on one).
ADAPTERS: dict[str, dict[str, Any]] = {
    "r4-all": dict(r=4, lora_alpha=8, target_modules=list(ALL_MODULES)),
    "r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r16-mlp": dict(r=16, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r64-kod": dict(r=64, lora_alpha=32, target_modules=["k_proj", "o_proj", "down_proj"]),
}


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def make_llm(base: Path, **kw: Any) -> LLM:
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", max_model_len=256, num_blocks=256,
                                enable_lora=True, max_lora_rank=64)
    opts.update(kw)
    return LLM(str(base), **opts)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(arch, adapter name) -> PEFT directory, built lazily by `dirs_for`."""
    return {}


def dirs_for(arch: str, cache: dict[tuple[str, str], Path], root: Path) -> dict[str, Path]:
    base = tiny_model_cached(arch)
    out = {}
    for seed, (name, cfg) in enumerate(ADAPTERS.items()):
        if (arch, name) not in cache:
            cache[(arch, name)] = build_peft_adapter(base, root / arch / name, seed=seed + 1, **cfg)
        out[name] = cache[(arch, name)]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_matches_peft_merged(arch: str, adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    """4 adapters + base in one generate, 2 device slots and 2 CPU-tier entries (adapters move through
    the slots and are read again from disk), prefill chunked at 16 tokens."""
    base = tiny_model_cached(arch)
    dirs = dirs_for(arch, adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=2, max_cpu_loras=2, max_num_batched_tokens=16,
                   lora_modules={n: str(p) for n, p in dirs.items()})
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    names: list[Optional[str]] = [None, *ADAPTERS]
    outs = llm.generate([p for _ in names for p in prompts], greedy(),
                        adapter=[n for n in names for _ in prompts])
    got = [o.outputs[0].token_ids for o in outs]
    base_ref = peft_greedy(base, None, prompts, NEW_TOKENS)
    assert got[:len(prompts)] == base_ref
    for i, name in enumerate(ADAPTERS, start=1):
        ref = peft_greedy(base, dirs[name], prompts, NEW_TOKENS)
        assert got[i * len(prompts):(i + 1) * len(prompts)] == ref, name
        assert ref != base_ref, f"{name} does not change greedy tokens: the comparison would prove nothing"
    manager = llm.engine.lora_manager
    assert manager is not None
    assert manager.num_slot_loads > 2 and manager.num_disk_reads > len(ADAPTERS)  # slots and tier were reused
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks
    llm.close()


def test_prefix_cache_never_hits_across_adapters(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tiny_model_cached("qwen2")
    dirs = dirs_for("qwen2", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=2, lora_modules={"a": str(dirs["r4-all"]), "b": str(dirs["r8-qv"])})
    prompt = llm.tokenizer.encode(" ".join(TEXTS * 3))
    assert len(prompt) > 2 * llm.engine.config.cache.block_size  # full pages to cache

    def run(adapter: Optional[str]) -> tuple[list[int], int]:
        out = llm.generate([prompt], greedy(), adapter=adapter)[0]
        return list(out.outputs[0].token_ids), out.num_cached_tokens

    first_a = run("a")
    again_a = run("a")
    assert first_a[1] == 0 and again_a[1] > 0 and again_a[0] == first_a[0]  # same adapter: a hit
    b, base_run = run("b"), run(None)
    assert b[1] == 0 and base_run[1] == 0  # other adapters and the base never see a's pages
    assert b[0] == peft_greedy(base, dirs["r8-qv"], [prompt], NEW_TOKENS)[0]
    assert base_run[0] == peft_greedy(base, None, [prompt], NEW_TOKENS)[0]
    llm.close()


def test_reloading_a_name_uses_the_new_weights(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tiny_model_cached("llama")
    dirs = dirs_for("llama", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1)
    prompt = llm.tokenizer.encode(" ".join(TEXTS * 3))
    llm.load_adapter("x", str(dirs["r4-all"]))
    old_key = llm.engine.lora.resolve("x")
    before = llm.generate([prompt], greedy(), adapter="x")[0]
    llm.load_adapter("x", str(dirs["r64-kod"]))  # reload over the name: a new generation
    new_key = llm.engine.lora.resolve("x")
    assert new_key is not None and old_key is not None
    assert new_key.adapter_id == old_key.adapter_id and new_key.generation == old_key.generation + 1
    after = llm.generate([prompt], greedy(), adapter="x")[0]
    assert after.num_cached_tokens == 0  # the old weights' pages are not found under the new key
    assert list(before.outputs[0].token_ids) == peft_greedy(base, dirs["r4-all"], [prompt], NEW_TOKENS)[0]
    assert list(after.outputs[0].token_ids) == peft_greedy(base, dirs["r64-kod"], [prompt], NEW_TOKENS)[0]
    assert before.outputs[0].token_ids != after.outputs[0].token_ids
    llm.unload_adapter("x")
    llm.load_adapter("x", str(dirs["r4-all"]))  # unload + load: again a new generation, cold cache
    again = llm.generate([prompt], greedy(), adapter="x")[0]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == before.outputs[0].token_ids
    llm.close()


def test_unload_in_use_is_refused_unless_drained(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tiny_model_cached("qwen3")
    dirs = dirs_for("qwen3", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1, lora_modules={"a": str(dirs["r8-qv"])})
    engine = llm.engine
    prompt = llm.tokenizer.encode(TEXTS[0])
    engine.add_request("user-7", prompt, greedy())
    engine.add_request("user-8", prompt, greedy(), lora_name="a")
    with pytest.raises(AdapterInUseError, match=r"'a'.*1 request\(s\) \(user-8\)"):
        llm.unload_adapter("a")
    with pytest.raises(AdapterInUseError, match="user-8"):
        llm.load_adapter("a", str(dirs["r4-all"]))  # replacing it under a running request, too
    # With API keys the users may be another tenant's: their ids (a request id can be a client's X-Request-Id)
    # are not told, only how many there are.
    engine.config.server.api_key = ["some-key"]
    with pytest.raises(AdapterInUseError, match=r"'a'.*in use by 1 request\(s\);") as err:
        llm.unload_adapter("a")
    assert "user-8" not in str(err.value)
    engine.config.server.api_key = None
    llm.unload_adapter("a", drain=True)  # drains: it finishes on the weights it started with
    with pytest.raises(AdapterNotFoundError, match="'a' is not loaded"):
        engine.add_request("user-9", prompt, greedy(), lora_name="a")
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = list(out.outputs[0].token_ids)
    assert done["user-8"] == peft_greedy(base, dirs["r8-qv"], [prompt], NEW_TOKENS)[0]
    assert done["user-7"] == peft_greedy(base, None, [prompt], NEW_TOKENS)[0]
    with pytest.raises(AdapterNotFoundError):
        llm.unload_adapter("a")
    llm.close()


def test_at_most_max_loras_adapters_per_step(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Three adapters, one slot: requests of the other adapters wait (skipped, not blocking base
    requests behind them) and every request finishes with its adapter's tokens."""
    base = tiny_model_cached("mistral")
    dirs = dirs_for("mistral", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    names = ["r4-all", "r8-qv", "r16-mlp"]
    llm = make_llm(base, max_loras=1, lora_modules={n: str(dirs[n]) for n in names})
    manager = llm.engine.lora_manager
    assert manager is not None
    per_step: list[set] = []
    original = manager.activate

    def recording(keys: Any) -> list[int]:
        per_step.append({k for k in keys if k is not None})
        return original(keys)

    monkeypatch.setattr(manager, "activate", recording)
    prompt = llm.tokenizer.encode(TEXTS[1])
    order: list[Optional[str]] = ["r4-all", "r8-qv", None, "r16-mlp", "r4-all", None]
    outs = llm.generate([prompt] * len(order), greedy(), adapter=order)
    assert per_step and max(len(s) for s in per_step) == 1
    assert len({k for s in per_step for k in s}) == 3
    for name, out in zip(order, outs):
        ref = peft_greedy(base, dirs[name] if name else None, [prompt], NEW_TOKENS)[0]
        assert list(out.outputs[0].token_ids) == ref, name
    llm.close()


def test_base_only_steps_launch_no_lora_kernels(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny_model_cached("llama3")
    dirs = dirs_for("llama3", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=2, lora_modules={"a": str(dirs["r4-all"])})
    calls = []
    real = lora_layers.add_lora
    monkeypatch.setattr(lora_layers, "add_lora", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    prompt = llm.tokenizer.encode(TEXTS[0])
    base_out = llm.generate([prompt, prompt], greedy())
    assert calls == []
    assert [list(o.outputs[0].token_ids) for o in base_out] == peft_greedy(base, None, [prompt] * 2, NEW_TOKENS)
    llm.generate([prompt, prompt], greedy(), adapter=[None, "a"])
    num_layers = llm.engine.arch.num_layers
    assert len(calls) == 4 * num_layers * NEW_TOKENS  # 4 projections a layer, one forward a token
    llm.close()


def test_offline_api_errors(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    base = tiny_model_cached("qwen2")
    dirs = dirs_for("qwen2", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1, max_lora_rank=8, lora_modules={"a": str(dirs["r4-all"])})
    with pytest.raises(ValueError, match="2 prompts but 1 adapters"):
        llm.generate(["x", "y"], greedy(), adapter=["a"])
    with pytest.raises(AdapterNotFoundError, match=r"'nope' is not loaded \(loaded: 'a'\)"):
        llm.generate("x", greedy(), adapter="nope")
    with pytest.raises(LoRAAdapterError, match="above max_lora_rank 8"):
        llm.load_adapter("big", str(dirs["r64-kod"]))
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        llm.load_adapter("missing", str(tmp_path / "missing"))
    assert llm.list_adapters() == ["a"]  # failed loads bind nothing
    assert not llm.engine.has_unfinished()
    llm.close()
    plain = LLM(str(base), device="cpu", dtype="float32", max_model_len=256, num_blocks=64)
    with pytest.raises(LoRANotEnabledError, match="--enable-lora"):
        plain.load_adapter("a", str(dirs["r4-all"]))
    with pytest.raises(LoRANotEnabledError, match="enable_lora"):
        plain.generate("x", greedy(), adapter="a")  # never silently the base model
    with pytest.raises(LoRANotEnabledError, match="enable_lora"):
        plain.generate("x", greedy(), adapter="")  # not a name, but not None (the base model) either
    plain.close()


def test_lora_target_modules_wraps_only_those_projections(adapter_dirs: dict,
                                                          tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tiny_model_cached("llama")
    dirs = dirs_for("llama", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1, lora_target_modules=["q_proj", "v_proj"], lora_modules={"qv": str(dirs["r8-qv"])})
    layer = llm.engine.runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, lora_layers.LoRALinear)
    assert not isinstance(layer.self_attn.o_proj, lora_layers.LoRALinear)
    assert not isinstance(layer.mlp.down_proj, lora_layers.LoRALinear)
    prompt = llm.tokenizer.encode(TEXTS[0])
    out = llm.generate([prompt], greedy(), adapter="qv")[0]
    assert list(out.outputs[0].token_ids) == peft_greedy(base, dirs["r8-qv"], [prompt], NEW_TOKENS)[0]
    with pytest.raises(LoRAAdapterError, match="outside the modules"):
        llm.load_adapter("all", str(dirs["r4-all"]))
    llm.close()


def test_async_scheduling_with_adapters_matches_peft(adapter_dirs: dict,
                                                      tmp_path_factory: pytest.TempPathFactory) -> None:
    """Async scheduling: step N+1 (and its slot loads) is prepared before step N's tokens are read;
    one slot, so adapters take turns in it between steps."""
    base = tiny_model_cached("qwen2")
    dirs = dirs_for("qwen2", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1, async_scheduling=True,
                   lora_modules={"a": str(dirs["r16-mlp"]), "b": str(dirs["r64-kod"])})
    assert llm.engine.async_scheduling
    prompts = [llm.tokenizer.encode(t) for t in TEXTS]
    names: list[Optional[str]] = ["a", None, "b", "a"]
    outs = llm.generate([p for p in prompts for _ in names], greedy(), adapter=names * len(prompts))
    for i, out in enumerate(outs):
        name, prompt = names[i % len(names)], prompts[i // len(names)]
        ref = peft_greedy(base, dirs["r16-mlp" if name == "a" else "r64-kod"] if name else None, [prompt], NEW_TOKENS)
        assert list(out.outputs[0].token_ids) == ref[0], (name, i)
    llm.close()


def test_engine_through_the_triton_kernels_interpreted(adapter_dirs: dict, tmp_path_factory: pytest.TempPathFactory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's LoRA layers through the Triton shrink / expand (under TRITON_INTERPRET, on the
    CPU) instead of the torch reference: the kernels read the manager's strided slot stacks, the
    tile map of a mixed prefill + decode batch, and match PEFT."""
    from agentserve.kernels import lora as lora_kernels

    if not is_interpreted(lora_kernels._lora_shrink_kernel):
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported (run this file alone)")
    monkeypatch.setattr(lora_kernels, "triton_enabled_for", lambda t: True)
    base = tiny_model_cached("qwen3")
    dirs = dirs_for("qwen3", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=2, lora_modules={"a": str(dirs["r4-all"]), "b": str(dirs["r16-mlp"])})
    prompt = llm.tokenizer.encode(TEXTS[0])
    names: list[Optional[str]] = ["a", None, "b"]
    outs = llm.generate([prompt] * 3, greedy(4), adapter=names)
    for name, out in zip(names, outs):
        ref = peft_greedy(base, dirs[{"a": "r4-all", "b": "r16-mlp"}[name]] if name else None, [prompt], 4)[0]
        assert list(out.outputs[0].token_ids) == ref, name
    llm.close()


def test_adapters_in_use_names_running_and_waiting_adapters(adapter_dirs: dict,
                                                            tmp_path_factory: pytest.TempPathFactory) -> None:
    """What /metrics' lora_requests_info shows: with one slot, one adapter runs and the others wait;
    nothing once every request has finished."""
    base = tiny_model_cached("qwen2")
    dirs = dirs_for("qwen2", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    names = ["r4-all", "r8-qv", "r16-mlp"]
    llm = make_llm(base, max_loras=1, lora_modules={n: str(dirs[n]) for n in names})
    engine = llm.engine
    prompt = llm.tokenizer.encode(TEXTS[0])
    for i, name in enumerate([*names, None]):
        engine.add_request(f"r{i}", prompt, greedy(4), lora_name=name)
    assert engine.lora.adapters_in_use() == ([], sorted(names))
    engine.step()
    running, waiting = engine.lora.adapters_in_use()
    assert len(running) == 1 and sorted(running + waiting) == sorted(names)
    while engine.has_unfinished():
        engine.step()
    assert engine.lora.adapters_in_use() == ([], [])
    llm.close()


def test_a_directory_overwritten_since_its_load_is_not_read_again(adapter_dirs: dict,
                                                                   tmp_path_factory: pytest.TempPathFactory,
                                                                   tmp_path: Path) -> None:
    """A trainer saves its next checkpoint into the directory an adapter was loaded from. With one
    CPU-tier entry the adapter's weights leave memory when another adapter is used, and its next
    request would read the directory again: serving the new files under the old key would mix the
    new weights with the prefix-cache pages of the old ones (tokens of neither). That request fails
    alone with the reason; the base request beside it completes; loading the name again serves the
    new weights exactly."""
    import shutil

    base = tiny_model_cached("llama3")
    dirs = dirs_for("llama3", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    live = tmp_path / "checkpoint"
    shutil.copytree(dirs["r4-all"], live)
    llm = make_llm(base, max_loras=1, max_cpu_loras=1, lora_modules={"a": str(live), "b": str(dirs["r8-qv"])})
    prompt = llm.tokenizer.encode(" ".join(TEXTS * 3))
    first = llm.generate([prompt], greedy(), adapter="a")[0]
    assert list(first.outputs[0].token_ids) == peft_greedy(base, dirs["r4-all"], [prompt], NEW_TOKENS)[0]
    llm.generate([prompt], greedy(), adapter="b")  # a's weights leave the slot and the CPU tier
    shutil.rmtree(live)
    shutil.copytree(dirs["r16-mlp"], live)
    changed, beside = llm.generate([prompt, prompt], greedy(), adapter=["a", None])
    assert changed.error is not None and "changed since it was loaded" in changed.error, changed.error
    assert not changed.outputs[0].token_ids
    assert list(beside.outputs[0].token_ids) == peft_greedy(base, None, [prompt], NEW_TOKENS)[0]
    llm.load_adapter("a", str(live))  # a new key: the new weights, none of the old pages
    again = llm.generate([prompt], greedy(), adapter="a")[0]
    assert again.num_cached_tokens == 0
    assert list(again.outputs[0].token_ids) == peft_greedy(base, dirs["r16-mlp"], [prompt], NEW_TOKENS)[0]
    llm.close()


def test_replaced_weights_are_forgotten_once_nothing_holds_them(adapter_dirs: dict,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """A reload loop (RL-style load_inplace) keeps the manager's records bounded: the weights a
    name no longer points to stay while a drained request still runs on them, and go at the next
    load or unload once it has finished."""
    base = tiny_model_cached("llama")
    dirs = dirs_for("llama", adapter_dirs, tmp_path_factory.getbasetemp() / "peft")
    llm = make_llm(base, max_loras=1)
    engine, manager = llm.engine, llm.engine.lora_manager
    assert manager is not None
    prompt = llm.tokenizer.encode(TEXTS[0])
    for i in range(6):
        llm.load_adapter("x", str(dirs["r4-all" if i % 2 else "r8-qv"]))
    assert manager.unbound_keys() == []
    held = engine.lora.resolve("x")
    engine.add_request("user-1", prompt, greedy(), lora_name="x")
    llm.load_adapter("y", str(dirs["r4-all"]))
    llm.unload_adapter("x", drain=True)
    assert manager.unbound_keys() == [held]  # user-1 still runs on it
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = list(out.outputs[0].token_ids)
    assert done["user-1"] == peft_greedy(base, dirs["r4-all"], [prompt], NEW_TOKENS)[0]
    llm.unload_adapter("y")
    assert manager.unbound_keys() == []
    llm.load_adapter("x", str(dirs["r8-qv"]))
    out = llm.generate([prompt], greedy(), adapter="x")[0]
    assert list(out.outputs[0].token_ids) == peft_greedy(base, dirs["r8-qv"], [prompt], NEW_TOKENS)[0]
    llm.close()
