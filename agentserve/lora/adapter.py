"""PEFT LoRA adapters: read a directory (adapter_config.json + adapter_model.safetensors or .bin),
check it against the base model's shape, and hold its per-layer A/B tensors on the CPU.

What is supported is what the multi-LoRA kernels apply (kernels/lora.py): plain LoRA on any of the
seven attention / MLP projections (q, k, v, o, gate, up, down), ranks up to `max_lora_rank`, with
`lora_alpha` / `alpha_pattern` / `rank_pattern` scaling (alpha / r, or alpha / sqrt(r) with rsLoRA)
and any subset of layers (`layers_to_transform`). Anything that would change the math in a way
the kernels do not apply (DoRA, LoRA on embeddings or lm_head, fully trained `modules_to_save`, a
LoRA bias, an initialisation that rewrote the base weights, ...) is refused with an error naming it:
serving such an adapter as plain LoRA would silently give wrong outputs. lora/peft_config.py judges
the config; the weight keys are judged here (they are what a config can leave out or get wrong).

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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from agentserve.lora.key import LoRAKey
from agentserve.lora.peft_config import (CONFIG_FILE, LoRAAdapterError, check_adapter_config, read_adapter_config,
                                         scaling_config)
from agentserve.lora.peft_targets import check_weights_match_targets, read_peft_targets
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.checkpoint_files import load_bin_state_dict

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
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight; the adapter-name segment
# (lora_A.default.weight) appears in unsaved state dicts, the prefixes vary with how it was saved.
# The module path (group 1) is PEFT's name for the module, which rank_pattern / alpha_pattern match.
_KEY = re.compile(r"^(?:base_model\.model\.)?((?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+))"
                  r"\.lora_(A|B)(?:\.[\w-]+)?\.weight$")
# Saved tensors that are no part of inference: VeLoRA's activation-compression state (its forward
# outside training is plain LoRA).
_TRAINING_ONLY_KEYS = ("lora_velora_embed",)
_EMBEDDING_MODULES = ("embed_tokens", "lm_head")


def _unsupported_key(key: str) -> Optional[str]:
    """What a weight key holds that this server cannot apply, or None for a LoRA A / B weight."""
    if "lora_embedding_" in key:
        return "LoRA on embeddings (lora_embedding_A / lora_embedding_B)"
    if "lora_magnitude_vector" in key:
        return "DoRA (use_dora)"
    for module in _EMBEDDING_MODULES:
        if module in key:
            if ".lora_" in key:
                return f"LoRA on {module}"
            return (f"a full copy of {module} (saved by save_embedding_layers or modules_to_save, e.g. after "
                    "resizing the vocabulary)")
    if key.endswith(".lora_B.bias") or re.search(r"\.lora_B\.[\w-]+\.bias$", key):
        return "a LoRA bias (lora_bias)"
    if key.endswith(".bias"):
        return "a trained base-layer bias (bias='all' or 'lora_only')"
    return None


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
                # Finite as stored (checked at load) is not finite in the serving dtype: an fp64 1e300, or an
                # fp32 1e5 on an fp16 engine, becomes inf here, and its requests would answer token 0 for ever.
                if not (bool(torch.isfinite(a[s]).all()) and bool(torch.isfinite(b[:, col:col + out]).all())):
                    raise LoRAAdapterError(f"adapter {self.name!r}: layer {layer} {names[s]} has values beyond "
                                           f"{dtype}'s range (the server's dtype); rescale or save it in that dtype")
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


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    st_path, bin_path = path / SAFETENSORS_FILE, path / BIN_FILE
    if st_path.is_file():
        try:
            return load_file(str(st_path), device="cpu")
        except SafetensorError as e:
            raise LoRAAdapterError(f"{st_path} is not a valid safetensors file: {e}") from None
    if bin_path.is_file():
        try:
            return load_bin_state_dict(bin_path)
        except ModelLoadError as e:  # a refused pickle, a bad zip, a truncation, not a state dict of tensors
            raise LoRAAdapterError(str(e)) from None
    raise LoRAAdapterError(f"{path} has neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def base_module_path(layer: int, module: str) -> str:
    """The base model's name of a projection, as PEFT matches target_modules against it."""
    return f"model.layers.{layer}.{'self_attn' if module in ATTENTION_MODULES else 'mlp'}.{module}"


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class _WeightKey:
    layer: int
    module: str       # "q_proj", ...
    module_path: str  # PEFT's name of the module ("model.layers.0.self_attn.q_proj")
    side: str         # "A" or "B"


