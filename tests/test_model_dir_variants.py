"""Model directories as users bring them, beyond what transformers' own save_pretrained writes: a
config.json without `architectures` (transformers then goes by model_type), keys left out that
transformers fills with its per-family defaults, and checkpoints lacking a tensor (the error names
the checkpoint's tensor, not the engine's fused parameter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.testing import tiny_model_cached

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = ["The quick brown fox", "def fibonacci(n):"]


def _copy_with_config(tmp_path: Path, arch: str, edit: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    path = tmp_path / f"{arch}-edited"
    shutil.copytree(tiny_model_cached(arch), path)
    cfg = json.loads((path / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(dict(cfg, **edit)))
    return path


def _tokens(path: Path) -> list[list[int]]:
    with LLM(str(path), device="cpu", dtype="float32", num_blocks=32) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_config_without_architectures_goes_by_model_type(tmp_path: Path) -> None:
    """transformers' AutoModelForCausalLM maps model_type to the class when config.json names no
    architectures (a config written with Config(...).save_pretrained has none)."""
    path = _copy_with_config(tmp_path, "qwen2", {}, drop=("architectures",))
    assert ArchConfig.from_dir(path).architecture == "Qwen2ForCausalLM"
    assert _tokens(path) == _tokens(tiny_model_cached("qwen2"))


def test_unsupported_model_type_without_architectures_is_named() -> None:
    with pytest.raises(ModelLoadError, match="unsupported architecture 'gemma'"):
        ArchConfig.from_dict({"model_type": "gemma", "hidden_size": 64, "num_attention_heads": 4,
                              "vocab_size": 128, "intermediate_size": 128, "num_hidden_layers": 2})


@pytest.mark.parametrize("dropped", ["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                                     "model.layers.1.input_layernorm.weight", "lm_head.weight"])
def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(tmp_path: Path, dropped: str) -> None:
    """The error names the tensor the user can look for in the checkpoint (model.layers.1.mlp.up_proj.weight),
    not the engine's fused parameter (layers.1.mlp.gate_up_proj.weight) nor the shard that is present."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "lacking"
    shutil.copytree(tiny_model_cached("llama"), path)  # untied: the checkpoint has its own lm_head
    tensors = load_file(str(path / "model.safetensors"))
    del tensors[dropped]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="checkpoint lacks tensors") as err:
        LLM(str(path), device="cpu", dtype="float32", num_blocks=16)
    assert f"['{dropped}']" in str(err.value)


MINIMAL = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
           "intermediate_size": 128, "num_hidden_layers": 2}


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_keys_left_out_take_transformers_family_defaults(model_type: str) -> None:
    """head_dim (Qwen3: 128, not hidden / heads) and Mistral's sliding_window (4096) as transformers'
    config classes fill them in when config.json leaves them out."""
    from transformers import AutoConfig

    ours = ArchConfig.from_dict(dict(MINIMAL, model_type=model_type))
    ref = AutoConfig.for_model(model_type, **MINIMAL).to_dict()
    # The attention modules read a config without head_dim (Llama's, Qwen2's) as hidden / heads; a
    # config class without sliding_window (Llama's) has no window.
    assert ours.head_dim == (ref.get("head_dim") or MINIMAL["hidden_size"] // MINIMAL["num_attention_heads"])
    assert ours.sliding_window == ref.get("sliding_window")
    assert (ours.head_dim, ours.sliding_window) == {"qwen3": (128, None), "mistral": (16, 4096)}.get(model_type, (16, None))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_kv_heads_and_context_left_out_take_transformers_family_defaults(model_type: str) -> None:
    """num_key_value_heads (Mistral 8, Qwen 32) and max_position_embeddings (Llama 2048, Mistral 131072,
    Qwen 32768) as transformers' config classes fill them in: a Mistral-7B-shaped config without
    num_key_value_heads has 8, not one per query head."""
    from transformers import AutoConfig

    shape = dict(MINIMAL, hidden_size=256, num_attention_heads=32)
    del shape["num_key_value_heads"]
    ours = ArchConfig.from_dict(dict(shape, model_type=model_type))
    ref = AutoConfig.for_model(model_type, **shape)
    assert (ours.num_kv_heads, ours.max_position_embeddings) == (ref.num_key_value_heads, ref.max_position_embeddings)
    assert (ours.num_kv_heads, ours.max_position_embeddings) == {
        "llama": (32, 2048), "mistral": (8, 131072)}.get(model_type, (32, 32768))


@pytest.mark.parametrize("model_type,edit", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 2}),  # no layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 1}),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32}),  # max_window_layers 28 covers both layers
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32, "layer_types": ["full_attention", "sliding_attention"]}),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 32, "max_window_layers": 0}),
    ("mistral", {"sliding_window": 32}),
    ("mistral", {"sliding_window": None}),
    ("llama", {"sliding_window": 32, "use_sliding_window": True}),  # LlamaConfig has no window
])
def test_a_window_caps_the_context_only_where_transformers_slides_a_layer(model_type: str, edit: dict[str, Any]) -> None:
    from transformers import AutoConfig

    ours = ArchConfig.from_dict(dict(MINIMAL, model_type=model_type, **edit))
    ref = AutoConfig.for_model(model_type, **MINIMAL, **edit)
    # Qwen's configs list their layers' kinds; Mistral's attention slides wherever sliding_window is set;
    # Llama's attention never reads a window (an extra key in its config.json is kept but unused).
    layer_types = getattr(ref, "layer_types", None) or (
        ["sliding_attention"] * ref.num_hidden_layers if model_type == "mistral" and ref.sliding_window else [])
    assert (ours.sliding_window is not None) == ("sliding_attention" in layer_types), edit
    if ours.sliding_window is not None:
        assert ours.sliding_window == ref.sliding_window == 32


