"""PEFT LoRA directories built with the installed `peft` over the tiny models, loaded back by
agentserve.lora.adapter: tensors, scaling (alpha / r, patterns, rsLoRA) and the delta they give
against PEFT's own layer forward; then every refusal, each naming its problem."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the stacking test runs the kernels too

import pytest  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from agentserve.kernels import lora as lora_kernels  # noqa: E402
from agentserve.lora.adapter import (  # noqa: E402
    FUSED_SLICES, LORA_TARGET_MODULES, LoRAAdapter, LoRAAdapterError, load_lora_adapter,
    lora_scaling,
)
from agentserve.lora.key import LoRAKey  # noqa: E402
from agentserve.model.arch_config import ArchConfig  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from agentserve.testing.tiny import ARCHS  # noqa: E402
from helpers.interpreter import is_interpreted  # noqa: E402

_INTERPRETED = is_interpreted(lora_kernels._lora_shrink_kernel)

ALL = list(LORA_TARGET_MODULES)


def build_peft_adapter(base: Path, out: Path, *, safe: bool = True, seed: int = 0, **lora_kw: Any):
    """Save a PEFT LoRA over the tiny model at `base` with random (non-zero) A and B; returns the
    PEFT model, so tests can read PEFT's own weights and scaling."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    peft_model.save_pretrained(out, safe_serialization=safe)
    return peft_model


def peft_module(peft_model: Any, layer: int, module: str) -> Any:
    block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return getattr(getattr(peft_model.base_model.model.model.layers[layer], block), module)


def load(path: Path, arch_dir: Path, max_lora_rank: int = 64, **kw: Any) -> LoRAAdapter:
    return load_lora_adapter(path, ArchConfig.from_dir(arch_dir), max_lora_rank=max_lora_rank,
                             adapter_id=kw.pop("adapter_id", 7), **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_every_projection_like_peft(arch: str, tmp_path: Path) -> None:
    base = tiny_model_cached(arch)
    peft_model = build_peft_adapter(base, tmp_path / "a", r=8, lora_alpha=16, target_modules=ALL, seed=1)
    adapter = load(tmp_path / "a", base, adapter_id=3, generation=2, name="skill")
    assert adapter.key == LoRAKey(3, 2) and adapter.name == "skill" and adapter.rank == 8
    assert adapter.target_modules == frozenset(ALL)
    assert len(adapter.layers) == ArchConfig.from_dir(base).num_layers
    for layer in range(len(adapter.layers)):
        for module in ALL:
            ours = adapter.module(layer, module)
            theirs = peft_module(peft_model, layer, module)
            assert ours is not None
            assert torch.equal(ours.lora_a, theirs.lora_A["default"].weight.detach())
            assert torch.equal(ours.lora_b, theirs.lora_B["default"].weight.detach())
            assert ours.scaling == pytest.approx(theirs.scaling["default"]) == 2.0
    qkv = adapter.fused_slices(0, "qkv_proj")
    assert [w.lora_b.shape[0] for w in qkv if w is not None] == [
        peft_module(peft_model, 0, m).base_layer.out_features for m in ("q_proj", "k_proj", "v_proj")]


def test_delta_matches_peft_layer_forward(tmp_path: Path) -> None:
    """scaling * (x @ A^T) @ B^T is exactly what PEFT's LoRA layer adds to its base layer."""
    base = tiny_model_cached("qwen3")
    peft_model = build_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=12, use_rslora=True,
                                    target_modules=["q_proj", "down_proj"], seed=2)
    adapter = load(tmp_path / "a", base)
    for module in ("q_proj", "down_proj"):
        layer = peft_module(peft_model, 1, module)
        x = torch.randn(5, layer.base_layer.in_features)
        w = adapter.module(1, module)
        assert w is not None
        with torch.no_grad():
            expected = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(w.scaling * (x @ w.lora_a.T) @ w.lora_b.T, expected, atol=1e-5, rtol=1e-5)


