"""PEFT LoRA adapters as they come in the wild, served through agentserve.LLM against PEFT itself on
the same tiny weights (each adapter merged into the base with merge_and_unload, fp32, greedy): every
way of naming target modules (all-linear, a regex, full module paths, a subset, a list written for
several architectures), rank_pattern / alpha_pattern keyed by module and by layer, rsLoRA,
layers_to_transform with and without layers_pattern, exclude_modules, initialisations that leave plain LoRA, .bin
weights, a named adapter's subdirectory, adapter-name segments in weight keys, configs from other
PEFT versions or tools (extra keys, no task_type, base_model_name_or_path elsewhere, fan_in_fan_out),
ranks 1 to 64 — all in one mixed batch with the base model, on the five tiny archs (GQA, qwen2's qkv
bias, qwen3's q/k norm, tied embeddings). Then every adapter that is not plain LoRA over this base is
refused with an error naming why (DoRA, LoRA bias, trained biases, embeddings / lm_head,
modules_to_save, base-rewriting initialisations like PiSSA, other variants, a rank above
max_lora_rank, weights that disagree with target_modules), while the PiSSA adapter PEFT converts to plain LoRA is served exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from peft.tuners.lora.config import VeloraConfig
from safetensors.torch import load_file, save_file

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.lora.adapter import LoRAAdapterError, load_lora_adapter
from agentserve.model.arch_config import ArchConfig
from agentserve.testing import tiny_model_cached
from agentserve.testing.tiny import ARCHS
from helpers.lora import peft_greedy, save_peft_variant

NEW_TOKENS = 4
TEXT = "The quick brown fox jumps over"
MULTI_ARCH_TARGETS = ["q_proj", "v_proj", "c_attn", "W_pack", "query_key_value", "dense_h_to_4h"]

# name -> save_peft_variant keywords. Every one is plain LoRA to PEFT, so it must be served exactly.
VARIANTS: dict[str, dict[str, Any]] = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "regex": dict(r=4, target_modules=r".*\.(q|v)_proj"),
    "regex-layer": dict(r=4, target_modules=r"model\.layers\.1\..*(down|o)_proj"),
    "full-paths": dict(r=4, target_modules=["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]),
    "v-down": dict(r=4, lora_alpha=16, target_modules=["v_proj", "down_proj"]),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                     rank_pattern={"model.layers.0.self_attn.q_proj": 2, r"^model\.layers\.1\..*v_proj": 8,
                                   "up_proj": 1},
                     alpha_pattern={"k_proj": 3, "model.layers.1.mlp.up_proj": 20}),
    "rslora": dict(r=16, lora_alpha=7, use_rslora=True, target_modules=["q_proj", "gate_proj"]),
    "layers": dict(r=4, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]),
    "layers-pattern": dict(r=4, target_modules=["k_proj", "up_proj"], layers_to_transform=0,
                           layers_pattern="layers"),
    "gaussian": dict(r=4, target_modules=["q_proj", "o_proj"], init_lora_weights="gaussian"),
    "orthogonal": dict(r=4, target_modules=["gate_proj"], init_lora_weights="orthogonal"),
    "bin": dict(r=4, target_modules=["up_proj", "v_proj"], safe=False),
    "named": dict(r=4, target_modules=["o_proj"], adapter_name="my-skill"),
    "dropout": dict(r=4, target_modules=["q_proj", "up_proj"], lora_dropout=0.3, task_type="CAUSAL_LM"),
    "no-task-type": dict(r=4, target_modules=["k_proj", "down_proj"], config_edit={"task_type": None}),
    "newer-peft": dict(r=4, target_modules=["q_proj"], config_edit={
        "base_model_name_or_path": "someone/another-model", "a_future_flag": True, "future_config": {"x": 1},
        "use_dora": False, "exclude_modules": None, "revision": "main"}),
    "fan-in-fan-out": dict(r=4, target_modules=["v_proj", "o_proj"], config_edit={"fan_in_fan_out": True}),
    "multi-arch": dict(r=4, target_modules=["q_proj", "v_proj"], config_edit={"target_modules": MULTI_ARCH_TARGETS}),
    # VeLoRA compresses activations in training only; it saves lora_velora_embed tensors besides A / B.
    "velora": dict(r=4, target_modules=["q_proj", "down_proj"], velora_config=VeloraConfig()),
    "exclude": dict(r=4, target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    "exclude-regex": dict(r=4, target_modules=["q_proj", "up_proj"], exclude_modules=r".*layers\.0\..*"),
    # a full module path is taken as it is; layers_to_transform limits only the names matched as suffixes
    "full-path-and-layers": dict(r=4, target_modules=["model.layers.0.self_attn.q_proj", "v_proj"],
                                 layers_to_transform=[1]),
    # o_proj targeted but not saved: PEFT initialises it afresh with lora_B = 0, so it adds nothing there either
    "targets-without-weights": dict(r=4, target_modules=["q_proj", "v_proj"],
                                    config_edit={"target_modules": ["q_proj", "v_proj", "o_proj"],
                                                 "init_lora_weights": True}),
    "r1": dict(r=1, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    "r64": dict(r=64, lora_alpha=16, target_modules="all-linear"),
}


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def make_llm(base: Path, **kw: Any) -> LLM:
    opts: dict[str, Any] = dict(device="cpu", dtype="float32", max_model_len=128, num_blocks=128,
                                enable_lora=True, max_lora_rank=64, max_loras=4)
    opts.update(kw)
    return LLM(str(base), **opts)


def build_variant(base: Path, root: Path, name: str, seed: int) -> Path:
    kw = dict(VARIANTS[name])
    return save_peft_variant(base, root / name, seed=seed, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_variants_in_one_mixed_batch_match_peft_merged(arch: str, tmp_path: Path) -> None:
    """Base + every variant in one generate, 4 slots for 25 adapters (slots are reused mid-batch)."""
    base = tiny_model_cached(arch)
    dirs = {name: build_variant(base, tmp_path, name, seed) for seed, name in enumerate(VARIANTS)}
    saved = json.loads((dirs["all-linear"] / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(saved, list) and "all-linear" not in saved  # PEFT resolved it at creation
    assert (dirs["bin"] / "adapter_model.bin").is_file() and dirs["named"].name == "my-skill"
    llm = make_llm(base, lora_modules={name: str(path) for name, path in dirs.items()})
    prompt = llm.tokenizer.encode(TEXT)
    names: list[Optional[str]] = [None, *VARIANTS]
    outs = llm.generate([prompt] * len(names), greedy(), adapter=names)
    base_ref = peft_greedy(base, None, [prompt], NEW_TOKENS)[0]
    assert list(outs[0].outputs[0].token_ids) == base_ref
    for name, out in zip(VARIANTS, outs[1:]):
        ref = peft_greedy(base, dirs[name], [prompt], NEW_TOKENS)[0]
        assert list(out.outputs[0].token_ids) == ref, name
        assert ref != base_ref, f"{name} does not change greedy tokens: the comparison would prove nothing"
    manager = llm.engine.lora_manager
    assert manager is not None and manager.num_slot_loads >= len(VARIANTS)  # every adapter went through a slot
    llm.close()


@pytest.fixture(scope="module")
def qwen2_llm() -> Any:
    """One LLM (qwen2: qkv biases, tied embeddings) that every refusal below is tried on."""
    llm = make_llm(tiny_model_cached("qwen2"), max_lora_rank=16)
    yield llm
    llm.close()


# name -> (save_peft_variant keywords, the refusal's message). Each is a real PEFT save unless the
# variant cannot be built on these tiny models (then its config field is written in, as a tool would).
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "dora": (dict(use_dora=True), r"DoRA \(use_dora\) is not supported"),
    "lora-bias": (dict(lora_bias=True), r"a LoRA bias \(lora_bias\) is not supported"),
    "modules-to-save": (dict(modules_to_save=["lm_head"]), r"modules_to_save .* is not supported"),
    "embed-lora": (dict(target_modules=["q_proj", "embed_tokens"]), r"target module 'embed_tokens' \(embeddings\)"),
    "lm-head-lora": (dict(target_modules=["q_proj", "lm_head"]), r"target module 'lm_head' \(lm_head\)"),
    "saved-embeddings": (dict(save_kwargs={"save_embedding_layers": True}),
                         r"a full copy of (lm_head|embed_tokens) \(saved by save_embedding_layers"),
    "bias-all": (dict(bias="all"), r"a trained base-layer bias \(bias='all' or 'lora_only'\) .*k_proj\.bias"),
    "bias-lora-only": (dict(bias="lora_only"), r"a trained base-layer bias .*q_proj\.base_layer\.bias"),
    "pissa": (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' rewrites the base model's weights"),
    "pissa-niter": (dict(init_lora_weights="pissa_niter_2"), r"init_lora_weights='pissa_niter_2' rewrites"),
    "olora": (dict(init_lora_weights="olora"), r"init_lora_weights='olora' rewrites the base model's weights"),
    "corda": (dict(config_edit={"init_lora_weights": "corda"}), r"init_lora_weights='corda' rewrites"),
    "loftq": (dict(config_edit={"init_lora_weights": "loftq"}), r"init_lora_weights='loftq' rewrites"),
    "bdlora": (dict(config_edit={"use_bdlora": {"nblocks": 2, "target_modules_bd_a": ["q_proj"]}}),
               r"block-diagonal LoRA \(use_bdlora\)"),
    "kasa": (dict(config_edit={"kasa_config": {"beta": 1e-4, "gamma": 1e-3}}), r"KaSA \(kasa_config"),
    "arrow": (dict(config_edit={"arrow_config": {"top_k": 3}}), r"Arrow routing .*\(arrow_config\)"),
    "monteclora": (dict(config_edit={"monteclora_config": {"num_samples": 8}}), r"MonteCLoRA"),
    "ia3": (dict(config_edit={"peft_type": "IA3"}), r"peft_type 'IA3' is not supported"),
    "rank-above-max": (dict(r=32), r"layer 0 q_proj has rank 32, above max_lora_rank 16"),
    "alpha-not-a-number": (dict(config_edit={"lora_alpha": "sixteen"}), r"lora_alpha must be a number"),
    "rslora-as-string": (dict(config_edit={"use_rslora": "false"}), r"use_rslora must be true or false, not 'false'"),
    "bad-pattern": (dict(config_edit={"rank_pattern": {"q_proj(": 4}}), r"'q_proj\(' .* is not a valid regex"),
    # target_modules and the weights disagree: PEFT builds from the config (drops untargeted tensors, initialises
    # targeted modules without tensors afresh), so serving the weights would not give PEFT's outputs.
    "weights-beyond-targets": (dict(target_modules=["q_proj", "k_proj", "v_proj"],
                                    config_edit={"target_modules": ["q_proj", "v_proj"]}),
                               r"has LoRA weights for model\.layers\.0\.self_attn\.k_proj, "
                               r"model\.layers\.1\.self_attn\.k_proj, which target_modules \['q_proj', 'v_proj'\]"),
    "targets-without-weights-random-init": (dict(config_edit={"target_modules": ["q_proj", "v_proj", "o_proj"],
                                                               "init_lora_weights": False}),
                                r"target_modules \['o_proj', 'q_proj', 'v_proj'\] covers model\.layers\.0\.self_attn"
                                r"\.o_proj, model\.layers\.1\.self_attn\.o_proj, but adapter_model\.safetensors has no .*init_lora_weights=false"),
    "excluded-but-saved": (dict(config_edit={"exclude_modules": ["v_proj"]}),
                           r"has LoRA weights for model\.layers\.0\.self_attn\.v_proj"),
    "layers-but-saved": (dict(config_edit={"layers_to_transform": [0]}),
                         r"has LoRA weights for model\.layers\.1\.self_attn\.q_proj"),
    "targets-not-names": (dict(config_edit={"target_modules": 5}), r"target_modules must be a module name regex"),
    "bad-target-regex": (dict(config_edit={"target_modules": "q_proj("}), r"target_modules .* is not a valid regex"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unservable_adapters_are_refused_by_name(case: str, qwen2_llm: LLM, tmp_path: Path) -> None:
    kw, message = REFUSED[case]
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], **kw}
    path = save_peft_variant(tiny_model_cached("qwen2"), tmp_path / case, seed=3, **kw)
    with pytest.raises(LoRAAdapterError, match=message):
        qwen2_llm.load_adapter(case, str(path))
    assert case not in qwen2_llm.list_adapters()


def test_bin_weights_that_are_not_tensors(qwen2_llm: LLM, tmp_path: Path) -> None:
    path = save_peft_variant(tiny_model_cached("qwen2"), tmp_path / "a", r=4, target_modules=["q_proj"], safe=False)
    state = torch.load(path / "adapter_model.bin", weights_only=True)
    torch.save({**state, "base_model.model.step": 7}, path / "adapter_model.bin")
    with pytest.raises(LoRAAdapterError, match="holds entries that are not tensors: base_model.model.step"):
        qwen2_llm.load_adapter("a", str(path))


def test_pissa_converted_to_plain_lora_is_served_exactly(tmp_path: Path) -> None:
    """PEFT's way out for PiSSA: save_pretrained(path_initial_model_for_weight_conversion=...) turns the
    trained PiSSA adapter into a plain LoRA of twice the rank over the original base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model_cached("llama3")
    torch.manual_seed(5)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa"))
    peft_model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # "training"
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.add_(0.3 * torch.randn_like(param))
    peft_model.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    cfg = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    llm = make_llm(base, lora_modules={"converted": str(tmp_path / "converted")})
    prompt = llm.tokenizer.encode(TEXT)
    out = llm.generate([prompt, prompt], greedy(), adapter=["converted", None])
    ref = peft_greedy(base, tmp_path / "converted", [prompt], NEW_TOKENS)[0]
    assert list(out[0].outputs[0].token_ids) == ref != list(out[1].outputs[0].token_ids)
    llm.close()


