"""Which of the base model's projections a PEFT adapter_config.json adapts (target_modules,
exclude_modules, layers_to_transform / layers_pattern), with PEFT's own matching rules
(peft.tuners.tuners_utils.check_target_module_exists), and the check that the saved weights adapt
exactly those.

PEFT builds LoRA layers from the config, not from the weights: a saved tensor for a module the
config does not target is dropped without a word, and a targeted module without tensors keeps its
fresh initialisation. Serving such tensors would give other outputs than PEFT does, so they are an
error naming the modules (a hand-edited config, or weights trimmed or merged by another tool). A
fresh initialisation adds nothing (lora_B starts at zero) except with init_lora_weights=false, so
targeted modules without tensors are served unadapted with a warning, or refused under that one."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from agentserve.lora.peft_config import LoRAAdapterError

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer
# What PEFT adapts when the config names no target_modules: its per-model-type default
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), the same for llama, mistral,
# qwen2 and qwen3.
PEFT_DEFAULT_TARGETS = frozenset({"q_proj", "v_proj"})
_SHOWN = 4  # module paths an error lists before "..."


@dataclass(frozen=True)
class PeftTargets:
    target_modules: Union[str, frozenset[str]]  # a regex (fullmatch) or names / dotted suffixes
    exclude_modules: Union[str, frozenset[str], None]
    layers_to_transform: Union[int, frozenset[int], None]
    layers_patterns: tuple[str, ...]
    defaulted: bool = False  # the config named no target_modules: PEFT's default for the model type

    def covers(self, module_path: str) -> bool:
        """PEFT's check_target_module_exists for a module of the base model ("model.layers.0.self_attn.q_proj")."""
        if isinstance(self.exclude_modules, str):
            if re.fullmatch(self.exclude_modules, module_path):
                return False
        elif self.exclude_modules and (module_path in self.exclude_modules or
                                       any(module_path.endswith(f".{name}") for name in self.exclude_modules)):
            return False
        if isinstance(self.target_modules, str):
            return self.target_modules.lower() == ALL_LINEAR or bool(re.fullmatch(self.target_modules, module_path))
        if module_path in self.target_modules:
            return True  # a full path is taken as it is, whatever layers_to_transform says
        if not any(module_path.endswith(f".{name}") for name in self.target_modules):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == frozenset():
            return True
        return self._layer_index(module_path) in (
            {self.layers_to_transform} if isinstance(self.layers_to_transform, int) else self.layers_to_transform)

    def _layer_index(self, module_path: str) -> Optional[int]:
        """The first numbered segment (after one of layers_pattern, when given), as PEFT finds it."""
        patterns = [rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\." for pattern in self.layers_patterns] or \
            [r".*?\.[^.]*\.(?P<idx>\d+)\."]
        for pattern in patterns:
            match = re.match(pattern, module_path)
            if match is not None:
                return int(match.group("idx"))
        return None


def _names(value: Any, field: str, where: Path) -> Union[str, frozenset[str], None]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return frozenset(value)
    raise LoRAAdapterError(f"{where}: {field} must be a module name regex or a list of module names, not {value!r}")


def read_peft_targets(cfg: dict[str, Any], where: Path) -> PeftTargets:
    """The config's targeting fields; a config without target_modules targets PEFT's per-model-type default
    (q_proj and v_proj for every architecture served here), as PEFT does when it builds the adapter."""
    named = _names(cfg.get("target_modules"), "target_modules", where)
    targets = PEFT_DEFAULT_TARGETS if named is None else named
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        layers = frozenset(layers)
    elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int)):
        raise LoRAAdapterError(f"{where}: layers_to_transform must be a layer index or a list of them, not {layers!r}")
    patterns = cfg.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise LoRAAdapterError(f"{where}: layers_pattern must be a name or a list of names, not {patterns!r}")
    return PeftTargets(target_modules=targets, exclude_modules=_names(cfg.get("exclude_modules"), "exclude_modules",
                                                                      where),
                       layers_to_transform=layers, layers_patterns=tuple(patterns), defaulted=named is None)


def _listed(paths: list[str]) -> str:
    return ", ".join(paths[:_SHOWN]) + (f" ... ({len(paths)} in all)" if len(paths) > _SHOWN else "")


def check_weights_match_targets(targets: PeftTargets, base_paths: list[str], adapted_paths: set[str],
                                weights_file: Path, where: Path, fresh_modules_add_nothing: bool = True) -> None:
    """Raises LoRAAdapterError when the weights adapt a base module the config does not target (PEFT drops
    them). Targeted modules without weights are served unadapted: PEFT initialises them afresh, which adds
    nothing (lora_B = 0) unless `fresh_modules_add_nothing` is False (init_lora_weights=false: random B),
    then they are refused too. `base_paths`: every LoRA-targetable module of the base model;
    `adapted_paths`: those with weights."""
    try:
        targeted = {path for path in base_paths if targets.covers(path)}
    except re.error as e:
        raise LoRAAdapterError(f"{where}: target_modules / exclude_modules is not a valid regex: {e}") from None
    named = sorted(targets.target_modules) if isinstance(targets.target_modules, frozenset) else targets.target_modules
    shown = f"(not given: PEFT's default for this model type, {named!r})" if targets.defaulted else repr(named)
    untargeted = sorted(adapted_paths - targeted)
    if untargeted:
        raise LoRAAdapterError(
            f"{weights_file} has LoRA weights for {_listed(untargeted)}, which target_modules {shown} (with "
            f"exclude_modules / layers_to_transform) in {where.name} does not cover; PEFT would ignore them: add the "
            "modules to target_modules or remove their weights")
    without_weights = sorted(targeted - adapted_paths)
    if without_weights and not fresh_modules_add_nothing:
        raise LoRAAdapterError(
            f"{where}: target_modules {shown} covers {_listed(without_weights)}, but {weights_file.name} has no "
            "LoRA weights for them, and init_lora_weights=false would give them random weights in PEFT: remove them "
            "from target_modules or save the adapter again")
    if without_weights:
        # PEFT's other initialisations start lora_B at zero, so these modules add nothing there either.
        logger.warning("%s: target_modules covers %s, but %s has no LoRA weights for them: served unadapted, as PEFT "
                       "does (lora_B starts at zero)", where, _listed(without_weights), weights_file.name)
