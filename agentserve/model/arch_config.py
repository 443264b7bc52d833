"""The model shape read from a Hugging Face config.json (transformers 4.x and 5.x spellings)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from agentserve.errors import ModelLoadError
from agentserve.json_file import read_json_object
from agentserve.model.rope_scaling import RopeScalingError, normalized_rope_scaling

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# A config.json without `architectures` (one written by Config(...).save_pretrained) is read by its
# model_type, as transformers' AutoModelForCausalLM does.
ARCHITECTURE_OF_MODEL_TYPE = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
# What transformers' config classes give keys that config.json leaves out, where that is not the
# generic reading below (head_dim = hidden / heads, num_key_value_heads = num_attention_heads): the
# defaults of LlamaConfig, MistralConfig, Qwen2Config and Qwen3Config (transformers 5). A key present
# with null keeps its null meaning.
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"sliding_window": 4096, "num_key_value_heads": 8, "max_position_embeddings": 131072},
    "qwen2": {"num_key_value_heads": 32, "max_position_embeddings": 32768, "max_window_layers": 28},
    "qwen3": {"head_dim": 128, "num_key_value_heads": 32, "max_position_embeddings": 32768,
              "max_window_layers": 28},
}


def _sliding_window(cfg: dict[str, Any], family: str, num_layers: int) -> Optional[int]:
    """The window of the layers that slide, None where none does, by transformers' rules: Mistral slides
    every layer when sliding_window is set; Qwen2 / Qwen3 only with use_sliding_window, and then the
    layers that `layer_types` names "sliding_attention" (by default those from max_window_layers on:
    a config whose max_window_layers covers every layer slides none); Llama never."""
    window = cfg.get("sliding_window")
    if window is None or family == "llama":
        return None
    if family == "mistral":
        return int(window)
    if not cfg.get("use_sliding_window"):
        return None
    layer_types = cfg.get("layer_types")
    if layer_types:
        slides = "sliding_attention" in layer_types
    else:
        slides = int(cfg["max_window_layers"]) < num_layers
    return int(window) if slides else None


@dataclass
class ArchConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # qkv projections have a bias (Qwen2; Llama / Qwen3 when config.json says so)
    qk_norm: bool  # per-head RMSNorm on q and k before rotary (Qwen3)
    sliding_window: Optional[int]
    torch_dtype: Optional[str]
    o_proj_bias: bool = False  # Llama / Qwen3 with attention_bias: o_proj has one too
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down have biases
    bos_token_id: Optional[int] = None
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ArchConfig":
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None) if archs else \
            ARCHITECTURE_OF_MODEL_TYPE.get(str(cfg.get("model_type")))
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[arch]
        cfg = {**_FAMILY_DEFAULTS.get(family, {}), **cfg}
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            vocab = int(cfg["vocab_size"])
            inter = int(cfg["intermediate_size"])
            layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks required field {e.args[0]!r}") from None
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters: a config's rope_scaling is
        # taken over rope_parameters, and the top-level rope_theta fills the chosen dict only where it has none.
        rope_params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_theta = float(rope_params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
        max_positions = int(cfg["max_position_embeddings"])  # every family has a default above
        try:
            scaling = normalized_rope_scaling(rope_params or None, max_positions)
        except RopeScalingError as e:
            raise ModelLoadError(str(e)) from None
        # transformers' own per-family rules: Qwen2's q/k/v always carry a bias and its o_proj never;
        # Mistral has none; Llama and Qwen3 follow attention_bias (q/k/v and o), Llama mlp_bias too.
        configured_bias = bool(cfg.get("attention_bias", False))
        qkv_bias = {"qwen2": True, "mistral": False}.get(family, configured_bias)
        hidden_act = cfg.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):
            raise ModelLoadError(f"config.json hidden_act {hidden_act!r} is not supported; the {arch} layers "
                                 "served here use silu")
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        if scaling is not None and scaling["rope_type"] == "frequency_factors" and len(scaling["factors"]) != head_dim // 2:
            raise ModelLoadError(f"rope frequency factors have {len(scaling['factors'])} entries; the model's rotary "
                                 f"dimension needs {head_dim // 2}")
        eos = cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(
            architecture=arch, family=family, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=inter, num_layers=layers, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=scaling,
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            o_proj_bias=configured_bias and family in ("llama", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)) and family == "llama",
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(cfg, family, layers),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, path: Path) -> "ArchConfig":
        return cls.from_dict(read_json_object(path / "config.json", ModelLoadError,
                                              f"{path} has no config.json (is it a Hugging Face model directory?)"))
