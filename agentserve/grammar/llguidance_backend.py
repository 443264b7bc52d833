"""llguidance backend: an Earley parser over a lazy lexer; JSON schemas, regexes and Lark grammars.

Compiling builds one `LLMatcher` (grammar checks, lexer construction); each sequence's matcher is
a `deep_copy` of it. llguidance enters a permanent error state on a disallowed token, so
`accept_token` validates first and leaves the state unchanged on refusal.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any, Sequence

import torch

from agentserve.grammar.forced_text import check_forced_text
from agentserve.grammar.dependent_keywords import dependencies_as_any_of
from agentserve.grammar.not_keyword import not_as_positive
from agentserve.grammar.one_of import one_of_as_any_of
from agentserve.grammar.number_bounds import bounds_as_doubles, exclusive_integer_bounds_stepped
from agentserve.grammar.regex_dialect import patterns_in_both_dialects
from agentserve.grammar.schema_utils import (
    CHECKED_FORMAT_PATTERNS,
    DATE_TIME_REGEX,
    TIME_REGEX,
    formats_as_patterns,
    strip_formats,
)
import llguidance
import llguidance.hf
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from agentserve.grammar.interface import CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher, canonical_json
from agentserve.grammar.llguidance_lark import LarkWriter
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo

if TYPE_CHECKING:  # declared in llguidance's stub only: no runtime name to import
    from llguidance._lib import JsonCompileOptions


# String formats llguidance enforces; others are dropped (annotations) instead of failing the schema.
# How a request's matcher is made from the compiled grammar. "fresh": an independent matcher built
# from the grammar text (~1 ms for a tool schema with a 128k vocabulary, 26 ms for a 157 KB schema;
# it runs on a worker thread, engine/constraints.py). "copy": a deep copy of one template (3-40 us).
# Copies share the template's lexer state, and their parallel mask fills do not scale: 64 rows took
# 1.3-2.0 ms on 1-16 threads of the H200's host against 0.65 ms for fresh matchers
# (benchmarks/grammar_fill.py); grammar_step's batch-64 overhead went +34% -> +1-3%
# (benchmarks/NOTES.md). "auto" (default): fresh when the grammar built in at most
# FRESH_MAX_BUILD_MS at compile time, so one huge schema cannot cost every request tens of ms of CPU.
MATCHER_MODE = os.environ.get("AGENTSERVE_LLG_MATCHER", "auto")
FRESH_MAX_BUILD_MS = 5.0
FORMATS = frozenset({"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid", "uri"})
# llguidance's own time and date-time take a leap second at any minute ("12:22:60Z": 14% of random
# date-times), which Python's datetime and pydantic refuse: these patterns stop at :59. The formats it
# does not implement but validators check (json-pointer, idn-email, ...) as patterns too.
FORMAT_PATTERNS = {"time": f"^{TIME_REGEX}$", "date-time": f"^{DATE_TIME_REGEX}$",
                   **CHECKED_FORMAT_PATTERNS}

_ALL_ESCAPES = "\"\\bfnrt"


def _json_options(schema: Any = None) -> JsonCompileOptions:
    # JSON as json.dumps / chat templates write it: compact, or one space after ':' and ','
    # ({"name": "f", "arguments": {"a": 1}}), never unbounded whitespace a model could pad with.
    # Separators rather than whitespace_pattern: llguidance 1.6 (the newest wheel for Python 3.12,
    # on the GPU machine) does not bound whitespace_pattern; separators behave alike in 1.6 and 1.9.
    opts: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ?", "key_separator": ": ?"}
    excluded = _pattern_excluded_escapes(schema) if schema is not None else set()
    if excluded:
        opts["json_allowed_escapes"] = "".join(c for c in _ALL_ESCAPES if c not in excluded)
    return opts


def _pattern_excluded_escapes(schema: Any) -> set[str]:
    """Escape letters (`"` and `\\`) to forbid in the schema's strings.

    Work-around for llguidance (1.x): in a string with a `pattern`, the escapes `\\"` and `\\\\`
    are allowed even when the pattern excludes `"` or a backslash (e.g. `^[^,"]+$`), so the
    decoded value breaks the pattern. When any pattern of the schema has a negated class that
    excludes one of them, that escape is disallowed for the whole schema: such strings can then
    not contain that character at all, which keeps every output valid."""
    found: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "pattern" and isinstance(value, str):
                    found.update(_negated_class_members(value) & {'"', "\\"})
                else:
                    visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(schema)
    return found


def _negated_class_members(pattern: str) -> set[str]:
    """Characters listed literally in the pattern's negated classes `[^...]` (approximate)."""
    members: set[str] = set()
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "[" and i + 1 < n and pattern[i + 1] == "^":
            j = i + 2
            first = True
            while j < n and (pattern[j] != "]" or first):
                first = False
                if pattern[j] == "\\" and j + 1 < n:
                    nxt = pattern[j + 1]
                    if nxt in "xu":  # \x22 / \u0022 / \x5c
                        hexlen = 2 if nxt == "x" else 4
                        try:
                            members.add(chr(int(pattern[j + 2:j + 2 + hexlen], 16)))
                        except ValueError:
                            pass
                        j += 2 + hexlen
                        continue
                    members.add(nxt)
                    j += 2
                    continue
                members.add(pattern[j])
                j += 1
            i = j + 1
            continue
        i += 1
    return members


