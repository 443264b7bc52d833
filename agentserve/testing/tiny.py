"""Tiny Hugging Face model directories for tests, built locally (no hub, no network).

`make_tiny_model` writes a complete HF directory — config.json, safetensors weights (optionally
sharded), generation_config.json and a byte-level BPE tokenizer with the arch's chat template — that
loads with both `transformers` and the engine's own loader, so tests can compare the two on the same
weights. `tiny_model_cached` memoises builds on disk, keyed by everything that affects the output.

Weights are random but scaled so logits are well separated (stable greedy comparisons between two
fp32 implementations) and generations are varied (not one token repeated forever).

The chat templates follow the real model families (Llama 2, Llama 3.1, Mistral v0.3, Qwen2.5,
Qwen3) but are made append-consistent: rendering messages[:k] is a string prefix of rendering
messages[:k+1]. Where a real template looks at "the last user message" or "the next message" (Mistral
tools/system placement, Qwen's grouping of consecutive tool results) it is changed so nothing but the
generation prompt depends on what comes later. Every message boundary also falls next to a special
token, so prefix-consistency holds at the token level too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ARCHS: tuple[str, ...] = ("llama", "llama3", "mistral", "qwen2", "qwen3")

# Bump when anything changes that alters the built directories (templates, init, tokenizer setup):
# cached directories are keyed by it, so stale ones are never reused.
TINY_VERSION = "1"

CORPUS_PATH = Path(__file__).parent / "data" / "corpus.txt"
BPE_VOCAB_SIZE = 1000  # learned vocabulary incl. the 256 byte symbols; specials come on top
VOCAB_MULTIPLE = 64  # model vocab is padded past len(tokenizer) to this multiple

# Tool-call output format of each arch's chat template (for grammar/tool_formats.py and tests).
TOOL_CALL_FORMAT: dict[str, str] = {
    "llama": "llama3_json",  # {"name": ..., "parameters": ...}; several joined by "; "
    "llama3": "llama3_json",
    "mistral": "mistral",  # [TOOL_CALLS] [{"name": ..., "arguments": ..., "id": ...}]
    "qwen2": "hermes",  # <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>
    "qwen3": "hermes",
}

# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------

# Shared helpers. Content may be a string, None, OpenAI content parts, or (for tool results) a
# JSON-able mapping; tool-call arguments may be a dict or an already-serialised JSON string.
_MACROS = r"""
{%- macro render_content(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content is mapping -%}{{ content | tojson }}
{%- elif content is iterable -%}
{%- for part in content -%}
{%- if part is string -%}{{ part }}
{%- elif part is mapping and part.type == 'text' -%}{{ part.text }}
{%- else -%}{{ part | tojson }}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro render_args(args) -%}
{%- if args is string -%}{{ args }}{%- else -%}{{ args | tojson }}{%- endif -%}
{%- endmacro -%}
"""

_BAD_ROLE = "{{- raise_exception('Unsupported role: ' + message.role) -}}"

# Llama 2 [INST] format. The system message (and the tool list, as JSON) sit in a <<SYS>> block at
# the start of the first [INST]; messages that continue that open [INST] start with "\n\n".
LLAMA2_TEMPLATE = _MACROS + r"""
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- for message in messages -%}
{%- if loop.first and (has_system or tools) -%}
{{- bos_token + '[INST] <<SYS>>\n' -}}
{%- if has_system -%}{{- render_content(message.content) -}}{%- if tools -%}{{- '\n\n' -}}{%- endif -%}{%- endif -%}
{%- if tools -%}
{{- 'You have access to the following functions. To call a function, respond with JSON in the format {"name": function name, "parameters": dictionary of argument name and its value}. Separate several calls with "; ".\n' + (tools | tojson) -}}
{%- endif -%}
{{- '\n<</SYS>>' -}}
{%- endif -%}
{%- if not (loop.first and has_system) -%}
{%- set open = (loop.first and tools) or (loop.index0 == 1 and has_system) -%}
{%- set opener = '\n\n' if open else bos_token + '[INST] ' -%}
{%- if message.role in ('user', 'system') -%}
{{- opener + render_content(message.content) + ' [/INST]' -}}
{%- elif message.role == 'tool' -%}
{{- opener + '<tool_response>\n' + render_content(message.content) + '\n</tool_response> [/INST]' -}}
{%- elif message.role == 'assistant' -%}
{%- if open -%}{{- ' [/INST]' -}}{%- endif -%}
{%- set text = render_content(message.content) -%}
{{- ' ' + text -}}
{%- if message.tool_calls -%}
{%- if text -%}{{- ' ' -}}{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
{%- if not loop.first -%}{{- '; ' -}}{%- endif -%}
{{- '{"name": "' + fn.name + '", "parameters": ' + render_args(fn.arguments) + '}' -}}
{%- endfor -%}
{%- endif -%}
{{- ' ' + eos_token -}}
{%- else -%}""" + _BAD_ROLE + r"""
{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt and messages | length == 1 and has_system -%}{{- ' [/INST]' -}}{%- endif -%}
"""

# Llama 3.1: always a system header (date lines, tools as indented JSON, system text), tool calls as
# {"name": ..., "parameters": ...} JSON, tool results under the "ipython" role. Unlike the real one it
# allows several calls per message (joined by "; ") and keeps tools in the system message.
LLAMA3_TEMPLATE = _MACROS + r"""
{%- if date_string is not defined -%}{%- set date_string = '26 Jul 2024' -%}{%- endif -%}
{%- if messages | length > 0 and messages[0].role == 'system' -%}
{%- set system_message = render_content(messages[0].content) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token + '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}{{- 'Environment: ipython\n' -}}{%- endif -%}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' -}}
{%- if tools -%}
{{- 'You have access to the following functions. To call a function, please respond with JSON for a function call. Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\n\n' -}}
{%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\n\n' -}}{%- endfor -%}
{%- endif -%}
{{- system_message + '<|eot_id|>' -}}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' and message.tool_calls -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + render_content(message.content) -}}
{%- for tool_call in message.tool_calls -%}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
{%- if not loop.first -%}{{- '; ' -}}{%- endif -%}
{{- '{"name": "' + fn.name + '", "parameters": ' + render_args(fn.arguments) + '}' -}}
{%- endfor -%}
{{- '<|eot_id|>' -}}
{%- elif message.role in ('tool', 'ipython') -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + render_content(message.content) + '<|eot_id|>' -}}
{%- elif message.role in ('user', 'assistant', 'system') -%}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + render_content(message.content) + '<|eot_id|>' -}}
{%- else -%}""" + _BAD_ROLE + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

# Mistral v0.3 tool format (plus: text results are JSON-quoted). Changed for append-consistency: [AVAILABLE_TOOLS] goes right after BOS
# (not before the last user message) and system messages render in place as
# [SYSTEM_PROMPT]...[/SYSTEM_PROMPT] (as in Mistral's newer tokenizers) instead of being glued to the
# last user message.
MISTRAL_TEMPLATE = _MACROS + r"""
{{- bos_token -}}
{%- if tools -%}
{{- '[AVAILABLE_TOOLS] [' -}}
{%- for tool in tools -%}
{%- set fn = tool.function if tool.function is defined else tool -%}
{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
{{- '{"type": "function", "function": ' + (fn | tojson) + '}' -}}
{%- endfor -%}
{{- '][/AVAILABLE_TOOLS]' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'system' -%}
{{- '[SYSTEM_PROMPT]' + render_content(message.content) + '[/SYSTEM_PROMPT]' -}}
{%- elif message.role == 'user' -%}
{{- '[INST] ' + render_content(message.content) + '[/INST]' -}}
{%- elif message.role == 'assistant' -%}
{%- set text = render_content(message.content) -%}
{%- if text -%}{{- ' ' + text -}}{%- endif -%}
{%- if message.tool_calls -%}
{{- '[TOOL_CALLS] [' -}}
{%- for tool_call in message.tool_calls -%}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
{{- '{"name": "' + fn.name + '", "arguments": ' + render_args(fn.arguments) -}}
{%- if tool_call.id -%}{{- ', "id": "' + tool_call.id + '"' -}}{%- endif -%}
{{- '}' -}}
{%- endfor -%}
{{- ']' -}}
{%- endif -%}
{{- eos_token -}}
{%- elif message.role in ('tool', 'tool_results') -%}
{%- set result = render_content(message.content) -%}
{#- JSON results go in raw (as in the real template); plain text is quoted so the block stays JSON -#}
{{- '[TOOL_RESULTS] {"content": ' + (result if result[:1] in ('{', '[') else result | tojson) -}}
{%- if message.tool_call_id -%}{{- ', "call_id": "' + message.tool_call_id + '"' -}}{%- endif -%}
{{- '}[/TOOL_RESULTS]' -}}
{%- else -%}""" + _BAD_ROLE + r"""
{%- endif -%}
{%- endfor -%}
"""

_QWEN_TOOLS_INTRO = (
    r"# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    r"You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_OUTRO = (
    r"\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    r"within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    r'{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
)

# Qwen2.5 ChatML + Hermes tools. Changed for append-consistency: each tool result is its own
# `<|im_start|>user ... <|im_end|>` turn (the real template merges consecutive results by looking at
# the next message).
QWEN2_TEMPLATE = _MACROS + r"""
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- render_content(messages[0].content) -}}
{%- else -%}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -}}{%- endif -%}
{{- '\n\n""" + _QWEN_TOOLS_INTRO + r"""' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '""" + _QWEN_TOOLS_OUTRO + r"""' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role == 'assistant' and message.tool_calls -%}
{{- '<|im_start|>assistant' -}}
{%- set text = render_content(message.content) -%}
{%- if text -%}{{- '\n' + text -}}{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
{{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + render_args(fn.arguments) + '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + render_content(message.content) + '\n</tool_response><|im_end|>\n' -}}
{%- elif message.role in ('user', 'assistant', 'system') -%}
{{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' -}}
{%- else -%}""" + _BAD_ROLE + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Qwen3: like Qwen2.5 but no default system prompt and the Qwen3 tool-call spacing; the thinking
# logic (which depends on where the last user query is) is left out.
QWEN3_TEMPLATE = _MACROS + r"""
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- render_content(messages[0].content) + '\n\n' -}}{%- endif -%}
{{- '""" + _QWEN_TOOLS_INTRO + r"""' -}}
{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
{{- '""" + _QWEN_TOOLS_OUTRO + r"""' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role == 'assistant' and message.tool_calls -%}
{%- set text = render_content(message.content) -%}
{{- '<|im_start|>assistant\n' + text -}}
{%- for tool_call in message.tool_calls -%}
{%- set fn = tool_call.function if tool_call.function is defined else tool_call -%}
{%- if text or not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + render_args(fn.arguments) + '}\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{{- '<|im_start|>user\n<tool_response>\n' + render_content(message.content) + '\n</tool_response><|im_end|>\n' -}}
{%- elif message.role in ('user', 'assistant', 'system') -%}
{{- '<|im_start|>' + message.role + '\n' + render_content(message.content) + '<|im_end|>\n' -}}
{%- else -%}""" + _BAD_ROLE + r"""
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


# ---------------------------------------------------------------------------------------------
# Per-arch specification
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ArchSpec:
    hf_arch: str  # architectures[0] in config.json
    model_type: str
    template: str
    front_specials: tuple[str, ...]  # special tokens at ids 0.. (sentencepiece-style families)
    back_specials: tuple[str, ...]  # special tokens appended after the learned vocab
    added_tokens: tuple[str, ...]  # non-special added tokens (kept by skip_special_tokens)
    bos: str | None
    eos: str  # tokenizer eos: the chat format's end-of-turn token
    pad: str
    unk: str | None
    pretok: str  # pre-tokenizer family: "gpt2" | "llama3" | "qwen"
    tokenizer_class: str  # tokenizer_config.json's tokenizer_class
    gen_eos: tuple[str, ...]  # generation_config eos ids (may be several)
    gen_bos: str | None
    add_bos: bool  # tokenizer prepends BOS on encode (like the real tokenizer.json)
    rope_theta: float
    tie: bool
    rms_norm_eps: float
    config_extra: dict[str, Any] = field(default_factory=dict)


_MISTRAL_SPECIALS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)  # fmt: skip
_LLAMA3_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>",
)  # fmt: skip
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_SPECS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec(
        hf_arch="LlamaForCausalLM", model_type="llama", template=LLAMA2_TEMPLATE,
        front_specials=("<unk>", "<s>", "</s>"),
        back_specials=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"), added_tokens=(),
        bos="<s>", eos="</s>", pad="<unk>", unk="<unk>",
        pretok="gpt2", tokenizer_class="PreTrainedTokenizerFast",
        gen_eos=("</s>",), gen_bos="<s>",
        add_bos=True, rope_theta=10000.0, tie=False, rms_norm_eps=1e-5,
    ),
    "llama3": _ArchSpec(
        hf_arch="LlamaForCausalLM", model_type="llama", template=LLAMA3_TEMPLATE,
        front_specials=(), back_specials=_LLAMA3_SPECIALS, added_tokens=(),
        bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>", unk=None,
        pretok="llama3", tokenizer_class="PreTrainedTokenizerFast",
        gen_eos=("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), gen_bos="<|begin_of_text|>",
        add_bos=True, rope_theta=500000.0, tie=True, rms_norm_eps=1e-5,
    ),
    "mistral": _ArchSpec(
        hf_arch="MistralForCausalLM", model_type="mistral", template=MISTRAL_TEMPLATE,
        front_specials=_MISTRAL_SPECIALS, back_specials=(), added_tokens=(),
        bos="<s>", eos="</s>", pad="<unk>", unk="<unk>",
        pretok="gpt2", tokenizer_class="PreTrainedTokenizerFast",
        gen_eos=("</s>",), gen_bos="<s>",
        add_bos=True, rope_theta=1000000.0, tie=False, rms_norm_eps=1e-5,
        config_extra={"sliding_window": None},
    ),
    "qwen2": _ArchSpec(
        hf_arch="Qwen2ForCausalLM", model_type="qwen2", template=QWEN2_TEMPLATE,
        front_specials=(), back_specials=_QWEN_SPECIALS, added_tokens=("<tool_call>", "</tool_call>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
        pretok="qwen", tokenizer_class="Qwen2Tokenizer",
        gen_eos=("<|im_end|>", "<|endoftext|>"), gen_bos="<|endoftext|>",
        add_bos=False, rope_theta=1000000.0, tie=True, rms_norm_eps=1e-6,
        config_extra={"use_sliding_window": False, "sliding_window": None},
    ),
    "qwen3": _ArchSpec(
        hf_arch="Qwen3ForCausalLM", model_type="qwen3", template=QWEN3_TEMPLATE,
        front_specials=(), back_specials=_QWEN_SPECIALS,
        added_tokens=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
        bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
        pretok="qwen", tokenizer_class="Qwen2Tokenizer",
        gen_eos=("<|im_end|>", "<|endoftext|>"), gen_bos="<|endoftext|>",
        add_bos=False, rope_theta=1000000.0, tie=False, rms_norm_eps=1e-6,
        config_extra={"use_sliding_window": False, "sliding_window": None, "attention_bias": False},
    ),
}  # fmt: skip

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


# Pre-tokenization per family, as in the real tokenizer.json files: GPT-2 byte-level for the
# (originally sentencepiece) Llama 2 / Mistral stand-ins, and the Llama 3 / Qwen split regexes. The
# Qwen one also matters because transformers 5 loads model_type qwen2 through Qwen2Tokenizer, which
# rebuilds the pipeline (NFC + this regex) around tokenizer.json's vocab/merges: tokenizer.json must
# agree with it or AutoTokenizer and the raw tokenizers library would tokenize differently.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@functools.lru_cache(maxsize=None)
def _trained_bpe_json(pretok: str) -> str:
    """Train the byte-level BPE on the corpus, once per process and pre-tokenizer family.

    Deterministic (same vocab and merges on every run) and fast (~50 ms for the ~50 KB corpus).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if pretok == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = _LLAMA3_SPLIT if pretok == "llama3" else _QWEN_SPLIT
        if pretok == "qwen":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        # every byte is a symbol, so any string is encodable without <unk>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = CORPUS_PATH.read_text(encoding="utf-8")
    tok.train_from_iterator(text.split("\n\n"), trainer=trainer)
    return tok.to_str()


def _build_tokenizer(arch: str) -> Any:
    """The arch's PreTrainedTokenizerFast: shared learned BPE + the arch's special tokens."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = _SPECS[arch]
    data = json.loads(_trained_bpe_json(spec.pretok))
    vocab: dict[str, int] = data["model"]["vocab"]
    clash = set(spec.front_specials + spec.back_specials + spec.added_tokens) & set(vocab)
    # Byte-level pre-tokenization splits "<s>" etc. into several pieces, so BPE cannot learn them.
    assert not clash, f"special tokens learned by BPE: {clash}"
    # Sentencepiece-era families keep their specials at ids 0.. (<unk>=0, <s>=1, </s>=2, ...).
    shift = len(spec.front_specials)
    new_vocab = {t: i for i, t in enumerate(spec.front_specials)}
    new_vocab.update({t: i + shift for t, i in vocab.items()})
    data["model"]["vocab"] = new_vocab
    tok = Tokenizer.from_str(json.dumps(data))

    def special(t: str) -> AddedToken:
        return AddedToken(t, special=True, normalized=False)

    tok.add_special_tokens([special(t) for t in spec.front_specials + spec.back_specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added_tokens])
    if spec.add_bos:
        assert spec.bos is not None
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A:0",
            pair=f"{spec.bos} $A:0 {spec.bos}:1 $B:1",
            special_tokens=[(spec.bos, bos_id)],
        )
    kwargs = {k: v for k, v in (("bos_token", spec.bos), ("unk_token", spec.unk)) if v is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=spec.eos,
        pad_token=spec.pad,
        chat_template=spec.template,
        clean_up_tokenization_spaces=False,  # keep decode(encode(s)) == s
        model_max_length=1 << 20,
        **kwargs,
    )


def _save_tokenizer(tokenizer: Any, path: Path, tokenizer_class: str) -> None:
    """Save in a layout that old and new loaders read: the template both in tokenizer_config.json
    (transformers 4.x readers) and chat_template.jinja (5.x default), plus special_tokens_map.json."""
    tokenizer.save_pretrained(path, save_jinja_files=False)
    (path / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    # 5.x writes "TokenizersBackend", which 4.x cannot resolve; use the names real checkpoints use.
    cfg["tokenizer_class"] = tokenizer_class
    cfg["chat_template"] = tokenizer.chat_template
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    stm = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    stm = {k: v for k, v in stm.items() if v is not None}
    (path / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def _init_weights(model: Any, seed: int, tokenizer_len: int, special_ids: list[int]) -> None:
    """Re-initialise every parameter with scales chosen for separated logits and lively dynamics.

    HF's default init (std 0.02) gives near-uniform logits and greedy near-ties. Here: unit-variance
    embeddings / lm_head (logit std ~ sqrt(hidden)); attention scores with std ~2; attention and MLP
    outputs a few times larger than the embedding, so the residual stream is dominated by the layers
    (otherwise a tied lm_head just echoes the input token); random norm weights and biases so a
    loader that drops them is caught. Padded vocab rows are zero (never chosen, as in trained models)
    and special tokens are damped so greedy runs rarely stop or emit markup by accident.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        # sorted names: the result depends only on the seed and shapes, not on HF's module order
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            fan_in = p.shape[-1]
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                new = uniform(p.shape, 1.0, 2.0)  # per-head norms would otherwise cap scores at std 1
            elif name == "model.norm.weight":
                # random signs: with a tied lm_head, a positive final norm makes logits favour the
                # input token (h ~ e_i gives logit_i ~ |e_i|^2) and greedy decoding repeats it forever
                sign = torch.randint(0, 2, p.shape, generator=gen) * 2 - 1
                new = uniform(p.shape, 0.6, 1.4) * sign
            elif "norm" in name:
                new = uniform(p.shape, 0.6, 1.4)
            elif name.endswith("bias"):
                new = normal(p.shape, 0.3)
            elif "embed_tokens" in name or "lm_head" in name:
                new = normal(p.shape, 1.0)
                new[special_ids] *= 0.25
                new[tokenizer_len:] = 0.0
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                new = normal(p.shape, 1.2 / math.sqrt(fan_in))
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                new = normal(p.shape, 4.0 / math.sqrt(fan_in))
            else:  # v_proj, gate_proj, up_proj
                new = normal(p.shape, 1.0 / math.sqrt(fan_in))
            p.copy_(new.to(p.dtype))


def _write_shards(path: Path, shards: int) -> None:
    """Split model.safetensors into `shards` files with a correct index (exact shard count)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    single = path / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    names = list(tensors)
    if shards > len(names):
        raise ValueError(f"shards={shards} exceeds the number of tensors ({len(names)})")
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # contiguous, roughly byte-balanced groups; every shard gets at least one tensor
    groups: list[list[str]] = [[] for _ in range(shards)]
    g, acc = 0, 0
    for i, (n, size) in enumerate(zip(names, sizes)):
        share_done = acc >= total * (g + 1) / shards
        needed_later = len(names) - i <= shards - 1 - g  # the rest must go one per later shard
        if groups[g] and (share_done or needed_later):
            g += 1
        groups[g].append(n)
        acc += size
    weight_map: dict[str, str] = {}
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in group}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    single.unlink()


def _legacy_config(path: Path, rope_theta: float, rope_scaling: dict[str, Any] | None) -> None:
    """Rewrite config.json in the layout real hub checkpoints use (rope_theta + rope_scaling,
    torch_dtype) rather than transformers 5's rope_parameters, so loaders see what they will meet."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = rope_scaling
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def make_tiny_model(
    path: str | Path,
    arch: str = "llama",
    *,
    dtype: str = "float32",
    seed: int = 0,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool | None = None,
    shards: int = 1,
    head_dim: int | None = None,
) -> Path:
    """Write a tiny random HF model directory for `arch` (one of ARCHS) at `path` and return it.

    vocab_size defaults to len(tokenizer) rounded up past a multiple of 64 (a padded vocab);
    tie_word_embeddings defaults to the family's real choice; head_dim defaults to
    hidden_size // num_heads, except qwen3 where it is twice that (head_dim != hidden/heads).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r}")
    spec = _SPECS[arch]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in path.glob("model*.safetensors*"):  # a previous build's (sharded) weights would linger
        old.unlink()

    tokenizer = _build_tokenizer(arch)
    n_tok = len(tokenizer)
    if vocab_size is None:
        vocab_size = (n_tok // VOCAB_MULTIPLE + 1) * VOCAB_MULTIPLE
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {n_tok}")
    if head_dim is None:
        head_dim = hidden_size // num_heads * (2 if arch == "qwen3" else 1)
    tie = spec.tie if tie_word_embeddings is None else tie_word_embeddings

    rope_scaling: dict[str, Any] | None = None
    if arch == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            # smaller than max_position_embeddings, so all three llama3 frequency bands occur
            "original_max_position_embeddings": min(256, max(max_position_embeddings // 2, 1)),
        }

    def tid(t: str | None) -> int | None:
        return None if t is None else tokenizer.convert_tokens_to_ids(t)

    gen_eos = [tid(t) for t in spec.gen_eos]
    config = AutoConfig.for_model(
        spec.model_type,
        architectures=[spec.hf_arch],
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers mutates it
        tie_word_embeddings=tie,
        bos_token_id=tid(spec.gen_bos),
        eos_token_id=gen_eos if len(gen_eos) > 1 else gen_eos[0],
        pad_token_id=tid(spec.pad),
        initializer_range=0.02,
        **spec.config_extra,
    )

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    special_ids = sorted(tokenizer.added_tokens_decoder)  # every special / added token id
    _init_weights(model, seed, n_tok, special_ids)
    if tie:
        model.tie_weights()
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tid(spec.gen_bos),
        eos_token_id=gen_eos if len(gen_eos) > 1 else gen_eos[0],
        pad_token_id=tid(spec.pad),
    )
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar for every tiny build
    try:
        model.save_pretrained(path)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    _legacy_config(path, spec.rope_theta, rope_scaling)
    if shards > 1:
        _write_shards(path, shards)
    _save_tokenizer(tokenizer, path, spec.tokenizer_class)
    return path


_CACHE: dict[str, Path] = {}


def _cache_key(arch: str, kw: dict[str, Any]) -> str:
    import transformers

    # this file's source is part of the key too, so edits to templates or init never hit a stale dir
    sources = hashlib.sha256(CORPUS_PATH.read_bytes() + Path(__file__).read_bytes()).hexdigest()
    blob = json.dumps(
        {"arch": arch, "kw": kw, "v": TINY_VERSION, "src": sources, "tf": transformers.__version__},
        sort_keys=True,
        default=str,
    )
    return f"{arch}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tiny_model_cached(arch: str, **kw: Any) -> Path:
    """`make_tiny_model(<dir>, arch, **kw)` built once and reused (in-process and across processes).

    Directories live under <tmp>/agentserve-tiny/, named by a hash of arch, kwargs, TINY_VERSION,
    the corpus, this module's source and the transformers version. Builds go to a scratch dir that is renamed into place,
    so concurrent test processes never see a half-written model.
    """
    key = _cache_key(arch, kw)
    hit = _CACHE.get(key)
    if hit is not None and hit.is_dir():
        return hit
    final = build_once(Path(tempfile.gettempdir()) / "agentserve-tiny" / key,
                       lambda scratch: make_tiny_model(scratch, arch, **kw))
    _CACHE[key] = final
    return final


def build_once(final: Path, build: Callable[[Path], Any]) -> Path:
    """A model directory at `final`, made by `build(scratch)` unless one is already there. The build
    goes to a scratch directory renamed into place, so concurrent processes never see a half-written
    model (a process that loses the rename race uses the winner's)."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        build(scratch)
        try:
            os.rename(scratch, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Real model shapes (HF config kwargs), for dummy-weight loading and benchmarks
# ---------------------------------------------------------------------------------------------

_LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

NAMED_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE), tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False,
    ),
    "llama-3.1-70b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=8192,
        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, rope_theta=500000.0, rope_scaling=dict(_LLAMA31_ROPE), tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False,
    ),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        head_dim=64, rope_theta=500000.0, rope_scaling={**_LLAMA31_ROPE, "factor": 32.0},
        tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=131072, attention_bias=False,
    ),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        head_dim=128, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
        rms_norm_eps=1e-6, max_position_embeddings=32768, attention_bias=True,
    ),
    "qwen2.5-0.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
        intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        head_dim=64, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=True,
        rms_norm_eps=1e-6, max_position_embeddings=32768, attention_bias=True,
    ),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
        rms_norm_eps=1e-6, max_position_embeddings=40960, attention_bias=False,
    ),
    "mistral-7b": dict(  # Mistral-7B-Instruct-v0.3
        architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32768, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, rope_theta=1000000.0, rope_scaling=None, tie_word_embeddings=False,
        rms_norm_eps=1e-5, max_position_embeddings=32768, attention_bias=False, sliding_window=None,
    ),
}  # fmt: skip