def test_patterns_rslora_and_layer_subset(tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    peft_model = build_peft_adapter(
        base, tmp_path / "a", r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 4}, layers_to_transform=[1], seed=3)
    adapter = load(tmp_path / "a", base)
    assert adapter.layers[0] == {}  # layers_to_transform=[1]: nothing on layer 0
    assert set(adapter.layers[1]) == {"q_proj", "v_proj", "up_proj"}
    expected = {"q_proj": (8, lora_scaling(16, 8, True)), "v_proj": (2, 16 / 2 ** 0.5),
                "up_proj": (8, 4 / 8 ** 0.5)}
    for module, (rank, scaling) in expected.items():
        w = adapter.module(1, module)
        assert w is not None and w.rank == rank
        assert w.scaling == pytest.approx(scaling)
        assert w.scaling == pytest.approx(peft_module(peft_model, 1, module).scaling["default"])
    assert adapter.fused_slices(1, "qkv_proj")[1] is None  # k_proj not targeted
    assert adapter.rank == 8


def test_bin_weights_and_dtype_cast(tmp_path: Path) -> None:
    base = tiny_model_cached("mistral")
    build_peft_adapter(base, tmp_path / "st", r=4, target_modules=["o_proj", "gate_proj"], seed=4)
    build_peft_adapter(base, tmp_path / "bin", safe=False, r=4, target_modules=["o_proj", "gate_proj"], seed=4)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    from_st = load(tmp_path / "st", base)
    from_bin = load(tmp_path / "bin", base, dtype=torch.bfloat16)
    w_st, w_bin = from_st.module(0, "gate_proj"), from_bin.module(0, "gate_proj")
    assert w_st is not None and w_bin is not None and w_bin.lora_a.dtype == torch.bfloat16
    assert torch.equal(w_bin.lora_a, w_st.lora_a.to(torch.bfloat16))
    assert from_bin.nbytes * 2 == from_st.nbytes


