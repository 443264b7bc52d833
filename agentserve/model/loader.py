"""Builds a CausalLM from a local Hugging Face directory (safetensors or .bin, single or sharded), a GGUF
file, or with dummy weights for a config or a named shape; FP8 layers when the checkpoint or the
`quantization` option asks for them (model/quant_config.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterator, Optional

import torch

from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.checkpoint_files import file_tensor_names, file_tensors, weight_files
from agentserve.model.fp8 import quantize_linear_layers
from agentserve.model.fp8_checkpoint import (FLOAT8_DTYPES, Fp8WeightDequantizer, check_weight_dtype,
                                             quantized_checkpoint_modules)
from agentserve.model.gguf import gguf_tensors
from agentserve.model.gguf_files import find_gguf_file
from agentserve.model.linear import LinearBase
from agentserve.model.llama import CausalLM
from agentserve.model.parameter import LoadableParameter, ShardId, WeightShapeError
from agentserve.model.quant_config import ONLINE_FP8, Fp8Config, refuse_legacy_quantize_config, resolve_quantization
from agentserve.parallel.shard import TPShard

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "half": torch.float16,
           "float": torch.float32}

# (our fused parameter, the checkpoint's projection, shard id): vLLM's stacked_params_mapping. The
# fused layer's weight_loader knows where each shard goes.
STACKED_PARAMS: list[tuple[str, str, ShardId]] = [
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
]
# Buffers some checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# KV-cache scales of FP8 checkpoints: the attention's k_scale / v_scale (compressed-tensors
# kv_cache_scheme), the older k_proj / v_proj output_scale, ModelOpt's k_proj.k_scale / v_proj.v_scale,
# and AutoFP8's one kv_scale for both. Used when the KV cache is fp8 (per-head scales are reduced to
# their maximum: the kernels take one scale per layer).
_KV_SCALE_SUFFIXES = {".self_attn.k_scale": ("k_scale",), ".self_attn.v_scale": ("v_scale",),
                      ".self_attn.k_proj.output_scale": ("k_scale",), ".self_attn.v_proj.output_scale": ("v_scale",),
                      ".self_attn.k_proj.k_scale": ("k_scale",), ".self_attn.v_proj.v_scale": ("v_scale",),
                      ".self_attn.kv_scale": ("k_scale", "v_scale")}


def resolve_dtype(name: str, arch: ArchConfig, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            return torch.float32  # half-precision matmuls on CPU are slow and less exact
        # As vLLM: a float32 (or unnamed) checkpoint is served in the device's preferred half type, since
        # fp32 weights double the bytes every decode step reads and the KV pool's bytes per token.
        preferred = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        config_dtype = _DTYPES.get(str(arch.torch_dtype), torch.float32)
        return preferred if config_dtype == torch.float32 else config_dtype
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of auto, float32, float16, bfloat16")
    return _DTYPES[name]


def _param_name(hf_name: str) -> tuple[str, Optional[ShardId]]:
    """Our parameter name for a checkpoint tensor, and the shard it fills in a fused parameter."""
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    for fused, part, shard_id in STACKED_PARAMS:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None


def _hf_tensors(path: Path, load_format: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(checkpoint name, tensor, file name) for every tensor of a Hugging Face checkpoint directory."""
    for file in weight_files(path, load_format):
        for hf_name, tensor in file_tensors(file):
            if not hf_name.endswith(_IGNORED_SUFFIXES):
                yield hf_name, tensor, file.name


def checkpoint_tensors(path: Path, load_format: str, device: torch.device
                       ) -> Iterator[tuple[str, torch.Tensor, str]]:
    """A GGUF file (or a directory holding one and no config.json) or a Hugging Face directory.
    A GGUF's tensors are dequantized on `device` (the model's); a Hugging Face checkpoint's come as stored."""
    gguf_file = find_gguf_file(path)
    if gguf_file is not None:
        return gguf_tensors(gguf_file, device)
    return _hf_tensors(path, load_format)


