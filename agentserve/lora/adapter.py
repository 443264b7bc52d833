"""PEFT LoRA adapters: read a directory (adapter_config.json + adapter_model.safetensors or .bin),
check it against the base model's shape, and hold its per-layer A/B tensors on the CPU.

What is supported is what the multi-LoRA kernels apply (kernels/lora.py): plain LoRA on any of the
seven attention / MLP projections (q, k, v, o, gate, up, down), ranks up to `max_lora_rank`, with
`lora_alpha` / `alpha_pattern` / `rank_pattern` scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)
and any subset of layers (`layers_to_transform`). Anything that would change the math in a way
the kernels do not apply (DoRA, LoRA on embeddings or lm_head, fully trained `modules_to_save`, a
LoRA bias, ...) is refused with an error naming it: serving such an adapter as plain LoRA would
silently give wrong outputs.

An adapter is identified by `(adapter_id, generation)`, never by its name: reloading a name gives
a new generation, so prefix-cache keys and session pages built under the old weights never match.

How the manager stacks these tensors (see kernels/lora.py for the kernel layout): for each layer
and fused projection (qkv, o, gate_up, down), a GPU slot holds A `[num_slices, max_rank, in]` (each
slice's lora_a, rank rows zero-padded), B `[max_rank, out]` (each slice's lora_b transposed, slices
concatenated along out like the fused base weight), and per-slice rank and scaling (rank 0 for a
projection the adapter does not target: the kernels skip it). `LoRAAdapter.slot_weights` builds
exactly that for one layer and fused projection; the manager copies it into the slot.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from agentserve.lora.key import LoRAKey
from agentserve.model.arch_config import ArchConfig

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES
# The base model's fused projections and the PEFT modules that are their output slices, in order.
FUSED_SLICES: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight; the adapter-name segment
# (lora_A.default.weight) appears in unsaved state dicts, the prefixes vary with how it was saved.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_(A|B)(?:\.[\w-]+)?\.weight$")
_UNSUPPORTED_KEYS = (
    ("lora_embedding_", "LoRA on embeddings"),
    ("lora_magnitude_vector", "DoRA (use_dora)"),
    ("lm_head", "LoRA on lm_head"),
    ("embed_tokens", "LoRA or trained weights on embed_tokens"),
)
_UNSUPPORTED_TARGETS = {"embed_tokens": "embeddings", "lm_head": "lm_head"}
# Config flags whose truthy value changes the math beyond y += scale * B A x.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "a LoRA bias (lora_bias) is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D layout) is not supported",
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
}


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served; the message names the file, module or field at fault."""


@dataclass(frozen=True)
class LoRAModuleWeights:
    """One projection's LoRA: y += scaling * (x @ lora_a.T) @ lora_b.T."""

    lora_a: torch.Tensor  # [rank, in_features], PEFT's lora_A.weight
    lora_b: torch.Tensor  # [out_features, rank], PEFT's lora_B.weight
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoRASlotWeights:
    """One adapter's share of one layer's fused projection, in the kernels' layout (kernels/lora.py):
    the manager copies each field into its stacked buffers at the adapter's slot."""

    lora_a: torch.Tensor   # [num_slices, max_rank, in_features], rank rows past each rank zero
    lora_b: torch.Tensor   # [max_rank, out_features]: each slice's lora_b^T, slices concatenated
    ranks: torch.Tensor    # [num_slices] int32; 0 = slice not targeted (the kernels skip it)
    scaling: torch.Tensor  # [num_slices] float32


