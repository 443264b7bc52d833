"""GGUF checkpoints (llama.cpp's format): the model shape from the file's metadata, and its tensors
dequantized to fp32 at load under their Hugging Face names (the loader then casts them to the
serving dtype, or quantizes them to FP8 with quantization="fp8"). The types GGUF repositories publish
are unpacked by torch on the model's device, from the file's raw blocks (model/gguf_dequant.py).

`--model path/to/model.gguf`, or a directory that holds exactly one .gguf file and no config.json.
A model split by llama.cpp's gguf-split (`<name>-00001-of-0000N.gguf` ...) is served from its first
shard, or from a directory that holds its shards and nothing else: the metadata is in the first
shard, the tensors are spread over all of them. A directory holding several models (say one file per
quantization type, as GGUF repositories publish them) is an error listing them.
The tokenizer and chat template come from the same metadata through transformers (engine/loading.py).
Supported architectures: llama (also Mistral GGUFs, which llama.cpp writes as llama; not Mixtral, which
it writes as llama with experts), qwen2, qwen3;
tensor types: whatever the gguf library dequantizes (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants,
the IQ types); anything else is a ModelLoadError naming the architecture or tensor type.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from agentserve.model.arch_config import ModelLoadError
from agentserve.model.gguf_files import SHARD_NAME
from agentserve.model.gguf_reader import GGUFFile, GGUFTensor

logger = logging.getLogger(__name__)

# GGUF general.architecture -> the Hugging Face class our ArchConfig knows.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# llama.cpp tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}


class _SharedReaders(threading.local):
    """This thread's parsed files while a `shared_gguf_readers` block is open (None outside one)."""

    readers: Optional[dict[Path, GGUFFile]] = None


_shared = _SharedReaders()


@contextlib.contextmanager
def shared_gguf_readers() -> Iterator[None]:
    """Inside the block each GGUF file is parsed once: one model load reads the file three times (its
    shape, whether it has a tokenizer, its weights). The parsed files are dropped when the load ends
    (their tensors are views of the memory-mapped file, which stays mapped while a view lives)."""
    if _shared.readers is not None:  # already inside a block on this thread: the outer one owns the readers
        yield
        return
    _shared.readers = {}
    try:
        yield
    finally:
        _shared.readers = None


def _reader(file: Path) -> GGUFFile:
    cache = _shared.readers
    key = file.resolve()
    if cache is not None and key in cache:
        return cache[key]
    try:
        reader = GGUFFile(file)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"cannot read GGUF file {file}: {e}") from None
    if cache is not None:
        cache[key] = reader
    return reader


