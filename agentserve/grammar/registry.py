"""Grammar backends by name. Each implementation module imports the interface; this registry
names the modules (and classes) and imports one only when a backend of that name is created, so
that nothing imports every implementation and the interface imports none.

    backend = get_backend("auto")   # -> DEFAULT_BACKEND
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the interface imports torch: the CLI reads the names below without it
    from agentserve.grammar.interface import GrammarBackend

BACKEND_NAMES = ("llguidance", "outlines", "xgrammar")

# The default ("auto") backend: llguidance, chosen by what benchmarks/grammar.py measured over all
# 350 schemas of shared/data/schemas/sample.jsonl (tiny llama3 tokenizer, 1008 tokens / 1024
# logits; 10 s per-schema compile limit; 2 random walks per compiled schema, every finished walk
# validated with jsonschema; 2 CPU cores):
#
#   backend      covered (every walk valid)   compile p50 / p95 / max       mask+accept us/token p50
#   llguidance   333/350 (95%)                1.0 ms / 3.3 ms / 30 ms        8
#   xgrammar     315/350 (90%)                1.6 ms / 49 ms / 426 ms        9
#   outlines     276/350 (79%), 5 time-outs   2.6 ms / 1.6 s / 8.6 s         6
#
# "Covered" counts schemas that compile AND whose outputs all validate: xgrammar and outlines-core
# accept keywords they do not enforce (bounds, uniqueItems, allOf, required-but-undeclared
# properties, oneOf as anyOf, ...), which produced invalid outputs on 17 (xgrammar) and 21
# (outlines) schemas before their backends were made to reject those keywords
# (schema_utils.check_enforceable); llguidance rejects what it cannot enforce by itself and never
# produced an invalid output. llguidance thus has the highest real coverage, the fastest and most
# predictable compiles (no schema near the time limit, vs. seconds and time-outs for outlines),
# a per-token cost on par with the others, and native support for the free-text-then-trigger
# tool-call grammars (lazy lexemes, special tokens). The others stay selectable (--grammar-backend).
# With a 128k-token (Llama-3-sized, synthetic) vocabulary on a subset (50 schemas; 20 for outlines)
# the gap widens: compile p50 llguidance 1.4 ms, xgrammar 41 ms, outlines 307 ms (max 13 s); mask +
# accept per token p50/p95 llguidance 11/81 us, xgrammar 313 us/20 ms, outlines 165/187 us.
DEFAULT_BACKEND = "llguidance"

# vLLM's structured-output backend names (--guided-decoding-backend, structured_outputs.backend, a request's
# backend) -> agentserve's ("guidance" is vLLM's name for llguidance).
VLLM_BACKEND_NAMES = {"guidance": "llguidance", "llguidance": "llguidance", "xgrammar": "xgrammar",
                      "outlines": "outlines", "auto": "auto"}


# name -> (module, class); "outlines_core" is the package's own name, accepted as an alias.
_IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "llguidance": ("agentserve.grammar.llguidance_backend", "LLGuidanceBackend"),
    "outlines": ("agentserve.grammar.outlines_backend", "OutlinesBackend"),
    "outlines_core": ("agentserve.grammar.outlines_backend", "OutlinesBackend"),
    "xgrammar": ("agentserve.grammar.xgrammar_backend", "XGrammarBackend"),
}


def get_backend(name: str = "auto", **options: Any) -> GrammarBackend:
    """A backend by name: "llguidance", "outlines", "xgrammar", or "auto" (= DEFAULT_BACKEND)."""
    key = (name or "auto").lower().replace("-", "_")
    if key == "auto":
        key = DEFAULT_BACKEND
    if key not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown grammar backend {name!r}; expected one of {('auto',) + BACKEND_NAMES}")
    module_name, class_name = _IMPLEMENTATIONS[key]
    backend_class: type[GrammarBackend] = getattr(importlib.import_module(module_name), class_name)
    return backend_class(**options)