def _formats(schema: Any) -> Any:
    """The formats llguidance implements, the ones it writes too loosely or not at all as patterns, others
    dropped; every pattern's shorthand classes as both regex dialects read them (grammar/regex_dialect.py);
    number bounds it would cross stepped inside."""
    schema = exclusive_integer_bounds_stepped(bounds_as_doubles(schema, "llguidance"))  # grammar/number_bounds.py
    return patterns_in_both_dialects(strip_formats(formats_as_patterns(schema, FORMAT_PATTERNS), FORMATS))


def _exact_rewrites(schema: Any) -> Any:
    """llguidance refuses not, oneOf and dependencies; those it can compile exactly are rewritten so:
    `not` as the positive schema it means (grammar/not_keyword.py, first: the oneOf analysis then reads
    its types), oneOf and dependencies as anyOf (grammar/one_of.py, grammar/dependent_keywords.py)."""
    return dependencies_as_any_of(one_of_as_any_of(not_as_positive(schema)))


def _with_ws(schema: Any) -> Any:
    """The schema with llguidance's per-schema options (x-guidance) for our whitespace policy."""
    if isinstance(schema, dict):
        opts = dict(schema.get("x-guidance") or {})
        for key, value in _json_options(schema).items():
            opts.setdefault(key, value)
        return {**schema, "x-guidance": opts}
    return schema


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, info: TokenizerInfo, matcher: Any) -> None:
        super().__init__(info)
        self._m = matcher

    def _accept(self, token_id: int) -> bool:
        if self._m.validate_tokens([token_id]) != 1:
            return False
        ok = self._m.consume_token(token_id)
        if not ok:  # validate said yes: consuming reached a limit (the lexer built lazily grew too large)
            raise GrammarError(f"llguidance: {_short_error(self._m.get_error())}")
        return True

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        _check_cpu_bitmask(bitmask)
        words = bitmask[row]
        self._m.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * words.element_size())
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """A limit met while computing the mask (e.g. "too many expressions constructed") leaves the
        matcher in its error state and the row empty, allowing nothing: sampled there, a token would be
        refused as if the model had broken the constraint. Raised instead as the constraint's own error."""
        if self._m.is_error():
            error = _short_error(self._m.get_error())
            if error == "NoExtensionBias":  # a stop, not a limit: e.g. a schema that only refers to itself
                error = "the constraint allows no output here (no token, not even the end, continues it)"
            raise GrammarError(f"llguidance: {error}")

    def _rollback(self, num_tokens: int) -> None:
        if not self._m.rollback(num_tokens):
            raise ValueError(f"llguidance: cannot roll back {num_tokens} tokens: {self._m.get_error()}")

    def _copy(self) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self.tokenizer_info, self._m.deep_copy())

    def _is_accepting(self) -> bool:
        return self._m.is_accepting()

    def _cannot_continue(self) -> bool:
        return self._m.is_stopped()

    @staticmethod
    def fill_many(pairs: Sequence[tuple["LLGuidanceMatcher", int]], bitmask: torch.Tensor,
                  executor: Any = None) -> None:
        """Fill several rows at once on llguidance's thread pool (drops the GIL)."""
        live = [(m, r) for m, r in pairs if not m._eos_accepted]
        if executor is not None and len(live) > 1:
            _check_cpu_bitmask(bitmask)
            batch, words = bitmask.shape
            executor.unsafe_compute_mask_ptr([(m._m, r) for m, r in live], bitmask.data_ptr(), words * 4, batch)
            for m, _ in live:  # the caller refills row by row to find which request it was
                m.raise_if_failed()
        else:
            for m, r in live:
                m._fill(bitmask, r)
        for m, r in pairs:
            if m._eos_accepted:
                bitmask[r].zero_()
            m._fix_eos(bitmask, r, m._eos_accepted or m._is_accepting())


