"""Which FP8 scheme a model is served with: from the checkpoint's `quantization_config` (in its
config.json) and the `quantization` option.

Supported checkpoints:
- compressed-tensors FP8 (llm-compressor; RedHat / NeuralMagic "FP8-dynamic", "FP8"): float8
  weights ("float-quantized" or "naive-quantized" format) with per-channel, per-tensor or block
  scales (`weight_scale`), activations dynamic (per token, tensor or group) or static per tensor
  (`input_scale`); an optional float8 `kv_cache_scheme` (k_scale / v_scale tensors, model/loader.py);
  a `sparsity_config` (2:4 models) only with dense storage;
- Hugging Face / vLLM "fp8": fine-grained block scales (`weight_scale_inv`, Qwen3 "-FP8", DeepSeek
  style) or per-tensor scales (`weight_scale`, optional static `input_scale`);
- "fbgemm_fp8" (Meta's Llama 3.1 FP8): per-channel scales, dynamic per-token activations.
Which layers are FP8 is read from the checkpoint's tensors, not from its ignore lists
(model/fp8_checkpoint.py). `quantization="fp8"` on a 16-bit checkpoint quantizes its weights at
load (per output channel). Anything else (AWQ, GPTQ, int8, int4 "pack-quantized", FP4, ...) is a
ModelLoadError naming the scheme: serving it as if unquantized would produce garbage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from agentserve.model.arch_config import ModelLoadError

WeightStrategy = Literal["channel", "tensor", "block"]
SUPPORTED = "compressed-tensors FP8 (channel, tensor or block weights; dynamic or static per-tensor " \
            "activations), fp8 (block or per-tensor scales) and fbgemm_fp8"
# compressed-tensors formats that store float8 weights as they are (the others pack integers, keep
# 16-bit "fake-quantized" weights, or store FP4).
_CT_FP8_FORMATS = ("float-quantized", "naive-quantized")


@dataclass(frozen=True)
class Fp8Config:
    checkpoint_fp8: bool                 # the checkpoint stores e4m3 weights (else: quantized at load)
    weight_strategy: WeightStrategy      # how the checkpoint's weight scales are laid out
    static_activations: bool = False     # the checkpoint carries per-tensor input scales
    block_size: tuple[int, int] = (128, 128)
    scale_name: str = "weight_scale"     # "weight_scale_inv" in the fine-grained (block) format


ONLINE_FP8 = Fp8Config(checkpoint_fp8=False, weight_strategy="channel")


def _describe(scheme: Optional[dict[str, Any]]) -> str:
    if not scheme:
        return "none"
    return f"{scheme.get('type', '?')}{scheme.get('num_bits', '?')} {scheme.get('strategy', '?')}" + \
        (" dynamic" if scheme.get("dynamic") else "") + (" asymmetric" if scheme.get("symmetric") is False else "")


def _is_float8(scheme: dict[str, Any]) -> bool:
    return scheme.get("type") == "float" and scheme.get("num_bits") == 8


def _ct_static_activations(acts: Optional[dict[str, Any]]) -> Optional[bool]:
    """Whether the activations are static per tensor; None for a scheme that is not supported."""
    if not acts:
        return False  # weight-only FP8: activations are quantized per token like dynamic ones
    if not _is_float8(acts):
        return None
    if acts.get("dynamic"):
        return False if acts.get("strategy") in ("token", "tensor", "group") else None
    return True if acts.get("strategy") == "tensor" else None


def _ct_kv_cache_scheme(qc: dict[str, Any]) -> None:
    kv = qc.get("kv_cache_scheme")
    if kv and not _is_float8(kv):
        raise ModelLoadError(f"unsupported quantization scheme: compressed-tensors kv_cache_scheme {_describe(kv)} "
                             "(only a float8 KV cache, served with kv_cache_dtype='fp8')")


def _ct_dense_sparsity(qc: dict[str, Any]) -> bool:
    """Whether the checkpoint has a sparsity_config (llm-compressor's 2:4 models), which must store its
    weights dense: "sparse-24-bitmask" and the other compressed formats keep each weight as its
    nonzeros plus a bitmask, tensors no dense layer reads."""
    sparsity = qc.get("sparsity_config")
    if not sparsity:
        return False
    fmt = sparsity.get("format", "dense")
    if fmt != "dense":
        raise ModelLoadError(f"unsupported quantization scheme: compressed-tensors sparsity format {fmt!r} "
                             f"({sparsity.get('sparsity_structure', '?')}): the weights are stored compressed; "
                             "only dense storage of sparse weights is supported")
    return True


def _compressed_tensors(qc: dict[str, Any]) -> Optional[Fp8Config]:
    _ct_kv_cache_scheme(qc)
    dense_sparsity = _ct_dense_sparsity(qc)
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        if qc.get("kv_cache_scheme") or dense_sparsity:
            return None  # 16-bit weights; k_scale / v_scale tensors of a KV-cache-only checkpoint
        raise ModelLoadError("compressed-tensors quantization_config has no config_groups")
    schemes = {(repr(g.get("weights")), repr(g.get("input_activations"))) for g in groups}
    if len(schemes) > 1:
        raise ModelLoadError("compressed-tensors checkpoint mixes several quantization schemes; only one FP8 "
                             "scheme for every Linear layer is supported")
    group = groups[0]
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or qc.get("format")
    name = f"compressed-tensors weights {_describe(weights)}, activations {_describe(acts)}, format {fmt}"
    static = _ct_static_activations(acts)
    strategy = weights.get("strategy")
    if (not _is_float8(weights) or strategy not in ("channel", "tensor", "block") or static is None
            or weights.get("symmetric") is False or fmt not in (*_CT_FP8_FORMATS, None)):
        raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
    block = tuple(weights.get("block_structure") or (128, 128))
    return Fp8Config(checkpoint_fp8=True, weight_strategy=strategy, static_activations=static,
                     block_size=(int(block[0]), int(block[1])))


def _hf_fp8(qc: dict[str, Any]) -> Fp8Config:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ModelLoadError(f"unsupported quantization scheme: fp8 with activation_scheme {scheme!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ModelLoadError(f"unsupported quantization scheme: fp8 format {qc.get('fmt')!r} (only e4m3)")
    block = qc.get("weight_block_size")
    if block:
        if scheme != "dynamic":
            raise ModelLoadError("unsupported quantization scheme: fp8 block scales with static activations")
        return Fp8Config(checkpoint_fp8=True, weight_strategy="block", block_size=(int(block[0]), int(block[1])),
                         scale_name="weight_scale_inv")
    return Fp8Config(checkpoint_fp8=True, weight_strategy="tensor", static_activations=scheme == "static")


def refuse_legacy_quantize_config(model_dir: Path) -> None:
    """AutoGPTQ / AutoAWQ-era checkpoints name their scheme in quantize_config.json (quant_config.json) rather
    than config.json; without this their load failed on missing weights after warnings about qweight / scales."""
    for name in ("quantize_config.json", "quant_config.json"):
        file = model_dir / name
        if file.is_file():
            try:
                legacy = json.loads(file.read_text())
            except (OSError, ValueError):
                legacy = {}
            method = legacy.get("quant_method") or ("gptq" if "bits" in legacy else "unknown")
            raise ModelLoadError(f"unsupported quantization scheme: quant_method {method!r} in the checkpoint's "
                                 f"{name} (supported: {SUPPORTED})")


def resolve_quantization(hf_config: dict[str, Any], quantization: Optional[str]) -> Optional[Fp8Config]:
    """The FP8 scheme to build the model with, or None for an unquantized model. A pre-quantized
    checkpoint is read as its config says whether or not `quantization` is given (vLLM's rule)."""
    if quantization not in (None, "fp8"):
        raise ModelLoadError(f"unsupported quantization {quantization!r}; supported: fp8")
    qc = hf_config.get("quantization_config")
    if not qc:
        return ONLINE_FP8 if quantization == "fp8" else None
    method = qc.get("quant_method")
    if method == "compressed-tensors":
        quant = _compressed_tensors(qc)
        return ONLINE_FP8 if quant is None and quantization == "fp8" else quant
    if method == "fp8":
        return _hf_fp8(qc)
    if method == "fbgemm_fp8":
        # Per-channel weight scales, activations per token; activation_scale_ub only caps the per-token
        # scale of FBGEMM's kernels (a cap on outliers, not a scale stored in the checkpoint).
        return Fp8Config(checkpoint_fp8=True, weight_strategy="channel")
    raise ModelLoadError(f"unsupported quantization scheme: quant_method {method!r} in the checkpoint's "
                         f"quantization_config (supported: {SUPPORTED})")