@pytest.mark.parametrize("rope", [
    {"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_theta": 5e5, "rope_parameters": {"rope_type": "default"}},
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
])
def test_rope_theta_and_scaling_read_with_transformers_precedence(rope: dict[str, Any]) -> None:
    """A config carrying both spellings: rope_scaling is taken over rope_parameters, and the chosen dict's
    rope_theta over the top-level one (which fills it only where it has none), as transformers 5 reads it."""
    from transformers import AutoConfig

    ours = ArchConfig.from_dict(dict(MINIMAL, model_type="llama", **json.loads(json.dumps(rope))))
    ref = AutoConfig.for_model("llama", **MINIMAL, **json.loads(json.dumps(rope))).rope_parameters
    assert ours.rope_theta == ref["rope_theta"]
    assert (ours.rope_scaling or {}).get("rope_type", "default") == ref["rope_type"]


def test_tied_checkpoint_holding_only_lm_head_loads_it_as_the_embedding(tmp_path: Path) -> None:
    """safetensors' save_model keeps one name of a shared tensor, lm_head.weight for a tied Hugging Face model;
    transformers ties it back to the embedding, and so does the loader here (the same tokens)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "lm-head-only"
    shutil.copytree(tiny_model_cached("qwen2"), path)  # tied: the checkpoint holds only the embedding
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, str(path / "model.safetensors"))
    assert _tokens(path) == _tokens(tiny_model_cached("qwen2"))


def test_qwen3_without_head_dim_matches_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.logprobs_close import hf_greedy

    src = tiny_model_cached("qwen3", head_dim=128)
    path = tmp_path / "qwen3-no-head-dim"
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["head_dim"]
    (path / "config.json").write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()
    prompts = [AutoTokenizer.from_pretrained(path).encode(p) for p in PROMPTS]
    assert _tokens(path) == [hf_greedy(model, p, 8)[0] for p in prompts]


def test_a_sliding_window_limit_names_the_window(tmp_path: Path) -> None:
    """Attention here is full, so a model with a sliding window serves at most the window; asking for
    more names sliding_window, not max_position_embeddings (which is larger: "its context length" misled)."""
    path = _copy_with_config(tmp_path, "mistral", {"sliding_window": 32, "max_position_embeddings": 256})
    with pytest.raises(ModelLoadError, match=r"max_model_len=64 \(--max-model-len\) exceeds the model's limit of 32 "
                                             r"positions \(its sliding_window"):
        LLM(str(path), device="cpu", dtype="float32", num_blocks=16, max_model_len=64)


def _mistral_consolidated(weights: dict[str, Any]) -> dict[str, Any]:
    """The tensors in Mistral's own names, as mistralai's consolidated.safetensors holds them."""
    renames = {"model.embed_tokens.": "tok_embeddings.", "model.norm.": "norm.", "lm_head.": "output.",
               "model.layers.": "layers.", "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
               "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1",
               "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
               "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm"}
    out = {}
    for name, tensor in weights.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        out[name] = tensor.clone()
    return out


def test_mistral_consolidated_copy_beside_the_hf_files_is_not_read(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """mistralai's repositories hold the Hugging Face shards and consolidated.safetensors (the same weights in
    Mistral's names) side by side; the engine reads the Hugging Face files only, as vLLM's "hf" format does, and
    a directory whose only weights are the consolidated file is an error that names its layout."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "mistral-both"
    shutil.copytree(tiny_model_cached("mistral"), path)
    hf_files = sorted(path.glob("*.safetensors"))
    weights: dict[str, Any] = {}
    for f in hf_files:
        weights.update(load_file(str(f)))
    save_file(_mistral_consolidated(weights), str(path / "consolidated.safetensors"))
    with caplog.at_level("WARNING", logger="agentserve"):
        assert _tokens(path) == _tokens(tiny_model_cached("mistral"))
    assert "consolidated" not in caplog.text  # not read at all (it was: a warning per ignored tensor)
    for f in hf_files:
        f.unlink()
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ModelLoadError, match="consolidated.safetensors, Mistral's own checkpoint layout"):
        _tokens(path)
