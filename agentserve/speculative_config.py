"""vLLM's `speculative_config` read onto agentserve's speculation options.

vLLM V1 folded its speculative flags into one option, a dict offline (`LLM(model, speculative_config=
{"model": ..., "num_speculative_tokens": 5})`) and JSON on the command line (`--speculative-config
'{"method": "ngram", ...}'`). Scripts and users moving over pass it as they did there; it is read onto
the same fields as agentserve's own flags (`draft_model`, `speculative_method`, `num_speculative_tokens`,
`prompt_lookup_min/max`, `draft_quantization`), and everything agentserve cannot honour is refused with
the key named, never ignored: another method (EAGLE, Medusa, MTP, ...), a sharded draft, unknown keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

SUPPORTED_METHODS = ("draft_model", "ngram")
# vLLM's key -> agentserve's option.
_OPTION_OF = {
    "model": "draft_model",
    "num_speculative_tokens": "num_speculative_tokens",
    "prompt_lookup_max": "prompt_lookup_max",
    "prompt_lookup_min": "prompt_lookup_min",
    "quantization": "draft_quantization",
}
_CHECKED_KEYS = ("method", "draft_tensor_parallel_size")
# vLLM's spellings of the n-gram proposer as a model name (method None) or a method.
_NGRAM_NAMES = ("ngram", "[ngram]")


def _as_mapping(value: object) -> Mapping[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"speculative_config: not valid JSON ({e.msg} at character {e.pos}); expected an "
                             'object such as {"model": "PATH", "num_speculative_tokens": 4}') from None
    if not isinstance(value, Mapping):
        raise ValueError(f"speculative_config: expected an object (a dict, or JSON on the command line), "
                         f"got {type(value).__name__}")
    return value


def _method(config: Mapping[str, Any]) -> str:
    method, model = config.get("method"), config.get("model")
    if method in _NGRAM_NAMES or (method is None and model in _NGRAM_NAMES):
        return "ngram"  # vLLM's SpeculativeConfig reads all of these as its n-gram proposer
    if model in _NGRAM_NAMES:
        raise ValueError(f"speculative_config: model {model!r} is the n-gram proposer, but method is {method!r}")
    if method is None:
        if model is None:
            raise ValueError("speculative_config: give 'model' (a draft model directory) or 'method': 'ngram'")
        return "draft_model"
    if method not in SUPPORTED_METHODS:
        raise ValueError(f"speculative_config.method {method!r} is not supported: agentserve speculates with a "
                         f"draft model ('draft_model', or just 'model') or n-gram prompt lookup ('ngram')")
    return str(method)


def speculative_options(value: object) -> dict[str, object]:
    """agentserve's speculation options for vLLM's `speculative_config` (a dict or a JSON string)."""
    config = _as_mapping(value)
    unknown = sorted(set(config) - set(_OPTION_OF) - set(_CHECKED_KEYS))
    if unknown:
        raise ValueError(f"speculative_config: {', '.join(map(repr, unknown))} not supported; the keys agentserve "
                         f"reads are {', '.join(sorted((*_OPTION_OF, *_CHECKED_KEYS)))}")
    tp = config.get("draft_tensor_parallel_size")
    if tp not in (None, 1):
        raise ValueError(f"speculative_config.draft_tensor_parallel_size {tp!r}: the draft model runs unsharded "
                         "(1), beside the target's first rank")
    method = _method(config)
    options: dict[str, object] = {"speculative_method": method}
    for key, option in _OPTION_OF.items():
        if config.get(key) is not None and not (key == "model" and method == "ngram"):
            options[option] = config[key]
    low, high = config.get("prompt_lookup_min"), config.get("prompt_lookup_max")
    if method == "ngram" and (low is None) != (high is None):  # vLLM: one bound given sets the other
        options["prompt_lookup_max" if high is None else "prompt_lookup_min"] = low if high is None else high
    return options


def merge_speculative_config(kwargs: dict[str, object]) -> dict[str, object]:
    """Engine keyword arguments with `speculative_config` (if any) replaced by the options it sets; an
    option also given on its own must agree with it."""
    merged = {k: v for k, v in kwargs.items() if k != "speculative_config"}
    if kwargs.get("speculative_config") is None:
        return merged
    for option, value in speculative_options(kwargs["speculative_config"]).items():
        if option in merged and merged[option] != value:
            raise ValueError(f"{option}={merged[option]!r} conflicts with speculative_config's {value!r}: give it "
                             "once")
        merged[option] = value
    return merged
