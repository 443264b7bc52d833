"""Which layers of a pre-quantized FP8 checkpoint are FP8, read from its tensors; and the FP8
tensors it holds for layers served in the model dtype, dequantized at load.

A layer is FP8 exactly where the checkpoint stores its weight scale (`<module>.weight_scale`, or
`weight_scale_inv` in the fine-grained format). The config's lists of what was left out are not
interpreted: compressed-tensors' `ignore` (names, "re:" patterns) and `targets` (classes, patterns),
Hugging Face's `modules_to_not_convert` (matched as substrings by transformers, as exact names by
vLLM) and FBGEMM's list each have their own matching rules, and a rule read differently here would
build an FP8 layer for 16-bit tensors or the other way round. The tensors cannot disagree with
themselves.

Some FP8 tensors still land in a layer that is not FP8 here: a quantized lm_head or embedding (the
model keeps those in its dtype), or one projection of a fused layer whose other projections were
left in 16 bits (q quantized, k not: the fused layer is served unquantized). Fp8WeightDequantizer
holds each such weight until its scale has been read (the two may sit in different shards) and
returns the 16-bit weight the checkpoint means.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from agentserve.model.arch_config import ModelLoadError
from agentserve.model.quant_config import Fp8Config

_WEIGHT = ".weight"
# Every 8-bit float a checkpoint may store (e4m3 is the one FP8 layers compute with).
FLOAT8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz})


def quantized_checkpoint_modules(tensor_names: Iterable[str], config: Fp8Config) -> frozenset[str]:
    """The checkpoint modules (e.g. "model.layers.0.self_attn.q_proj") that carry a weight scale."""
    suffix = "." + config.scale_name
    return frozenset(name[:-len(suffix)] for name in tensor_names if name.endswith(suffix))


def dequantize_checkpoint_weight(weight: torch.Tensor, scale: torch.Tensor, config: Fp8Config) -> torch.Tensor:
    """fp32 weight of an e4m3 `weight` [n, k] with its checkpoint scale: one per tensor, one per
    output row ([n] or [n, 1]), or [ceil(n / bn), ceil(k / bk)] blocks (partial last blocks)."""
    w = weight.float()
    scale = scale.float()
    n, k = w.shape
    if config.weight_strategy == "block":
        bn, bk = config.block_size
        if scale.dim() != 2 or scale.shape != (-(-n // bn), -(-k // bk)):
            raise ModelLoadError(f"block scales of shape {tuple(scale.shape)} do not fit a [{n}, {k}] weight "
                                 f"in {bn}x{bk} blocks")
        return w * scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    if scale.numel() == 1:
        return w * scale.reshape(())
    if scale.numel() == n:
        return w * scale.reshape(n, 1)
    raise ModelLoadError(f"a weight scale of shape {tuple(scale.shape)} fits neither per-tensor nor per-channel "
                         f"scaling of a [{n}, {k}] weight")


class Fp8WeightDequantizer:
    """FP8 checkpoint weights bound for 16-bit parameters, each released with its scale applied."""

    def __init__(self, config: Fp8Config) -> None:
        self.config = config
        self._scale_suffix = "." + config.scale_name
        self._weights: dict[str, torch.Tensor] = {}  # checkpoint module -> its e4m3 weight
        self._scales: dict[str, torch.Tensor] = {}

    def is_scale(self, hf_name: str) -> bool:
        return hf_name.endswith(self._scale_suffix)

    def add_weight(self, hf_name: str, weight: torch.Tensor) -> Optional[torch.Tensor]:
        """The dequantized weight once `hf_name` (an e4m3 `<module>.weight`) has its scale, else None."""
        if not hf_name.endswith(_WEIGHT):
            raise ModelLoadError(f"tensor {hf_name} is {weight.dtype}, which only weights may be")
        module = hf_name[:-len(_WEIGHT)]
        if module in self._scales:
            return dequantize_checkpoint_weight(weight, self._scales.pop(module), self.config)
        self._weights[module] = weight
        return None

    def add_scale(self, hf_name: str, scale: torch.Tensor) -> Optional[tuple[str, torch.Tensor]]:
        """(weight name, dequantized weight) once the weight of the scale `hf_name` was read, else None."""
        module = hf_name[:-len(self._scale_suffix)]
        if module in self._weights:
            return module + _WEIGHT, dequantize_checkpoint_weight(self._weights.pop(module), scale, self.config)
        self._scales[module] = scale
        return None

    def check_done(self) -> None:
        """Every held FP8 weight found its scale (scales of layers not in the model are dropped)."""
        if self._weights:
            names = sorted(m + _WEIGHT for m in self._weights)
            raise ModelLoadError(f"FP8 tensors without a {self.config.scale_name} in the checkpoint: {names[:4]}"
                                 f"{' ...' if len(names) > 4 else ''}")


def check_weight_dtype(hf_name: str, tensor: torch.Tensor, param: torch.Tensor) -> None:
    """A 16-bit checkpoint weight for a layer built FP8 would be cast without a scale."""
    if param.dtype in FLOAT8_DTYPES and tensor.dtype not in FLOAT8_DTYPES:
        raise ModelLoadError(f"tensor {hf_name} is {tensor.dtype}, but its layer is FP8 (the checkpoint has a "
                             "weight scale for it): a 16-bit weight has no FP8 scale to serve it with")