def _split_key(key: str, where: Path) -> Optional[_WeightKey]:
    """The LoRA weight a key names; None for a tensor inference does not use; raises for the rest."""
    if any(marker in key for marker in _TRAINING_ONLY_KEYS):
        return None
    problem = _unsupported_key(key)
    if problem is not None:
        raise LoRAAdapterError(f"{where}: {problem} is not supported (weight {key!r})")
    match = _KEY.match(key)
    if match is None:
        raise LoRAAdapterError(f"{where}: unexpected weight {key!r}; expected LoRA A/B weights of "
                               f"{', '.join(LORA_TARGET_MODULES)}")
    module_path, layer, block, module, side = match.groups()
    if module not in LORA_TARGET_MODULES:
        raise LoRAAdapterError(f"{where}: weight {key!r} targets module {module!r}, which is not supported; "
                               f"supported: {', '.join(LORA_TARGET_MODULES)}")
    if (block == "self_attn") != (module in ATTENTION_MODULES):
        raise LoRAAdapterError(f"{where}: weight {key!r} puts {module} under {block}")
    return _WeightKey(layer=int(layer), module=module, module_path=module_path, side=side)


def _checked_pair(ab: dict[str, torch.Tensor], layer: int, module: str, shape: tuple[int, int], max_lora_rank: int,
                  weights_file: Path, where: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's (lora_A, lora_B), checked against the base module's (in, out) `shape`."""
    what = f"layer {layer} {module}"
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise LoRAAdapterError(f"{weights_file}: {what} has no {missing} weight")
    for side, tensor in (("lora_A", ab["A"]), ("lora_B", ab["B"])):
        if not tensor.is_floating_point():
            raise LoRAAdapterError(f"{weights_file}: {what} has {side} of dtype {tensor.dtype}; LoRA weights are "
                                   "floating point")
    # 8-bit floats (a quantized save) are read as PEFT reads them: cast to its float32 LoRA weights.
    a, b = (t.float() if t.element_size() == 1 else t for t in (ab["A"], ab["B"]))
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise LoRAAdapterError(f"{weights_file}: {what} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}; expected [r, in] and [out, r]")
    rank = a.shape[0]
    if rank > max_lora_rank:
        raise LoRAAdapterError(f"{where}: {what} has rank {rank}, above max_lora_rank {max_lora_rank}; "
                               f"raise --max-lora-rank to at least {rank}")
    if rank < 1:
        raise LoRAAdapterError(f"{weights_file}: {what} has rank 0")
    in_features, out_features = shape
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise LoRAAdapterError(
            f"{weights_file}: {what} maps {a.shape[1]} -> {b.shape[0]} features, but the base model's "
            f"{module} maps {in_features} -> {out_features} (an adapter for a different model?)")
    for side, tensor in (("lora_A", a), ("lora_B", b)):
        # Served, such weights make every logit of the adapter's requests NaN: token 0 for ever.
        if not bool(torch.isfinite(tensor).all()):
            raise LoRAAdapterError(f"{weights_file}: {what} has NaN or infinite values in its {side} "
                                   "(saved from a diverged training run?)")
    return a, b


def load_lora_adapter(path: str | Path, arch: ArchConfig, *, max_lora_rank: int, adapter_id: int,
                      generation: int = 0, name: Optional[str] = None,
                      dtype: Optional[torch.dtype] = None) -> LoRAAdapter:
    """Load and validate a PEFT LoRA directory for a base model of shape `arch`.

    Tensors stay on the CPU (in `dtype` if given, else as stored); raises LoRAAdapterError naming
    the problem for a missing directory or file, an unsupported feature or module, a rank above
    `max_lora_rank`, a shape the base model does not have, or NaN / infinite weights, and for a path
    the OS refuses (a NUL byte, a name too long, no permission): an API caller's string, never a 500."""
    path = Path(path)
    if "\x00" in str(path):  # os.stat raises ValueError on it, not OSError
        raise LoRAAdapterError(f"LoRA adapter path {str(path)!r} contains a NUL byte; give the adapter's directory")
    try:
        return _load_checked_path(path, arch, max_lora_rank=max_lora_rank, adapter_id=adapter_id,
                                  generation=generation, name=name, dtype=dtype)
    except OSError as e:
        raise LoRAAdapterError(f"cannot read LoRA adapter directory {path}: {e.strerror or e}") from None


def _load_checked_path(path: Path, arch: ArchConfig, *, max_lora_rank: int, adapter_id: int, generation: int,
                       name: Optional[str], dtype: Optional[torch.dtype]) -> LoRAAdapter:
    if path.is_file():  # e.g. the adapter_model.safetensors inside it
        raise LoRAAdapterError(f"{path} is a file, not a directory; give the PEFT adapter directory that holds it "
                               f"({path.parent})")
    if not path.is_dir():
        raise LoRAAdapterError(f"LoRA adapter directory {path} does not exist")
    cfg = read_adapter_config(path)
    where = path / CONFIG_FILE
    check_adapter_config(cfg, where)
    scaling_cfg = scaling_config(cfg, where)
    weights_file = path / (SAFETENSORS_FILE if (path / SAFETENSORS_FILE).is_file() else BIN_FILE)
    state = _read_weights(path)

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    module_paths: dict[tuple[int, str], str] = {}
    for key, tensor in state.items():
        parsed = _split_key(key, weights_file)
        if parsed is None:
            continue
        if parsed.layer >= arch.num_layers:
            raise LoRAAdapterError(f"{weights_file}: weight {key!r} is for layer {parsed.layer}, but the base "
                                   f"model has {arch.num_layers} layers")
        if parsed.side in pairs.get((parsed.layer, parsed.module), {}):
            # e.g. both lora_A.weight and lora_A.<adapter name>.weight: which one PEFT would use is unclear
            raise LoRAAdapterError(f"{weights_file}: layer {parsed.layer} {parsed.module} has more than one "
                                   f"lora_{parsed.side} weight (one of them: {key!r})")
        pairs.setdefault((parsed.layer, parsed.module), {})[parsed.side] = tensor
        module_paths[(parsed.layer, parsed.module)] = parsed.module_path
    if not pairs:
        raise LoRAAdapterError(f"{weights_file} holds no LoRA weights")

    shapes = lora_module_shapes(arch)
    layers: list[dict[str, LoRAModuleWeights]] = [{} for _ in range(arch.num_layers)]
    for (layer, module), ab in sorted(pairs.items()):
        what = f"layer {layer} {module}"
        a, b = _checked_pair(ab, layer, module, shapes[module], max_lora_rank, weights_file, where)
        rank = a.shape[0]
        module_path = module_paths[(layer, module)]
        config_rank = scaling_cfg.module_rank(module_path)
        if config_rank is not None and config_rank != rank:
            raise LoRAAdapterError(f"{where}: {what} has rank {rank} in its weights but {config_rank} in "
                                   "the config (r / rank_pattern)")
        layers[layer][module] = LoRAModuleWeights(
            lora_a=a.to(dtype or a.dtype).contiguous(), lora_b=b.to(dtype or b.dtype).contiguous(),
            scaling=lora_scaling(scaling_cfg.module_alpha(module_path), rank, scaling_cfg.use_rslora))
    # after the shape checks: an adapter for another model is named as that, not as a targeting mismatch
    base_paths = [base_module_path(layer, module) for layer in range(arch.num_layers) for module in LORA_TARGET_MODULES]
    check_weights_match_targets(read_peft_targets(cfg, where), base_paths, {base_module_path(*key) for key in pairs},
                                weights_file, where,
                                fresh_modules_add_nothing=cfg.get("init_lora_weights", True) is not False)
    return LoRAAdapter(
        adapter_id=adapter_id, generation=generation, name=name if name is not None else path.name,
        path=path, rank=max(w.rank for layer in layers for w in layer.values()),
        target_modules=frozenset(module for _, module in pairs), module_shapes=shapes, layers=layers)
