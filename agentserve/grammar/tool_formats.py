"""Tool-call formats: which one a chat template renders, and the markers each is spelled with.

  hermes       Hermes/Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
               block per call (several allowed), after optional text.
  llama3_json  Llama 3.1 JSON tool calling: `{"name": ..., "parameters": {...}}` as the whole
               output (optionally after `<|python_tag|>`); several separated by `; `.
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional text.
  mistral_v11  Mistral's tokenizers from v11 on (Magistral, Devstral, Mistral Small 3.2, Ministral 3):
               `[TOOL_CALLS]name[ARGS]{...}` per call after optional text (vLLM's `mistral` parser reads
               both Mistral formats, by the tokenizer's version; here the chat template tells them apart).
"""

from __future__ import annotations

import secrets
import string
from typing import Any, Optional, Sequence, Union

TOOL_FORMATS = ("hermes", "llama3_json", "mistral", "mistral_v11")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"
MISTRAL_ARGS = "[ARGS]"

# Every marker a format's calls are spelled with (which the text the parser reads must keep), its opener
# first: what starts the calls after free text (the parser watches for it; in "auto" mode the grammar
# keeps it out of the text).
FORMAT_MARKERS = {"hermes": (HERMES_OPEN, HERMES_CLOSE), "llama3_json": (PYTHON_TAG,), "mistral": (MISTRAL_OPEN,),
                  "mistral_v11": (MISTRAL_OPEN, MISTRAL_ARGS)}
# Marker strings of the tool-call formats; when a tokenizer has them as single (special) tokens,
# tool-call grammars may name them (and only tool-call grammars do).
TOOL_MARKERS = tuple(dict.fromkeys(m for markers in FORMAT_MARKERS.values() for m in markers))

ARGUMENTS_KEY = {"hermes": "arguments", "llama3_json": "parameters", "mistral": "arguments"}

_FORMAT_ALIASES = {"qwen": "hermes", "qwen2": "hermes", "qwen3": "hermes", "llama3": "llama3_json",
                   "llama": "llama3_json", "llama3_1": "llama3_json", "json": "llama3_json"}


def _template_text(chat_template: Union[None, str, dict, Sequence[Any]]) -> str:
    """A chat template's source: one string, a {name: template} dict, or a list of named templates."""
    if isinstance(chat_template, dict):
        return "\n".join(str(v) for v in chat_template.values())
    if chat_template is None or isinstance(chat_template, str):
        return chat_template or ""
    return "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in chat_template)


def detect_tool_format(chat_template: Union[None, str, dict, Sequence[Any]], override: Optional[str] = None) -> str:
    """The tool-call format a chat template renders, by its markers; `override` wins.

    `[TOOL_CALLS]` -> mistral (mistral_v11 when the template writes `[ARGS]` too); `<tool_call>` -> hermes; `<|python_tag|>`, an `ipython` role or
    calls rendered with `"parameters"` -> llama3_json. Templates without markers -> hermes (the
    most common format of open models)."""
    if override:
        fmt = override.lower().replace("-", "_")
        fmt = _FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in TOOL_FORMATS:
            raise ValueError(f"unknown tool-call format {override!r}; expected one of {TOOL_FORMATS}")
        return fmt
    text = _template_text(chat_template)
    if MISTRAL_OPEN in text:
        return "mistral_v11" if MISTRAL_ARGS in text else "mistral"
    if HERMES_OPEN in text:
        return "hermes"
    if PYTHON_TAG in text or "ipython" in text or '"parameters"' in text:
        return "llama3_json"
    return "hermes"


_ALNUM = string.ascii_letters + string.digits


def new_call_id(fmt: str) -> str:
    """A fresh tool-call id in the shape the format's chat templates accept."""
    if fmt in ("mistral", "mistral_v11"):  # Mistral's templates require 9 alphanumeric characters
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))