def _rewrite_keys(src: Path, dst: Path, rename: dict[str, str]) -> Path:
    shutil.copytree(src, dst)
    state = load_file(str(src / "adapter_model.safetensors"))
    for old, new in rename.items():
        state = {k.replace(old, new): v for k, v in state.items()}
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_weight_key_forms(tmp_path: Path) -> None:
    """Unsaved state dicts name the adapter in each key (lora_A.default.weight, lora_A.<name>.weight);
    transformers' own adapter saving (model.add_adapter + save_pretrained) drops the base_model.model.
    prefix. The same tensors as PEFT's saved keys, so the same tokens as PEFT gives for that adapter."""
    base = tiny_model_cached("mistral")
    plain = save_peft_variant(base, tmp_path / "plain", seed=4, r=4, target_modules=["q_proj", "up_proj"])
    dirs = {"plain": plain,
            "default": _rewrite_keys(plain, tmp_path / "default", {".weight": ".default.weight"}),
            "custom": _rewrite_keys(plain, tmp_path / "custom", {".weight": ".my-skill.weight"}),
            "no-prefix": _rewrite_keys(plain, tmp_path / "no-prefix", {"base_model.model.": ""})}
    llm = make_llm(base, lora_modules={n: str(p) for n, p in dirs.items()})
    prompt = llm.tokenizer.encode(TEXT)
    outs = llm.generate([prompt] * len(dirs), greedy(), adapter=list(dirs))
    ref = peft_greedy(base, plain, [prompt], NEW_TOKENS)[0]
    assert [list(o.outputs[0].token_ids) for o in outs] == [ref] * len(dirs)
    assert ref == peft_greedy(base, dirs["default"], [prompt], NEW_TOKENS)[0]  # PEFT reads ".default." too
    both = _rewrite_keys(plain, tmp_path / "both", {})
    state = load_file(str(both / "adapter_model.safetensors"))
    state.update({k.replace(".weight", ".default.weight"): v.clone() for k, v in state.items()})
    save_file(state, str(both / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match=r"layer \d (q|up)_proj has more than one lora_(A|B) weight"):
        llm.load_adapter("both", str(both))
    llm.close()


def test_patterns_give_peft_ranks_and_scalings(tmp_path: Path) -> None:
    """rank_pattern / alpha_pattern keys by module name, by layer path, anchored regex, and keys
    that match nothing: each module's rank and scaling as PEFT's own layers have them."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_cached("qwen3")
    rank_pattern = {r"^model\.layers\.0\.self_attn\.(q|k)_proj": 2, "model.layers.1.mlp.down_proj": 6,
                    "v_proj": 3, "no_such_module": 9}
    alpha_pattern = {"layers.1.self_attn.q_proj": 11, r"mlp\.(gate|up)_proj": 2.5}
    path = save_peft_variant(base, tmp_path / "a", seed=6, r=4, lora_alpha=8, target_modules="all-linear",
                             rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    adapter = load_lora_adapter(path, ArchConfig.from_dir(base), max_lora_rank=16, adapter_id=1)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), path)
    checked = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        layer, leaf = int(module_name.split(".")[2]), module_name.rsplit(".", 1)[-1]
        ours = adapter.module(layer, leaf)
        assert ours is not None, module_name
        assert ours.rank == module.r["default"], module_name
        assert ours.scaling == pytest.approx(module.scaling["default"]), module_name
        checked += 1
    assert checked == 14
    q0, down1 = adapter.module(0, "q_proj"), adapter.module(1, "down_proj")
    assert q0 is not None and down1 is not None and (q0.rank, down1.rank) == (2, 6)
