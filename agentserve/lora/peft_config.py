"""A PEFT LoRA directory's adapter_config.json: reading it, refusing the settings under which its A / B
weights are not plain LoRA over this server's base model (y = W x + scaling * B A x), and the numbers
the scaling comes from (lora_alpha, rank_pattern / alpha_pattern, use_rslora).

PEFT writes every LoraConfig field, and newer PEFT versions add fields: a key not named here is
ignored, as PEFT's own loader ignores fields it does not know. What is refused is what would make
plain LoRA on the original base give other outputs than PEFT does:

- LoRA variants whose forward is not B A x (DoRA, a LoRA bias, block-diagonal LoRA, KaSA, Arrow
  routing, MonteCLoRA, aLoRA, QA-LoRA), and extra trained tensors (modules_to_save,
  trainable_token_indices, target_parameters, layer_replication).
- Initialisations that rewrite the base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ): such an adapter
  is a delta over a residual base this server does not have. PEFT converts them into plain LoRA
  (save_pretrained's path_initial_model_for_weight_conversion), which then loads here.
- LoRA on embed_tokens / lm_head (the kernels wrap the attention and MLP projections only).

Not refused, because PEFT serves them as plain LoRA too: fan_in_fan_out (it only says how a Conv1D
base stores its weight; PEFT resets it to False for nn.Linear, and lora_A / lora_B are [r, in] /
[out, r] either way), lora_dropout (training only), VeLoRA (a training-memory trick), the other
initialisations (gaussian, orthogonal, eva, mica, ...), and target_modules names that match no
module of this model (configs written for several architectures). The modules the config does
target must be exactly those the weights adapt (lora/peft_targets.py).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from agentserve.json_file import read_json_object

CONFIG_FILE = "adapter_config.json"
_SUPPORTED_PEFT_TYPE = "LORA"
# PEFT's LoraConfig defaults, for configs that leave the field out.
_DEFAULT_ALPHA = 8.0

# Config fields whose truthy value makes the adapter something other than plain LoRA.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora) is not supported",
    "lora_bias": "a LoRA bias (lora_bias) is not supported",
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported",
    "target_parameters": "LoRA on parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA (kasa_config: a truncated base weight and a learned diagonal) is not supported",
    "arrow_config": "Arrow routing between adapters (arrow_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}
# init_lora_weights values (or prefixes: "pissa_niter_4") that subtract the initial B A from the base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
# Targets the kernels never wrap; the config names them, so the refusal can say why.
_UNSUPPORTED_TARGETS = {"embed_tokens": "embeddings", "lm_head": "lm_head"}


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served; the message names the file, module or field at fault."""


@dataclass(frozen=True)
class LoRAScalingConfig:
    """The config fields the per-module rank and scaling come from (PEFT's semantics)."""

    rank: Optional[int]  # `r`: the rank of modules no rank_pattern key matches (None: not given)
    alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    def module_rank(self, module_path: str) -> Optional[int]:
        return pattern_value(self.rank_pattern, module_path, self.rank)

    def module_alpha(self, module_path: str) -> float:
        alpha = pattern_value(self.alpha_pattern, module_path, self.alpha)
        assert alpha is not None
        return alpha


def read_adapter_config(path: Path) -> dict[str, Any]:
    return read_json_object(path / CONFIG_FILE, LoRAAdapterError,
                            f"{path} has no {CONFIG_FILE} (is it a PEFT adapter directory?)")


def check_adapter_config(cfg: dict[str, Any], where: Path) -> None:
    """Raises LoRAAdapterError naming the first field that makes the adapter more than plain LoRA."""
    peft_type = str(cfg.get("peft_type", _SUPPORTED_PEFT_TYPE)).upper()
    if peft_type != _SUPPORTED_PEFT_TYPE:
        raise LoRAAdapterError(f"{where}: peft_type {peft_type!r} is not supported; only LORA adapters are")
    for flag, problem in _UNSUPPORTED_FLAGS.items():
        if cfg.get(flag):
            raise LoRAAdapterError(f"{where}: {problem} ({flag}={cfg[flag]!r})")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise LoRAAdapterError(
            f"{where}: init_lora_weights={init!r} rewrites the base model's weights, so this adapter only "
            "works over that rewritten base; convert it to plain LoRA with PEFT (save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...)) to serve it over the original model")
    targets = cfg.get("target_modules")
    # A string is a regex (or "all-linear"); names that match nothing here save no weights. Either way
    # the weights say what was adapted, and each is checked; only embeddings / lm_head are refused here.
    if isinstance(targets, list):
        for target in targets:
            leaf = str(target).rsplit(".", 1)[-1]
            if leaf in _UNSUPPORTED_TARGETS:
                raise LoRAAdapterError(f"{where}: target module {target!r} ({_UNSUPPORTED_TARGETS[leaf]}) is not "
                                       "supported; LoRA applies to the attention and MLP projections only")


def scaling_config(cfg: dict[str, Any], where: Path) -> LoRAScalingConfig:
    """The rank / alpha fields, type-checked (a hand-edited config gets an error naming the field)."""
    def number(field: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise LoRAAdapterError(f"{where}: {field} must be a number, not {value!r}")
        if not math.isfinite(value):  # json reads NaN / Infinity: a scaling of them makes every output NaN
            raise LoRAAdapterError(f"{where}: {field} must be a finite number, not {value!r}")
        return float(value)

    def patterns(field: str) -> dict[str, float]:
        value = cfg.get(field) or {}
        if not isinstance(value, dict):
            raise LoRAAdapterError(f"{where}: {field} must be an object of module pattern -> number")
        return {str(k): number(f"{field}[{k!r}]", v) for k, v in value.items()}

    rank = cfg.get("r")
    use_rslora = cfg.get("use_rslora") or False
    if not isinstance(use_rslora, bool):  # a hand-written "false" string would otherwise be truthy
        raise LoRAAdapterError(f"{where}: use_rslora must be true or false, not {use_rslora!r}")
    return LoRAScalingConfig(
        rank=None if rank is None else int(number("r", rank)),
        alpha=number("lora_alpha", cfg.get("lora_alpha", _DEFAULT_ALPHA)),
        use_rslora=use_rslora,
        rank_pattern={k: int(v) for k, v in patterns("rank_pattern").items()},
        alpha_pattern=patterns("alpha_pattern"))


def pattern_value(patterns: dict[str, Any], module_path: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key,
    in the file's order, that matches the module's path as a regex over a dotted suffix."""
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module_path)
        except re.error as e:
            raise LoRAAdapterError(f"pattern {key!r} (rank_pattern / alpha_pattern) is not a valid regex: {e}") from None
        if matched:
            return value
    return default