@dataclass
class LoRAAdapter:
    adapter_id: int
    generation: int
    name: str
    path: Path
    rank: int  # the largest module rank (rank_pattern may lower some)
    target_modules: frozenset[str]
    module_shapes: dict[str, tuple[int, int]]  # the base model's (in, out) per module
    # layers[i] maps a PEFT module name ("q_proj", ...) to its weights; untargeted ones are absent.
    layers: list[dict[str, LoRAModuleWeights]] = field(default_factory=list)

    @property
    def key(self) -> LoRAKey:
        return LoRAKey(self.adapter_id, self.generation)

    @property
    def nbytes(self) -> int:
        return sum(w.lora_a.nbytes + w.lora_b.nbytes for layer in self.layers for w in layer.values())

    def module(self, layer: int, name: str) -> Optional[LoRAModuleWeights]:
        return self.layers[layer].get(name)

    def fused_slices(self, layer: int, fused: str) -> list[Optional[LoRAModuleWeights]]:
        """The slices of a fused projection (FUSED_SLICES order); None where not targeted."""
        return [self.layers[layer].get(name) for name in FUSED_SLICES[fused]]

    def slot_weights(self, layer: int, fused: str, max_rank: int, dtype: torch.dtype) -> LoRASlotWeights:
        """This adapter's A / B^T / ranks / scaling for one fused projection, zero-padded to
        `max_rank` (the manager's max_lora_rank), on the CPU."""
        names = FUSED_SLICES[fused]
        in_features = self.module_shapes[names[0]][0]
        outs = [self.module_shapes[name][1] for name in names]
        a = torch.zeros(len(names), max_rank, in_features, dtype=dtype)
        b = torch.zeros(max_rank, sum(outs), dtype=dtype)
        ranks = torch.zeros(len(names), dtype=torch.int32)
        scaling = torch.zeros(len(names), dtype=torch.float32)
        col = 0
        for s, (weights, out) in enumerate(zip(self.fused_slices(layer, fused), outs)):
            if weights is not None:
                if weights.rank > max_rank:
                    raise LoRAAdapterError(f"adapter {self.name!r} has rank {weights.rank} in layer {layer} "
                                           f"{names[s]}, above max_lora_rank {max_rank}")
                a[s, :weights.rank] = weights.lora_a
                b[:weights.rank, col:col + out] = weights.lora_b.T
                ranks[s] = weights.rank
                scaling[s] = weights.scaling
            col += out
        return LoRASlotWeights(lora_a=a, lora_b=b, ranks=ranks, scaling=scaling)


