"""GGUF checkpoints: the model shape from the metadata, tensors dequantized and renamed at load.

- Tiny llama / qwen2 / qwen3 models written to GGUF here the way llama.cpp's converter writes them
  (its tensor names; q/k rows of llama permuted for its rotary layout; fp32 tensors, so nothing is
  lost) give exactly the tokens the same weights give from the Hugging Face directory.
- The real SmolLM2-135M GGUF (Q4_1 / Q8_0 tensors): greedy replies identical to transformers
  loading the same file, with its own tokenizer and chat template; also served with FP8 weights.
- A GGUF architecture or tensor type that is not supported is a clear error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.testing import tiny_model_cached
from helpers.gguf_checkpoints import write_gguf

gguf = pytest.importorskip("gguf")

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=1)
PROMPTS = ["The quick brown fox", "In a distant galaxy, a small robot named"]
def _outputs(llm: LLM, prompts: list[Any]) -> tuple[list[list[int]], list[list[float]]]:
    outs = llm.generate(prompts, GREEDY)
    tokens = [o.outputs[0].token_ids for o in outs]
    return tokens, [[p[t].logprob for p, t in zip(o.outputs[0].logprobs or [], o.outputs[0].token_ids)] for o in outs]


@pytest.mark.parametrize("tiny_arch,gguf_arch", [("llama", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3")])
def test_tiny_gguf_matches_the_safetensors_model(tiny_arch: str, gguf_arch: str, tmp_path: Path) -> None:
    src = tiny_model_cached(tiny_arch)
    file = write_gguf(src, tmp_path / "model.gguf", gguf_arch)
    # The tokenizer from the Hugging Face directory: these files carry no tokenizer metadata.
    with LLM(str(file), tokenizer=str(src), num_blocks=64) as from_gguf, LLM(str(src), num_blocks=64) as ref:
        assert from_gguf.engine.arch.architecture == ref.engine.arch.architecture
        assert from_gguf.engine.arch.attention_bias == ref.engine.arch.attention_bias
        assert _outputs(from_gguf, PROMPTS) == _outputs(ref, PROMPTS)
    # A directory holding the file (and no config.json) loads the same way.
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.move(str(file), folder / "m.gguf")
    with LLM(str(folder), tokenizer=str(src), num_blocks=64) as from_dir:
        assert from_dir.engine.arch.num_layers == ArchConfig.from_dir(src).num_layers


@pytest.mark.parametrize("rope_scaling", [
    None,  # llama3 from the tiny llama3 model's own config: a rope_freqs tensor
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "linear", "factor": 2.0},
])
def test_gguf_rope_scaling_matches_the_safetensors_model(rope_scaling: Any, tmp_path: Path) -> None:
    """Llama 3.x GGUFs carry rope_freqs (their llama3 scaling), Qwen long-context ones yarn metadata:
    either way the tokens are those of the Hugging Face directory with the same scaling, and the
    logprobs equal up to the divisors' rounding."""
    src = tiny_model_cached("llama3")
    if rope_scaling is not None:
        src = shutil.copytree(src, tmp_path / "scaled")
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(cfg, rope_scaling=rope_scaling)))
    file = write_gguf(src, tmp_path / "model.gguf", "llama")
    with LLM(str(file), tokenizer=str(src), num_blocks=64) as from_gguf, LLM(str(src), num_blocks=64) as ref:
        expected = ArchConfig.from_dir(src).rope_scaling
        assert expected is not None
        assert from_gguf.engine.arch.rope_scaling["rope_type"] == (
            "frequency_factors" if expected["rope_type"] == "llama3" else expected["rope_type"])
        prompts = [PROMPTS[1] + " " + PROMPTS[0] * 8]  # past the original context of the yarn case
        got_tokens, got_lps = _outputs(from_gguf, prompts)
        ref_tokens, ref_lps = _outputs(ref, prompts)
    assert got_tokens == ref_tokens
    assert np.allclose(got_lps, ref_lps, atol=1e-4)
    # The same weights without the scaling give other logprobs: the check above could not pass by
    # ignoring the scaling on both sides.
    plain = shutil.copytree(src, tmp_path / "plain")
    (plain / "config.json").write_text(json.dumps(dict(json.loads((src / "config.json").read_text()),
                                                       rope_scaling=None)))
    with LLM(str(write_gguf(plain, tmp_path / "plain.gguf", "llama")), tokenizer=str(src), num_blocks=64) as unscaled:
        assert not np.allclose(_outputs(unscaled, prompts)[1], ref_lps, atol=1e-3)


