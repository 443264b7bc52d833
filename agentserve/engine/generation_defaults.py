"""Default sampling parameters from the model's generation_config.json (vLLM's `--generation-config auto`,
its default): a request that leaves temperature, top_p, top_k, min_p or repetition_penalty unset gets the
model's values (Qwen2.5's card, for one, asks for temperature 0.7, top_p 0.8, top_k 20 and a repetition
penalty of 1.05), over HTTP, gRPC and `LLM.generate` without sampling parameters. Its max_new_tokens caps
the output of a request that sets no max_tokens (as vLLM does; a request's own max_tokens stands). 'vllm'
turns them off; a directory path reads its generation_config.json instead."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from agentserve.model.arch_config import ModelLoadError
from agentserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# generation_config.json keys -> SamplingParams fields (the ones vLLM takes over).
_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty"}


@dataclass(frozen=True)
class GenerationDefaults:
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields -> the model's values
    # max_new_tokens: the output cap of a request without max_tokens (else: the context's room).
    max_tokens: Optional[int] = None

    def output_cap(self, room: int) -> int:
        """max_tokens for a request that sets none, given the tokens left in its context."""
        return room if self.max_tokens is None else min(room, self.max_tokens)


def generation_config_dir(mode: str, model_path: Optional[Path]) -> Optional[Path]:
    """Where --generation-config `mode` reads generation_config.json: the model's directory for 'auto' and
    'vllm' (whose EOS ids vLLM still takes), else the directory named."""
    return model_path if mode in ("auto", "vllm") else Path(mode)


def read_generation_defaults(mode: str, model_path: Optional[Path]) -> GenerationDefaults:
    """The model's defaults (none when it has no generation_config.json or mode is 'vllm')."""
    if mode == "vllm":
        return GenerationDefaults()
    folder = generation_config_dir(mode, model_path)
    if folder is not None and mode != "auto" and not (folder / "generation_config.json").is_file():
        raise ModelLoadError(f"generation_config {mode!r}: no generation_config.json there (give 'auto', 'vllm' "
                             "or a directory holding one)")
    path = folder / "generation_config.json" if folder is not None and folder.is_dir() else None
    if path is None or not path.is_file():
        return GenerationDefaults()
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    defaults = {name: raw[key] for key, name in _FIELDS.items()
                if isinstance(raw.get(key), (int, float)) and not isinstance(raw.get(key), bool)}
    max_new = raw.get("max_new_tokens")
    try:
        SamplingParams(**defaults, max_tokens=max_new)
    except ValueError as e:
        raise ModelLoadError(f"{path} holds sampling defaults agentserve cannot use ({e}); pass "
                             "--generation-config vllm to ignore them") from None
    if defaults or max_new is not None:
        logger.info("default sampling parameters from %s: %s, max_new_tokens %s (--generation-config vllm turns "
                    "them off)", path, defaults, max_new)
    return GenerationDefaults(defaults, max_new)