def lora_module_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-targetable projection of the base model."""
    q_out = arch.num_heads * arch.head_dim
    kv_out = arch.num_kv_heads * arch.head_dim
    h, i = arch.hidden_size, arch.intermediate_size
    return {"q_proj": (h, q_out), "k_proj": (h, kv_out), "v_proj": (h, kv_out), "o_proj": (q_out, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise LoRAAdapterError(f"{path} has no {CONFIG_FILE} (is it a PEFT adapter directory?)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAAdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise LoRAAdapterError(f"{cfg_path} must hold a JSON object")
    return cfg


def _check_config(cfg: dict[str, Any], where: Path) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAAdapterError(f"{where}: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for flag, problem in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise LoRAAdapterError(f"{where}: {problem} ({flag}={cfg[flag]!r})")
    targets = cfg.get("target_modules")
    # A string is a regex (or "all-linear"): the weights tell what it matched, checked below.
    if isinstance(targets, list):
        for target in targets:
            leaf = str(target).rsplit(".", 1)[-1]
            if leaf in _UNSUPPORTED_TARGETS:
                raise LoRAAdapterError(
                    f"{where}: target module {target!r} ({_UNSUPPORTED_TARGETS[leaf]}) is not supported; "
                    f"supported: {', '.join(LORA_TARGET_MODULES)}")
            if leaf not in LORA_TARGET_MODULES:
                raise LoRAAdapterError(f"{where}: target module {target!r} is not supported; "
                                       f"supported: {', '.join(LORA_TARGET_MODULES)}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st_path, bin_path = path / SAFETENSORS_FILE, path / BIN_FILE
    if st_path.is_file():
        try:
            return load_file(str(st_path), device="cpu")
        except SafetensorError as e:
            raise LoRAAdapterError(f"{st_path} is not a valid safetensors file: {e}") from None
    if bin_path.is_file():
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:  # a bad pickle / zip / truncation
            raise LoRAAdapterError(f"{bin_path} could not be read as a torch state dict: {e}") from None
        if not isinstance(state, dict):
            raise LoRAAdapterError(f"{bin_path} does not hold a state dict")
        return state
    raise LoRAAdapterError(f"{path} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def _pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches a dotted suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _split_key(key: str, where: Path) -> tuple[int, str, str, str]:
    for marker, what in _UNSUPPORTED_KEYS:
        if marker in key:
            raise LoRAAdapterError(f"{where}: {what} is not supported (weight {key!r})")
    match = _KEY.match(key)
    if match is None:
        if key.endswith(".bias"):
            raise LoRAAdapterError(f"{where}: a LoRA bias is not supported (weight {key!r})")
        raise LoRAAdapterError(f"{where}: unexpected weight {key!r}; expected LoRA A/B weights of "
                               f"{', '.join(LORA_TARGET_MODULES)}")
    layer, block, module, ab = match.groups()
    if module not in LORA_TARGET_MODULES:
        raise LoRAAdapterError(f"{where}: weight {key!r} targets module {module!r}, which is not supported; "
                               f"supported: {', '.join(LORA_TARGET_MODULES)}")
    if (block == "self_attn") != (module in ATTENTION_MODULES):
        raise LoRAAdapterError(f"{where}: weight {key!r} puts {module} under {block}")
    return int(layer), block, module, ab


def load_lora_adapter(path: str | Path, arch: ArchConfig, *, max_lora_rank: int, adapter_id: int,
                      generation: int = 0, name: Optional[str] = None,
                      dtype: Optional[torch.dtype] = None) -> LoRAAdapter:
    """Load and validate a PEFT LoRA directory for a base model of shape `arch`.

    Tensors stay on the CPU (in `dtype` if given, else as stored); raises LoRAAdapterError naming
    the problem for a missing directory or file, an unsupported feature or module, a rank above
    `max_lora_rank`, or a shape the base model does not have."""
    path = Path(path)
    if not path.is_dir():
        raise LoRAAdapterError(f"LoRA adapter directory {path} does not exist")
    cfg = _read_config(path)
    where = path / CONFIG_FILE
    _check_config(cfg, where)
    weights_file = path / (SAFETENSORS_FILE if (path / SAFETENSORS_FILE).is_file() else BIN_FILE)
    state = _read_weights(path)

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    blocks: dict[tuple[int, str], str] = {}
    for key, tensor in state.items():
        layer, block, module, side = _split_key(key, weights_file)
        if layer >= arch.num_layers:
            raise LoRAAdapterError(f"{weights_file}: weight {key!r} is for layer {layer}, but the base "
                                   f"model has {arch.num_layers} layers")
        pairs.setdefault((layer, module), {})[side] = tensor
        blocks[(layer, module)] = block
    if not pairs:
        raise LoRAAdapterError(f"{weights_file} holds no LoRA weights")

    shapes = lora_module_shapes(arch)
    alpha = float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    rank_pattern: dict[str, Any] = cfg.get("rank_pattern") or {}
    alpha_pattern: dict[str, Any] = cfg.get("alpha_pattern") or {}
    layers: list[dict[str, LoRAModuleWeights]] = [{} for _ in range(arch.num_layers)]
    for (layer, module), ab in sorted(pairs.items()):
        what = f"layer {layer} {module}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise LoRAAdapterError(f"{weights_file}: {what} has no {missing} weight")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoRAAdapterError(f"{weights_file}: {what} has lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)}; expected [r, in] and [out, r]")
        rank = a.shape[0]
        if rank > max_lora_rank:
            raise LoRAAdapterError(f"{where}: {what} has rank {rank}, above max_lora_rank {max_lora_rank}; "
                                   f"raise --max-lora-rank to at least {rank}")
        if rank < 1:
            raise LoRAAdapterError(f"{weights_file}: {what} has rank 0")
        in_features, out_features = shapes[module]
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise LoRAAdapterError(
                f"{weights_file}: {what} maps {a.shape[1]} -> {b.shape[0]} features, but the base model's "
                f"{module} maps {in_features} -> {out_features} (an adapter for a different model?)")
        module_path = f"model.layers.{layer}.{blocks[(layer, module)]}.{module}"
        pattern_rank = int(_pattern_value(rank_pattern, module_path, cfg.get("r", rank)))
        if pattern_rank != rank:
            raise LoRAAdapterError(f"{where}: {what} has rank {rank} in its weights but {pattern_rank} in "
                                   "the config (r / rank_pattern)")
        module_alpha = float(_pattern_value(alpha_pattern, module_path, alpha))
        layers[layer][module] = LoRAModuleWeights(
            lora_a=a.to(dtype or a.dtype).contiguous(), lora_b=b.to(dtype or b.dtype).contiguous(),
            scaling=lora_scaling(module_alpha, rank, use_rslora))
    return LoRAAdapter(
        adapter_id=adapter_id, generation=generation, name=name if name is not None else path.name,
        path=path, rank=max(w.rank for layer in layers for w in layer.values()),
        target_modules=frozenset(module for _, module in pairs), module_shapes=shapes, layers=layers)