def test_unsupported_gguf_architecture_is_named(tmp_path: Path) -> None:
    file = write_gguf(tiny_model_cached("llama"), tmp_path / "m.gguf", "gpt2")
    with pytest.raises(ModelLoadError, match="unsupported GGUF architecture 'gpt2'"):
        LLM(str(file), tokenizer=str(tiny_model_cached("llama")), num_blocks=16)


def test_mixture_of_experts_written_as_llama_is_named(tmp_path: Path) -> None:
    """llama.cpp writes Mixtral as `llama` with `llama.expert_count` (and ffn_*_exps tensors): an
    architecture agentserve lacks, refused naming it (it was "checkpoint lacks tensors for
    [...mlp.gate_up_proj.weight ...]" after building the model)."""
    src = tiny_model_cached("llama")
    file = write_gguf(src, tmp_path / "m.gguf", "llama", extra_keys={"expert_count": 8, "expert_used_count": 2})
    with pytest.raises(ModelLoadError, match="mixture-of-experts GGUF .*8 experts.* not supported"):
        LLM(str(file), tokenizer=str(src), num_blocks=16)


def test_unsupported_gguf_tensor_type_is_named(tmp_path: Path) -> None:
    """An integer tensor where a weight belongs: the gguf library cannot dequantize I32."""
    src = tiny_model_cached("llama")
    tensors = load_file(str(src / "model.safetensors"))
    shape = tuple(tensors["model.layers.1.mlp.up_proj.weight"].shape)
    file = tmp_path / "m.gguf"
    write_gguf(src, file, "llama")
    # Rewrite with the up projection of layer 1 as an I32 tensor.
    broken = tmp_path / "broken.gguf"
    reader = gguf.GGUFReader(str(file))
    writer = gguf.GGUFWriter(str(broken), "llama")
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            writer.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight":
            writer.add_tensor(t.name, np.zeros(shape, dtype=np.int32))
        else:
            writer.add_tensor(t.name, np.array(t.data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="blk.1.ffn_up.weight .* has type I32"):
        LLM(str(broken), tokenizer=str(src), num_blocks=16)


def test_gguf_next_to_a_config_json_says_to_pass_the_file(tmp_path: Path) -> None:
    """A directory with a config.json is read as a Hugging Face checkpoint; holding a .gguf file and no
    safetensors, the error names the file to pass (it said only safetensors checkpoints are supported)."""
    src = tiny_model_cached("llama")
    write_gguf(src, tmp_path / "m.gguf", "llama")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelLoadError, match=r"has no \*.safetensors weights but holds m.gguf: pass the .gguf file"):
        LLM(str(tmp_path), tokenizer=str(src), num_blocks=16)


def test_directory_with_several_gguf_files_is_refused(tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        write_gguf(tiny_model_cached("llama"), tmp_path / name, "llama")
    with pytest.raises(ModelLoadError, match="several GGUF files"):
        LLM(str(tmp_path), num_blocks=16)


# --- the real SmolLM2-135M GGUF ---------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three colors."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
]


@pytest.mark.real_model
def test_smollm2_gguf_greedy_matches_transformers(smollm2_gguf: Path, smollm2_gguf_as_transformers_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    new_tokens = 16
    with LLM(str(smollm2_gguf), max_model_len=1024) as llm:
        tok = llm.tokenizer
        assert tok.chat_template and "<|im_start|>" in tok.chat_template  # from the GGUF metadata
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
                   for c in CHATS]
        outs = llm.generate([list(p) for p in prompts], SamplingParams(max_tokens=new_tokens, temperature=0.0))
        got = [o.outputs[0].token_ids for o in outs]
        # <|im_end|> (the file's eos) and <|endoftext|> (a control token llama.cpp also ends generation at)
        assert llm.engine.eos_token_ids == frozenset({2, 0})
    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf_as_transformers_dir, dtype=torch.float32).eval()
    for ids, tokens in zip(prompts, got):
        with torch.no_grad():
            ref = model.generate(torch.tensor([list(ids)]), max_new_tokens=new_tokens, do_sample=False)
        assert tokens == ref[0, len(ids):].tolist()[:len(tokens)]
        assert len(tokens) == new_tokens or tokens[-1] in (0, 2)  # stopped only at an end of generation


@pytest.mark.real_model
def test_smollm2_gguf_serves_with_fp8_weights(smollm2_gguf: Path) -> None:
    with LLM(str(smollm2_gguf), max_model_len=1024, quantization="fp8") as llm:
        qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.float8_e4m3fn
        out = llm.chat(CHATS[0], SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0].text
        assert "Paris" in out