def checkpoint_tensor_names(path: Path, load_format: str = "auto") -> list[str]:
    """The tensor names of a Hugging Face checkpoint (safetensors: read from the headers, no tensor data)."""
    return [name for file in weight_files(path, load_format) for name in file_tensor_names(file)]


def _load_kv_scale(model: CausalLM, hf_name: str, tensor: torch.Tensor, scaled: set[str]) -> bool:
    """A KV-cache scale into its attention's buffer; `scaled` collects the (attention, buffer) names."""
    for suffix, buffers in _KV_SCALE_SUFFIXES.items():
        if hf_name.endswith(suffix):
            attention_name = _param_name(hf_name[:-len(suffix)])[0] + ".self_attn"
            attention = model.get_submodule(attention_name)
            for buffer in buffers:
                getattr(attention, buffer).fill_(float(tensor.float().max()))
                scaled.add(f"{attention_name}.{buffer}")
            return True
    return False


def _check_kv_scales(model: CausalLM, scaled: set[str]) -> None:
    """A checkpoint's KV scales cover every layer or none: the runner calibrates all layers or none,
    and a layer left at scale 1 would clip its fp8 pages at +-448."""
    if not scaled:
        return
    wanted = {f"layers.{i}.self_attn.{b}" for i in range(model.cfg.num_layers) for b in ("k_scale", "v_scale")}
    lacking = sorted(wanted - scaled)
    if lacking:
        raise ModelLoadError(f"the checkpoint has KV-cache scales for some layers but not for {lacking[:4]}"
                             f"{' ...' if len(lacking) > 4 else ''}")
    model.kv_scales_loaded = True


# The parameter a tied lm_head shares (and the one its checkpoint tensor fills when the file lacks it).
_TIED_EMBEDDING = "embed_tokens.weight"


class _WeightSink:
    """Hands checkpoint tensors to their parameters' weight loaders and records what was filled."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.params: dict[str, LoadableParameter] = {}
        for name, param in model.named_parameters():  # a tied lm_head shares the embedding's entry
            assert isinstance(param, LoadableParameter), f"{name} has no weight loader"
            self.params[name] = param
        self.loaded: dict[str, set[Optional[ShardId]]] = {name: set() for name in self.params}

    def load(self, hf_name: str, tensor: torch.Tensor, source: str) -> None:
        name, shard_id = _param_name(hf_name)
        param = self.params[name]
        check_weight_dtype(hf_name, tensor, param)
        try:
            param.weight_loader(param, tensor, shard_id)
        except WeightShapeError as e:
            raise ModelLoadError(f"tensor {hf_name} in {source} {e}") from None
        self.loaded[name].add(shard_id)

    def missing(self) -> list[str]:
        """The checkpoint names of the tensors no parameter (or shard of a fused one) was filled from."""
        names: list[str] = []
        for name, param in self.params.items():
            if None not in self.loaded[name]:
                names.extend(_checkpoint_name(name, shard_id) for shard_id in param.shard_ids
                             if shard_id not in self.loaded[name])
        return names


def _checkpoint_name(name: str, shard_id: Optional[ShardId]) -> str:
    """The Hugging Face name of our parameter `name` (of its shard `shard_id` in a fused one): the
    inverse of _param_name, so that an error names a tensor the user can look for in the checkpoint."""
    if shard_id is not None:
        fused, part = next((fused, part) for fused, part, sid in STACKED_PARAMS
                           if sid == shard_id and f".{fused}." in name)
        name = name.replace(f".{fused}.", f".{part}.")
    return name if name.startswith("lm_head.") else f"model.{name}"


def load_weights(model: CausalLM, path: Path, quant: Optional[Fp8Config] = None, load_format: str = "auto") -> None:
    """Hands each checkpoint tensor to its parameter's weight_loader, then checks that every
    parameter (every shard of a fused one) was filled. FP8 tensors of layers served in the model
    dtype are dequantized with their scales first (model/fp8_checkpoint.py)."""
    sink = _WeightSink(model)
    dequantizer = Fp8WeightDequantizer(quant) if quant is not None and quant.checkpoint_fp8 else None
    kv_scaled: set[str] = set()
    device = next(model.parameters()).device
    for hf_name, tensor, source in checkpoint_tensors(path, load_format, device):
        name, _ = _param_name(hf_name)
        param = sink.params.get(name)
        if param is not None and tensor.dtype in FLOAT8_DTYPES and param.dtype not in FLOAT8_DTYPES:
            if dequantizer is None:
                raise ModelLoadError(f"tensor {hf_name} in {source} is {tensor.dtype}, but config.json has no FP8 "
                                     "quantization_config to read its scale from")
            dequantized = dequantizer.add_weight(hf_name, tensor)
            if dequantized is not None:
                sink.load(hf_name, dequantized, source)
        elif param is not None:
            sink.load(hf_name, tensor, source)
        elif dequantizer is not None and dequantizer.is_scale(hf_name):
            ready = dequantizer.add_scale(hf_name, tensor)  # the scale of a layer served unquantized
            if ready is not None:
                sink.load(*ready, source)
        elif _load_kv_scale(model, hf_name, tensor, kv_scaled):
            continue
        elif name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            # Some tied checkpoints carry a copy beside the embedding (which wins, as in vLLM); one written by
            # safetensors' save_model keeps only lm_head.weight, which transformers ties back to the embedding.
            if not sink.loaded[_TIED_EMBEDDING]:
                sink.load("model." + _TIED_EMBEDDING, tensor, source)
        elif not (dequantizer is not None and hf_name.endswith(".input_scale")):  # of a layer served unquantized
            logger.warning("ignoring unexpected tensor %s in %s", hf_name, source)
    if dequantizer is not None:
        dequantizer.check_done()
    _check_kv_scales(model, kv_scaled)
    missing = sink.missing()
    if missing:
        raise ModelLoadError(f"{path}: checkpoint lacks tensors for {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def process_weights_after_loading(model: CausalLM) -> None:
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method.process_weights_after_loading(module)


def init_dummy_weights(model: CausalLM, seed: int) -> None:
    """Random weights of a sane scale (benchmarks: outputs are meaningless, use ignore_eos)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-0.02, 0.02, generator=gen)


