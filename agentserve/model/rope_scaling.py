"""RoPE scaling read from config.json's `rope_scaling`: the inverse frequencies, the factor that scales
cos and sin, and how many positions the scaled model serves.

The frequencies are computed with transformers' own formulas (modeling_rope_utils) and op order, so
fp32 positions match it exactly. Supported: linear (position interpolation), llama3 (Llama 3.1 / 3.2),
yarn (Qwen2.5 / Qwen3 long context, as their model cards add it) and dynamic NTK inside the trained
context (where transformers applies the default frequencies), and GGUF's per-dimension frequency
divisors (`frequency_factors`: llama.cpp's rope_freqs tensor, in which its converter stores Llama
3.x's llama3 scaling, so the frequencies are HF's llama3 ones up to rounding). Anything else is refused at start-up:
serving it with plain RoPE would give wrong outputs past the first few tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "frequency_factors")
# Numeric fields that must be positive where given (a zero factor would divide by zero; a string fails later).
_POSITIVE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                     "attention_factor")
# Numeric fields where 0 means "the default" to transformers (beta_* fall back to 32 / 1, mscale is unused).
_NON_NEGATIVE_NUMBERS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim")
# Checked when config.json is read, so a half-written rope_scaling fails at start-up, naming the key.
_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("original_max_position_embeddings",),
    "dynamic": (),
    "frequency_factors": ("factors",),
}


# Types whose original_max_position_embeddings defaults to max_position_embeddings, as in transformers.
_ORIGINAL_CONTEXT_TYPES = ("llama3", "yarn")


class RopeScalingError(ValueError):
    """A rope_scaling this engine cannot apply exactly; the message names the field."""


@dataclass(frozen=True)
class RopeFrequencies:
    inv_freq: torch.Tensor  # [head_dim // 2] fp32
    attention_factor: float  # multiplies cos and sin (YaRN's mscale); 1.0 elsewhere


def _required(scaling: dict[str, Any], key: str) -> Any:
    if scaling.get(key) is None:
        raise RopeScalingError(f"rope_scaling of type {scaling['rope_type']!r} needs {key!r} in config.json")
    return scaling[key]


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(_required(scaling, "factor"))
    low, high = float(_required(scaling, "low_freq_factor")), float(_required(scaling, "high_freq_factor"))
    old_len = float(_required(scaling, "original_max_position_embeddings"))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(head_dim: int, theta: float, scaling: dict[str, Any]) -> RopeFrequencies:
    """YaRN (arXiv 2309.00071): dimensions that rotate many times over the original context keep their
    frequency (extrapolation), slow ones are interpolated by `factor`, a linear ramp in between; cos
    and sin are scaled by the attention factor (0.1 ln(factor) + 1 unless the config sets it)."""
    original = int(_required(scaling, "original_max_position_embeddings"))
    factor = float(_required(scaling, "factor"))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return RopeFrequencies(inv_freq, float(attention_factor))


def normalized_rope_scaling(raw: Optional[dict[str, Any]], max_position_embeddings: int) -> Optional[dict[str, Any]]:
    """config.json's rope_scaling with its type under `rope_type` (older configs say `type`); None for
    plain RoPE. An unsupported type is refused here, when the config is read."""
    if not raw:
        return None
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise RopeScalingError(f"unsupported rope_scaling type {rope_type!r} in config.json "
                               f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return None
    scaling = dict(raw, rope_type=rope_type)
    if rope_type in _ORIGINAL_CONTEXT_TYPES:
        # transformers' standardize_rope_params: a config that leaves the pretraining context out means
        # max_position_embeddings (an explicit null is still refused below, as transformers fails on it).
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    for key in _REQUIRED_KEYS[rope_type]:
        _required(scaling, key)
    for key in _POSITIVE_NUMBERS + _NON_NEGATIVE_NUMBERS:
        value, positive = scaling.get(key), key in _POSITIVE_NUMBERS
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 or
                                                                                (value == 0 and not positive)):
            raise RopeScalingError(f"rope_scaling {key!r} must be a {'positive' if positive else 'non-negative'} "
                                   f"number, got {value!r}")
    factors = scaling.get("factors")
    if rope_type == "frequency_factors" and (not isinstance(factors, list) or not all(
            isinstance(f, (int, float)) and f > 0 for f in factors)):
        raise RopeScalingError("rope frequency factors must be a list of positive numbers")
    if rope_type == "yarn" and scaling.get("factor") is None:
        # DeepSeek-style configs leave factor out and mean the ratio of the two context lengths.
        scaling["factor"] = max_position_embeddings / float(_required(scaling, "original_max_position_embeddings"))
    return scaling


def rope_frequencies(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> RopeFrequencies:
    if scaling is None or scaling["rope_type"] == "dynamic":
        # Dynamic NTK changes nothing until a sequence outgrows the trained context, which
        # scaled_max_positions does not allow.
        return RopeFrequencies(default_inv_freq(head_dim, theta), 1.0)
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return RopeFrequencies(default_inv_freq(head_dim, theta) / float(_required(scaling, "factor")), 1.0)
    if rope_type == "llama3":
        return RopeFrequencies(_llama3(default_inv_freq(head_dim, theta), scaling), 1.0)
    if rope_type == "yarn":
        return _yarn(head_dim, theta, scaling)
    if rope_type == "frequency_factors":
        factors = torch.tensor(scaling["factors"], dtype=torch.float32)  # as many as head_dim // 2 (ArchConfig)
        return RopeFrequencies(default_inv_freq(head_dim, theta) / factors, 1.0)
    raise RopeScalingError(f"unsupported rope_scaling type {rope_type!r}")


def scaled_max_positions(scaling: Optional[dict[str, Any]], max_position_embeddings: int) -> int:
    """Positions the model serves, as vLLM derives max_model_len: YaRN extends the original context by its
    factor, linear scaling max_position_embeddings by its factor (a config like vicuna-7b-v1.5-16k's says
    4096 with factor 4; its frequencies are the same at every position, so any length is exact); every
    other type keeps config.json's max_position_embeddings (dynamic NTK's frequencies would change with
    the length, which pages already written cannot follow)."""
    if scaling is not None and scaling["rope_type"] == "yarn":
        extended = int(int(scaling["original_max_position_embeddings"]) * float(scaling["factor"]))
        return max(max_position_embeddings, extended)
    if scaling is not None and scaling["rope_type"] == "linear":
        return int(max_position_embeddings * float(scaling["factor"]))
    return max_position_embeddings
