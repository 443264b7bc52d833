"""Which FP8 scheme a model is served with: from the checkpoint's `quantization_config` (in its
config.json) and the `quantization` option.

Supported checkpoints:
- compressed-tensors FP8 (RedHat / NeuralMagic "FP8-dynamic", "FP8"): float8 weights with
  per-channel or per-tensor scales (`weight_scale`), activations dynamic per token or static per
  tensor (`input_scale`);
- Hugging Face / vLLM "fp8": fine-grained 128x128 block scales (`weight_scale_inv`, Qwen3 "-FP8",
  DeepSeek style) or per-tensor scales (`weight_scale`, optional static `input_scale`).
`quantization="fp8"` on a 16-bit checkpoint quantizes its weights at load (per output channel).
Anything else (AWQ, GPTQ, int8, FP4, ...) is a ModelLoadError naming the scheme: serving it as if
unquantized would produce garbage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Optional

from agentserve.model.arch_config import ModelLoadError

WeightStrategy = Literal["channel", "tensor", "block"]
SUPPORTED = "compressed-tensors FP8 (channel or tensor weights; token or tensor activations) and fp8 " \
            "(128x128 block or per-tensor scales)"


@dataclass(frozen=True)
class Fp8Config:
    checkpoint_fp8: bool                 # the checkpoint stores e4m3 weights (else: quantized at load)
    weight_strategy: WeightStrategy      # how the checkpoint's weight scales are laid out
    static_activations: bool = False     # the checkpoint carries per-tensor input scales
    block_size: tuple[int, int] = (128, 128)
    scale_name: str = "weight_scale"     # "weight_scale_inv" in the fine-grained (block) format
    ignore: tuple[str, ...] = ()         # checkpoint module names (or "re:" patterns) left unquantized

    def is_ignored(self, checkpoint_module: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.match(pattern[3:], checkpoint_module):
                    return True
            elif checkpoint_module == pattern or checkpoint_module.endswith("." + pattern):
                return True
        return False


ONLINE_FP8 = Fp8Config(checkpoint_fp8=False, weight_strategy="channel")


def _describe(scheme: Optional[dict[str, Any]]) -> str:
    if not scheme:
        return "none"
    return f"{scheme.get('type', '?')}{scheme.get('num_bits', '?')} {scheme.get('strategy', '?')}" + \
        (" dynamic" if scheme.get("dynamic") else "")


def _compressed_tensors(qc: dict[str, Any]) -> Fp8Config:
    groups = list((qc.get("config_groups") or {}).values())
    if not groups:
        raise ModelLoadError("compressed-tensors quantization_config has no config_groups")
    schemes = {(repr(g.get("weights")), repr(g.get("input_activations"))) for g in groups}
    if len(schemes) > 1:
        raise ModelLoadError("compressed-tensors checkpoint mixes several quantization schemes; only one FP8 "
                             "scheme for every Linear layer is supported")
    group = groups[0]
    weights, acts = group.get("weights") or {}, group.get("input_activations")
    name = f"compressed-tensors weights {_describe(weights)}, activations {_describe(acts)}"
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
    strategy = weights.get("strategy")
    if strategy not in ("channel", "tensor", "block"):
        raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
    static = False
    if acts:
        if acts.get("type") != "float" or acts.get("num_bits") != 8:
            raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
        if acts.get("dynamic"):
            if acts.get("strategy") not in ("token", "tensor", "group"):
                raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
        elif acts.get("strategy") == "tensor":
            static = True
        else:
            raise ModelLoadError(f"unsupported quantization scheme: {name} (supported: {SUPPORTED})")
    block = tuple(weights.get("block_structure") or (128, 128))
    return Fp8Config(checkpoint_fp8=True, weight_strategy=strategy, static_activations=static,
                     block_size=(int(block[0]), int(block[1])), ignore=tuple(qc.get("ignore") or ()))


def _hf_fp8(qc: dict[str, Any]) -> Fp8Config:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ModelLoadError(f"unsupported quantization scheme: fp8 with activation_scheme {scheme!r}")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ModelLoadError(f"unsupported quantization scheme: fp8 format {qc.get('fmt')!r} (only e4m3)")
    ignore = tuple(qc.get("modules_to_not_convert") or qc.get("ignored_layers") or ())
    block = qc.get("weight_block_size")
    if block:
        if scheme != "dynamic":
            raise ModelLoadError("unsupported quantization scheme: fp8 block scales with static activations")
        return Fp8Config(checkpoint_fp8=True, weight_strategy="block", block_size=(int(block[0]), int(block[1])),
                         scale_name="weight_scale_inv", ignore=ignore)
    return Fp8Config(checkpoint_fp8=True, weight_strategy="tensor", static_activations=scheme == "static",
                     ignore=ignore)


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
        return _compressed_tensors(qc)
    if method == "fp8":
        return _hf_fp8(qc)
    raise ModelLoadError(f"unsupported quantization scheme: quant_method {method!r} in the checkpoint's "
                         f"quantization_config (supported: {SUPPORTED})")