def checkpoint_quantization(path: Optional[Path], load_format: str, quantization: Optional[str]) -> Optional[Fp8Config]:
    """The FP8 scheme of the checkpoint (its config.json's quantization_config) or of the
    `quantization` option. Random (dummy) weights are always quantized at load."""
    config_file = path / "config.json" if path is not None and path.is_dir() else None
    hf_config = json.loads(config_file.read_text()) if config_file is not None and config_file.is_file() else {}
    if config_file is not None and "quantization_config" not in hf_config:
        refuse_legacy_quantize_config(config_file.parent)
    quant = resolve_quantization(hf_config, quantization)
    return ONLINE_FP8 if quant is not None and load_format == "dummy" else quant


def build_model(arch: ArchConfig, dtype: torch.dtype, device: torch.device, path: Optional[Path],
                load_format: str, seed: int, quantization: Optional[str] = None,
                tp: Optional[TPShard] = None) -> CausalLM:
    quant = checkpoint_quantization(path, load_format, quantization)
    torch_default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        # Built in place on the device: the layers allocate with torch.empty (no init to undo), and
        # their parameters keep their weight loaders (a meta model moved with to_empty may not).
        with torch.device(device):
            model = CausalLM(arch, tp)
            if quant is not None:
                # A checkpoint's FP8 layers are those it stores weight scales for (model/fp8_checkpoint.py).
                quantized = quantized_checkpoint_modules(checkpoint_tensor_names(path, load_format), quant) \
                    if quant.checkpoint_fp8 and path is not None else None
                try:
                    quantize_linear_layers(model, quant, quantized)
                except WeightShapeError as e:
                    raise ModelLoadError(f"{path}: {e}") from None
    finally:
        torch.set_default_dtype(torch_default)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        assert path is not None
        load_weights(model, path, quant, load_format)
    process_weights_after_loading(model)
    model.eval()
    model.requires_grad_(False)
    return model