def _readers(file: Path) -> list[tuple[Path, GGUFFile]]:
    """(file, reader) of every shard of the model `file` starts (just `file` unless it is split); the
    first holds the metadata."""
    first = _reader(file)
    count = int(first.value("split.count", 1))
    if count <= 1:
        return [(file, first)]
    match = SHARD_NAME.match(file.name)
    index = int(first.value("split.no", 0))
    if match is None or index != 0:
        raise ModelLoadError(f"{file.name} is shard {index + 1} of a GGUF model split in {count}; pass the first "
                             f"shard (<name>-00001-of-{count:05d}.gguf)")
    shards = [file.with_name(f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(2, count + 1)]
    missing = [f.name for f in shards if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{file.name} is the first of {count} GGUF shards, but {', '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing next to it")
    return [(file, first), *((f, _reader(f)) for f in shards)]


def without_gguf_padding(vocab: dict[str, int]) -> dict[str, int]:
    """A tokenizer's vocabulary less llama.cpp's placeholders: its converter lists every id up to the
    embedding's rows, naming those past the Hugging Face tokenizer's "[PAD<id>]" (convert_hf_to_gguf.py's
    get_vocab_base), so the same tokenizer from a GGUF and from its Hugging Face directory (or from
    GGUFs of one family padded to other sizes) would otherwise differ."""
    return {token: i for token, i in vocab.items() if token != f"[PAD{i}]"}


def gguf_has_tokenizer(file: Path) -> bool:
    """Whether the file carries a tokenizer (llama.cpp's converter always writes one; a file written
    with only the weights has none, and is served with token ids as a directory without one is)."""
    return _reader(file).has("tokenizer.ggml.tokens")


def gguf_config_dict(file: Path) -> dict[str, Any]:
    """A Hugging Face style config.json dict for ArchConfig.from_dict, from the file's metadata."""
    readers = _readers(file)
    reader = readers[0][1]
    arch = reader.value("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"unsupported GGUF architecture {arch!r} in {file.name}; supported: "
                             f"{', '.join(GGUF_ARCHITECTURES)}")
    # llama.cpp writes Mixtral as llama with experts (ffn_*_exps tensors, which no dense MLP reads).
    experts = int(reader.value(f"{arch}.expert_count", 0))
    if experts > 0:
        raise ModelLoadError(f"{file.name} is a mixture-of-experts GGUF ({arch} with {experts} experts, e.g. "
                             "Mixtral), which is not supported; only dense llama, qwen2 and qwen3 models are")
    tensors = {t.name: t for _, r in readers for t in r.tensors}
    names = set(tensors)
    if "token_embd.weight" not in tensors:
        raise ModelLoadError(f"{file.name} has no token_embd.weight tensor")
    heads = int(reader.value(f"{arch}.attention.head_count"))
    hidden = int(reader.value(f"{arch}.embedding_length"))
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": int(reader.value(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(reader.value(f"{arch}.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(reader.value(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(reader.value(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(reader.value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(reader.value(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(reader.value(f"{arch}.context_length", 4096)),
        # The embedding's rows (ggml lists the hidden size first): <arch>.vocab_size is optional (the
        # converter writes it for some architectures only) and the token list may be shorter.
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        # Dequantized weights are served in bf16 on the GPU (fp32 on the CPU, like every model there).
        "torch_dtype": "bfloat16",
        "bos_token_id": reader.value("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _end_of_generation_ids(reader),
        "rope_scaling": _rope_scaling(reader, tensors.get("rope_freqs.weight"), arch),
    }
    return config


# The control tokens llama.cpp ends generation at, found by their text (its end-of-generation set): a
# GGUF has one eos id and no generation_config.json, whose eos list these reproduce for the families
# served here (Llama 3.x: <|end_of_text|> <|eom_id|> <|eot_id|>; Qwen2.5 / Qwen3: <|im_end|> <|endoftext|>).
# Without them a Llama 3 GGUF whose eos is <|end_of_text|> runs past the end of its turn.
_END_OF_GENERATION_TEXTS = frozenset({"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
                                      "<|end|>", "<end_of_turn>", "<EOT>"})
_CONTROL_TOKEN = 3  # tokenizer.ggml.token_type of special tokens (gguf.TokenType.CONTROL)


def _end_of_generation_ids(reader: GGUFFile) -> list[int]:
    """The file's eos, eot and eom ids, then its control tokens spelled as an end of generation."""
    ids = [reader.value(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom")]
    if reader.has("tokenizer.ggml.tokens") and reader.has("tokenizer.ggml.token_type"):
        tokens, types = reader.value("tokenizer.ggml.tokens"), reader.value("tokenizer.ggml.token_type")
        ids += [i for i, (text, kind) in enumerate(zip(tokens, types))
                if kind == _CONTROL_TOKEN and text in _END_OF_GENERATION_TEXTS]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _rope_scaling(reader: GGUFFile, freqs: Optional[GGUFTensor], arch: str) -> Optional[dict[str, Any]]:
    """config.json's rope_scaling for the file: llama.cpp stores Llama 3.x's llama3 scaling as a
    `rope_freqs` tensor of per-dimension divisors (computed by its converter from the same formula),
    and linear / YaRN scaling as `<arch>.rope.scaling.*` metadata."""
    if freqs is not None:
        from gguf.quants import dequantize

        factors = dequantize(freqs.data, freqs.tensor_type).reshape(-1)
        return {"rope_type": "frequency_factors", "factors": [float(f) for f in factors]}
    rope_type = reader.value(f"{arch}.rope.scaling.type")
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    factor = reader.value(f"{arch}.rope.scaling.factor")
    if factor is not None:
        scaling["factor"] = float(factor)
    original = reader.value(f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _hf_name(name: str) -> Optional[str]:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")  # blk.N.<tensor>.<weight|bias>
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter interleaves the rotary halves of each q/k head (its rope pairs adjacent
    dims, Hugging Face's pairs dim i with i + d/2); undo it, as transformers does for llama GGUFs."""
    rows = weight.shape[0]
    w = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def gguf_tensors(file: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(Hugging Face name, fp32 tensor on `device`, file name) for every tensor of the file (of every
    shard)."""
    readers = _readers(file)
    metadata = readers[0][1]
    arch = metadata.value("general.architecture")
    heads = int(metadata.value(f"{arch}.attention.head_count"))
    kv_heads = int(metadata.value(f"{arch}.attention.head_count_kv", heads))
    for shard, reader in readers:
        yield from _shard_tensors(shard, reader, arch, heads, kv_heads, device)


def _dequantized(tensor: GGUFTensor, file: Path, device: torch.device) -> torch.Tensor:
    """The tensor's weights, flat, in fp32 on `device`, unpacked there by torch (model/gguf_dequant.py):
    on a GPU from the raw blocks; on the CPU too, where torch's threads scale with the cores and the gguf
    library's numpy runs on one (on this project's 2-core machine the two are within ~1.5x either way).
    The few types not ported (TQ1_0, TQ2_0, MXFP4, NVFP4) go through the library."""
    from agentserve.model.gguf_dequant import dequantize_on  # (the gguf package takes ~0.1 s to import)

    on_device = dequantize_on(tensor.data, tensor.tensor_type, device)
    if on_device is not None:
        return on_device
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ModelLoadError(f"GGUF tensor {tensor.name} in {file.name} has type {tensor.tensor_type.name}, "
                             "which cannot be dequantized") from None
    # A copy: F32 tensors come back as read-only views of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(-1)).to(device)


def _shard_tensors(file: Path, reader: GGUFFile, arch: str, heads: int, kv_heads: int, device: torch.device
                   ) -> Iterator[tuple[str, torch.Tensor, str]]:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            continue  # rotary frequencies, read into rope_scaling by gguf_config_dict
        name = _hf_name(tensor.name)
        if name is None:
            logger.warning("ignoring unexpected GGUF tensor %s in %s", tensor.name, file.name)
            continue
        values = _dequantized(tensor, file, device)
        values = values.reshape([int(d) for d in reversed(tensor.shape)])  # ggml lists dims innermost first
        if arch == "llama" and ".attn_q." in tensor.name:
            values = _unpermute_rotary(values, heads)
        elif arch == "llama" and ".attn_k." in tensor.name:
            values = _unpermute_rotary(values, kv_heads)
        yield name, values, file.name