class LLGuidanceGrammar(CompiledGrammar):
    def __init__(self, spec: ConstraintSpec, info: TokenizerInfo, template: Any, lltok: Any, grammar: str,
                 log_level: int, build_ms: float) -> None:
        super().__init__(spec, info, "llguidance")
        self._template = template
        self._fresh_args = (lltok, grammar, log_level)
        self.build_ms = build_ms  # what building the template took: a fresh matcher costs about as much

    def builds_fresh_matchers(self) -> bool:
        return MATCHER_MODE == "fresh" or (MATCHER_MODE == "auto" and self.build_ms <= FRESH_MAX_BUILD_MS)

    def new_matcher(self) -> LLGuidanceMatcher:
        if self.builds_fresh_matchers():
            lltok, grammar, log_level = self._fresh_args
            return LLGuidanceMatcher(self.tokenizer_info, llguidance.LLMatcher(lltok, grammar, log_level=log_level))
        return LLGuidanceMatcher(self.tokenizer_info, self._template.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"
    # 0.2-0.9 MiB per schema on a 49k vocabulary.
    cache_entries = 512

    def __init__(self, log_level: int = 0) -> None:
        self.log_level = log_level
        self._executor: Any = None

    def executor(self) -> Any:
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        return self._executor

    def tokenizer(self, info: TokenizerInfo) -> Any:
        if info.hf_tokenizer is None:
            raise GrammarError("llguidance needs a Hugging Face fast tokenizer")

        def build() -> Any:
            try:
                return llguidance.hf.from_tokenizer(info.hf_tokenizer, n_vocab=info.vocab_size,
                                                    eos_token=list(info.eos_token_ids))
            except TypeError:
                # llguidance < 1.7 takes one EOS id; the others are allowed by the mask fix-up
                # (GrammarMatcher._fix_eos), which handles every EOS id alike.
                return llguidance.hf.from_tokenizer(info.hf_tokenizer, n_vocab=info.vocab_size,
                                                    eos_token=info.eos_token_ids[0])

        return info.cached("llguidance.tokenizer", build)

    def added_texts(self, info: TokenizerInfo) -> list[str]:
        """The texts of the added tokens llguidance treats as special (all added tokens, whether or
        not the tokenizer marks them special)."""
        lltok = self.tokenizer(info)

        def build() -> list[str]:
            added = info.hf_tokenizer.added_tokens_decoder if info.hf_tokenizer is not None else {}
            return sorted({t.content for i, t in added.items()
                           if t.content and i < lltok.vocab_size and lltok.is_special_token(i)})

        return info.cached("llguidance.added_texts", build)

    def grammar_text(self, spec: ConstraintSpec, info: TokenizerInfo) -> str:
        if spec.kind == "json_schema":
            schema = _exact_rewrites(_formats(json.loads(str(spec.payload))))
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_json_options(schema))
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema('{"type":"object"}', defaults=_json_options())
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(str(spec.payload))
        if spec.kind == "grammar":
            try:
                lark = any_to_lark(str(spec.payload))  # Lark as it is; GBNF / EBNF converted to Lark
            except GbnfToLarkError as e:
                raise ValueError(str(e)) from None
            return llguidance.LLMatcher.grammar_from_lark(lark)
        if spec.kind == "choice":
            lark = "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.payload)
            return llguidance.LLMatcher.grammar_from_lark(lark)
        if spec.kind in ("tool_calls", "structural_tag"):
            tree = json.loads(str(spec.payload))["grammar"]
            writer = LarkWriter(self.tokenizer(info), info, self.added_texts(info),
                                json_body=lambda schema: canonical_json(_with_ws(_exact_rewrites(_formats(schema)))))
            return llguidance.LLMatcher.grammar_from_lark(writer.grammar(tree))
        raise GrammarError(f"llguidance: unsupported constraint kind {spec.kind!r}")

    def compile(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo) -> LLGuidanceGrammar:
        lltok = self.tokenizer(tokenizer_info)
        check_forced_text(spec, self.added_texts(tokenizer_info), self.name)
        try:
            grammar = self.grammar_text(spec, tokenizer_info)
        except ValueError as e:
            raise GrammarError(f"llguidance: invalid {spec.kind}: {e}") from None
        start = time.perf_counter()
        template = llguidance.LLMatcher(lltok, grammar, log_level=self.log_level)
        build_ms = (time.perf_counter() - start) * 1e3
        if template.is_error():
            raise GrammarError(f"llguidance cannot compile {spec.kind}: {_short_error(template.get_error())}")
        return LLGuidanceGrammar(spec, tokenizer_info, template, lltok, grammar, self.log_level, build_ms)


def _short_error(msg: str) -> str:
    msg = msg.split("<state>")[0].strip()
    return msg if len(msg) < 500 else msg[:500] + "..."


def _check_cpu_bitmask(bitmask: torch.Tensor) -> None:
    """llguidance writes masks through a raw pointer: a bitmask of another dtype, device or layout
    would be written past. (llguidance.torch has the same checks, but importing it imports torch's
    compiler stack for a torch.compile'd helper we never call: ~2.6 s at every process start.)"""
    if bitmask.dtype != torch.int32 or not bitmask.is_cpu or bitmask.dim() != 2 or not bitmask.is_contiguous():
        raise ValueError(f"llguidance fills a contiguous 2-D int32 CPU bitmask, got {bitmask.dtype} "
                         f"{tuple(bitmask.shape)} on {bitmask.device}")