def test_float8_weights_are_read_as_peft_casts_them(tmp_path: Path) -> None:
    """An adapter saved in float8_e4m3fn (a quantized export) loads as PEFT loads it, each value cast to float;
    integer weights are refused naming the dtype."""
    base = tiny_model_cached("llama")
    build_peft_adapter(base, tmp_path / "src", r=4, target_modules=["q_proj", "down_proj"], seed=9)
    state = load_file(str(tmp_path / "src" / "adapter_model.safetensors"))
    fp8 = _copy(tmp_path / "src", tmp_path / "fp8")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, str(fp8 / "adapter_model.safetensors"))
    loaded = load(fp8, base).module(1, "down_proj")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    assert loaded is not None and loaded.lora_b.dtype == torch.float32
    assert torch.equal(loaded.lora_b, state[key].to(torch.float8_e4m3fn).float())
    ints = _copy(tmp_path / "src", tmp_path / "ints")
    save_file({k: v.to(torch.int8) for k, v in state.items()}, str(ints / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match=r"layer 0 \w+ has lora_A of dtype torch.int8; LoRA weights are "
                                               r"floating point"):
        load(ints, base)


def test_a_config_without_target_modules_targets_peft_default(tmp_path: Path) -> None:
    """PEFT adapts its per-model-type default (q_proj, v_proj) when target_modules is null or absent, and drops
    saved weights of other modules: such weights are refused (served, they would change the outputs)."""
    base = tiny_model_cached("qwen2")
    build_peft_adapter(base, tmp_path / "qv", r=4, target_modules=["q_proj", "v_proj"], seed=2)
    build_peft_adapter(base, tmp_path / "all", r=4, target_modules=ALL, seed=2)
    for edit in ({"target_modules": None}, {}):
        qv = _copy(tmp_path / "qv", tmp_path / f"qv-{len(edit)}", edit)
        if not edit:
            config = json.loads((qv / "adapter_config.json").read_text())
            del config["target_modules"]
            (qv / "adapter_config.json").write_text(json.dumps(config))
        assert load(qv, base).target_modules == {"q_proj", "v_proj"}
    every = _copy(tmp_path / "all", tmp_path / "all-null", {"target_modules": None})
    with pytest.raises(LoRAAdapterError, match=r"which target_modules \(not given: PEFT's default for this model type, "
                                               r"\['q_proj', 'v_proj'\]\) .* PEFT would ignore them"):
        load(every, base)


@pytest.mark.parametrize("fused", list(FUSED_SLICES))
def test_stacked_slots_reproduce_peft_fused_projection(fused: str, tmp_path: Path) -> None:
    """PEFT directory -> load -> slot_weights stacked into kernel buffers -> shrink/expand over the
    fused base output equals PEFT's own modules, per token, for two adapters (different ranks,
    target sets and scaling) and base rows in one batch (qwen2: GQA, biased qkv)."""
    base = tiny_model_cached("qwen2")
    peft_a = build_peft_adapter(base, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], seed=1)
    peft_b = build_peft_adapter(base, tmp_path / "b", r=8, lora_alpha=4, use_rslora=True, target_modules=ALL,
                                seed=2)
    by_slot = {2: (load(tmp_path / "a", base, adapter_id=1), peft_a), 0: (load(tmp_path / "b", base), peft_b)}
    layer, max_loras, max_rank, modules = 1, 3, 16, FUSED_SLICES[fused]
    in_features = by_slot[0][0].module_shapes[modules[0]][0]
    out_features = sum(by_slot[0][0].module_shapes[m][1] for m in modules)
    lora_a = torch.zeros(max_loras, len(modules), max_rank, in_features)
    lora_b = torch.zeros(max_loras, max_rank, out_features)
    ranks = torch.zeros(max_loras, len(modules), dtype=torch.int32)
    scaling = torch.zeros(max_loras, len(modules))
    for slot, (adapter, _) in by_slot.items():  # slot 1 stays empty (rank 0 everywhere)
        w = adapter.slot_weights(layer, fused, max_rank, torch.float32)
        lora_a[slot], lora_b[slot], ranks[slot], scaling[slot] = w.lora_a, w.lora_b, w.ranks, w.scaling
    slots = torch.tensor([2, 0, -1, 0, 2, 2, -1, 0, 0], dtype=torch.int32)
    x = torch.randn(len(slots), in_features)
    with torch.no_grad():
        # peft_b wraps every module; its base layers are the base model's (shared by both builds)
        y_base = torch.cat([peft_module(peft_b, layer, m).base_layer(x) for m in modules], dim=-1)
        expected = y_base.clone()
        for slot, (_, peft_model) in by_slot.items():
            rows = slots == slot
            expected[rows] = torch.cat([peft_module(peft_model, layer, m)(x[rows]) for m in modules], dim=-1)
    sizes = [by_slot[0][0].module_shapes[m][1] for m in modules]
    meta = lora_kernels.build_lora_batch_meta(slots, max_loras)
    y_ref = y_base.clone()
    lora_kernels.add_lora(y_ref, x, lora_a, lora_b, ranks, scaling, meta, sizes,
                          lora_kernels.slice_starts_for(sizes, x.device))
    torch.testing.assert_close(y_ref, expected, atol=1e-5, rtol=1e-5)
    if _INTERPRETED:
        y_kernel = y_base.clone()
        shrunk = lora_kernels.lora_shrink(x, lora_a, ranks, meta)
        lora_kernels.lora_expand(y_kernel, shrunk, lora_b, ranks, scaling, meta,
                                 lora_kernels.slice_starts_for(sizes, x.device))
        torch.testing.assert_close(y_kernel, expected, atol=1e-4, rtol=1e-4)


