"""PyTorch .bin checkpoints (pytorch_model.bin, or shards named by pytorch_model.bin.index.json, as
transformers wrote them before safetensors): with load_format 'auto' they load as vLLM loads them and
give transformers' own greedy tokens; a directory with safetensors reads those; load_format
'safetensors' refuses .bin files by name; a pickle torch.load(weights_only=True) refuses, or one that
holds more than named tensors, is an error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.model.arch_config import ModelLoadError
from agentserve.testing import tiny_model_cached
from helpers.logprobs_close import hf_greedy

NEW_TOKENS = 10
TEXT = "The quick brown fox jumps over the lazy dog"


def _bin_copy(tmp_path: Path, arch: str, shards: int = 1) -> Path:
    """The cached tiny model with its safetensors rewritten as pytorch_model.bin (or `shards` .bin shards
    and an index), plus a training_args.bin that is no part of the weights (as Trainer leaves it)."""
    path = Path(shutil.copytree(tiny_model_cached(arch), tmp_path / f"{arch}-bin{shards}"))
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    if shards == 1:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        names = sorted(tensors)
        weight_map = {}
        for i in range(shards):
            file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
            part = names[i::shards]
            torch.save({n: tensors[n] for n in part}, path / file)
            weight_map.update({n: file for n in part})
        (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "training_args.bin").write_bytes(b"not a state dict: Trainer pickles its arguments here")
    return path


def _ours(path: Path, prompt: list[int], **kw: object) -> list[int]:
    with LLM(str(path), device="cpu", dtype="float32", num_blocks=32, max_model_len=128, **kw) as llm:
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))
    return list(out[0].outputs[0].token_ids)


@pytest.mark.parametrize("arch,shards", [("llama", 1), ("qwen2", 3)])  # qwen2: tied embeddings
def test_bin_checkpoint_gives_transformers_greedy_tokens(tmp_path: Path, arch: str, shards: int) -> None:
    path = _bin_copy(tmp_path, arch, shards)
    prompt = AutoTokenizer.from_pretrained(path).encode(TEXT)
    reference = hf_greedy(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), prompt, NEW_TOKENS)[0]
    assert _ours(path, prompt) == reference
    assert _ours(tiny_model_cached(arch), prompt) == reference  # the same weights as safetensors


def test_safetensors_are_preferred_to_bin_files(tmp_path: Path) -> None:
    """vLLM reads a directory's safetensors when it has both: a stale .bin left beside them is not read."""
    path = Path(shutil.copytree(tiny_model_cached("llama"), tmp_path / "both"))
    (path / "pytorch_model.bin").write_bytes(b"stale")
    prompt = AutoTokenizer.from_pretrained(path).encode(TEXT)
    assert _ours(path, prompt) == _ours(tiny_model_cached("llama"), prompt)


def test_load_format_safetensors_refuses_bin_files(tmp_path: Path) -> None:
    path = _bin_copy(tmp_path, "llama")
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin.*load_format='safetensors' reads safetensors only"):
        LLM(str(path), device="cpu", max_model_len=128, load_format="safetensors")


class _NotATensor:
    pass


@pytest.mark.parametrize("content,message", [
    ({"model.norm.weight": torch.ones(64), "extra": _NotATensor()}, "weights_only=True"),
    ({"model.norm.weight": torch.ones(64), "step": 7}, "entries that are not tensors: step"),
    ([torch.ones(64)], "holds a list, not a state dict"),
])
def test_a_bin_file_that_is_not_a_state_dict_is_named(tmp_path: Path, content: object, message: str) -> None:
    path = _bin_copy(tmp_path, "llama")
    torch.save(content, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=rf"pytorch_model\.bin.*{message}"):
        LLM(str(path), device="cpu", max_model_len=128)


def test_a_truncated_bin_file_is_named(tmp_path: Path) -> None:
    path = _bin_copy(tmp_path, "llama")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin could not be read"):
        LLM(str(path), device="cpu", max_model_len=128)


def test_a_missing_bin_shard_is_named(tmp_path: Path) -> None:
    path = _bin_copy(tmp_path, "qwen2", shards=2)
    (path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin\.index\.json are missing.*00002-of-00002"):
        LLM(str(path), device="cpu", max_model_len=128)