def test_slot_weights_refuse_a_smaller_max_rank(tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    build_peft_adapter(base, tmp_path / "a", r=8, target_modules=["o_proj"], seed=3)
    adapter = load(tmp_path / "a", base)
    assert adapter.slot_weights(0, "qkv_proj", 8, torch.float32).ranks.tolist() == [0, 0, 0]
    with pytest.raises(LoRAAdapterError, match="above max_lora_rank 4"):
        adapter.slot_weights(0, "o_proj", 4, torch.float32)


# ---------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "good"
    build_peft_adapter(tiny_model_cached("llama"), path, r=8, target_modules=["q_proj", "v_proj"], seed=5)
    return path


def _copy(src: Path, dst: Path, config_edit: dict[str, Any] | None = None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config_edit or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    return dst


def test_missing_directory_config_and_weights(good_adapter: Path, tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        load(tmp_path / "nope", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoRAAdapterError, match="adapter_config.json"):
        load(tmp_path / "empty", base)
    no_weights = _copy(good_adapter, tmp_path / "noweights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAAdapterError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        load(no_weights, base)


def test_paths_the_os_refuses_are_adapter_errors(good_adapter: Path, tmp_path: Path) -> None:
    """An API caller's string reaches the file system: a NUL byte (ValueError from os.stat), a name
    too long or an unreadable directory (OSError) are LoRAAdapterErrors naming the path, so a server
    answers 400 rather than 500, and a re-read after eviction fails its request, not the step."""
    base = tiny_model_cached("llama")
    with pytest.raises(LoRAAdapterError, match="contains a NUL byte"):
        load(Path(str(good_adapter) + "\x00"), base)
    with pytest.raises(LoRAAdapterError, match="cannot read LoRA adapter directory .*name too long"):
        load(tmp_path / ("x" * 5000), base)
    locked = _copy(good_adapter, tmp_path / "locked")
    locked.chmod(0)
    try:
        if os.access(locked / "adapter_config.json", os.R_OK):
            return  # root reads through mode 0; the two cases above still ran
        with pytest.raises(LoRAAdapterError, match="cannot read LoRA adapter directory .*Permission denied"):
            load(locked, base)
    finally:
        locked.chmod(0o755)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_and_numbers(good_adapter: Path, tmp_path: Path, value: float) -> None:
    """A diverged training run saves NaN / inf LoRA weights; served, its requests would answer the argmax of
    NaN logits (token 0) for ever, with no error anywhere. Refused at load, naming the module; so is a
    non-finite lora_alpha / alpha_pattern (Python's json writes and reads NaN and Infinity)."""
    base = tiny_model_cached("llama")
    state = load_file(str(good_adapter / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    state[key] = state[key].clone()
    state[key][3, 2] = value
    path = _copy(good_adapter, tmp_path / "diverged")
    save_file(state, str(path / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match=r"layer 1 v_proj has NaN or infinite values in its lora_B"):
        load(path, base)
    for field, edit in [("lora_alpha", {"lora_alpha": value}), (r"alpha_pattern\['q_proj'\]",
                                                                 {"alpha_pattern": {"q_proj": value}})]:
        path = _copy(good_adapter, tmp_path / f"config-{field[:5]}", edit)
        with pytest.raises(LoRAAdapterError, match=rf"{field} must be a finite number, not {value}"):
            load(path, base)


def test_a_config_that_is_not_utf8_is_named(good_adapter: Path, tmp_path: Path) -> None:
    """PowerShell's Out-File writes UTF-16 with a byte-order mark: the error names the file and says what
    it is not, rather than a bare UnicodeDecodeError."""
    path = _copy(good_adapter, tmp_path / "utf16")
    config = path / "adapter_config.json"
    config.write_bytes(config.read_text().encode("utf-16"))
    with pytest.raises(LoRAAdapterError, match=rf"{re.escape(str(config))} is not UTF-8 text"):
        load(path, tiny_model_cached("llama"))


def test_a_file_given_for_the_directory(good_adapter: Path) -> None:
    """A path to one of the adapter's files (it exists: saying it does not would send the user looking
    in the wrong place) is refused with the directory to give instead."""
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with pytest.raises(LoRAAdapterError, match=rf"{name} is a file, not a directory; give the PEFT adapter "
                                                   rf"directory that holds it \({re.escape(str(good_adapter))}\)"):
            load(good_adapter / name, tiny_model_cached("llama"))


@pytest.mark.parametrize("edit,message", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "embed_tokens.*embeddings"),
    ({"target_modules": ["lm_head"]}, "lm_head"),
    ({"init_lora_weights": "pissa"}, "rewrites the base model's weights"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_unsupported_config(good_adapter: Path, tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    path = _copy(good_adapter, tmp_path / "bad", edit)
    with pytest.raises(LoRAAdapterError, match=message):
        load(path, tiny_model_cached("llama"))


@pytest.mark.parametrize("target,message", [("embed_tokens", "embed"), ("lm_head", "lm_head")])
def test_unsupported_weights_from_peft(tmp_path: Path, target: str, message: str) -> None:
    """Real PEFT saves of LoRA on embeddings / lm_head (the config check would catch them too:
    here the target list is dropped so the weight keys are what is refused)."""
    base = tiny_model_cached("llama")
    build_peft_adapter(base, tmp_path / "src", r=4, target_modules=["q_proj", target], seed=6)
    path = _copy(tmp_path / "src", tmp_path / "bad", {"target_modules": "all-linear"})
    with pytest.raises(LoRAAdapterError, match=message):
        load(path, base)


def test_dora_weights_are_refused(tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    build_peft_adapter(base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True, seed=7)
    with pytest.raises(LoRAAdapterError, match="DoRA"):
        load(tmp_path / "dora", base)


def test_rank_above_limit(good_adapter: Path) -> None:
    with pytest.raises(LoRAAdapterError, match="rank 8, above max_lora_rank 4"):
        load(good_adapter, tiny_model_cached("llama"), max_lora_rank=4)
    assert load(good_adapter, tiny_model_cached("llama"), max_lora_rank=8).rank == 8


def test_config_rank_disagreeing_with_weights(good_adapter: Path, tmp_path: Path) -> None:
    path = _copy(good_adapter, tmp_path / "bad", {"r": 4})
    with pytest.raises(LoRAAdapterError, match="rank 8 in its weights but 4 in the config"):
        load(path, tiny_model_cached("llama"))


def test_shapes_of_another_model(good_adapter: Path, tmp_path: Path) -> None:
    arch = ArchConfig.from_dir(tiny_model_cached("llama"))
    for other, message in [(dataclasses.replace(arch, hidden_size=96), "different model"),
                           (dataclasses.replace(arch, num_kv_heads=1), "v_proj maps 64 -> 32"),
                           (dataclasses.replace(arch, num_layers=1), "layer 1, but the base model has 1 layers")]:
        with pytest.raises(LoRAAdapterError, match=message):
            load_lora_adapter(good_adapter, other, max_lora_rank=64, adapter_id=1)


def test_broken_weight_files(good_adapter: Path, tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    state = load_file(str(good_adapter / "adapter_model.safetensors"))
    cases = {
        "no_b": ({k: v for k, v in state.items() if "layers.0.self_attn.q_proj.lora_B" not in k},
                 "layer 0 q_proj has no lora_B"),
        "odd_key": (dict(state, **{"base_model.model.model.norm.lora_A.weight": torch.zeros(8, 64)}),
                    "unexpected weight"),
        "bias": (dict(state, **{"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}),
                 "LoRA bias"),
        # A config may name modules this model lacks (PEFT skips them); a weight for one is refused.
        "router": (dict(state, **{"base_model.model.model.layers.0.mlp.router.lora_A.weight": torch.zeros(8, 64)}),
                   "targets module 'router', which is not supported"),
        "rank_mismatch": (dict(state, **{"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
                                         torch.zeros(64, 4)}), r"lora_A \(8, 64\) and lora_B \(64, 4\)"),
        "empty": ({}, "holds no LoRA weights"),
    }
    for name, (weights, message) in cases.items():
        path = _copy(good_adapter, tmp_path / name)
        save_file(weights, str(path / "adapter_model.safetensors"))
        with pytest.raises(LoRAAdapterError, match=message):
            load(path, base)
    corrupt = _copy(good_adapter, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(LoRAAdapterError, match="not a valid safetensors file"):
        load(corrupt, base)
