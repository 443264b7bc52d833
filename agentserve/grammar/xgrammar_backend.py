"""xgrammar backend: pushdown automata with precomputed per-state token masks.

The vocabulary is given to xgrammar raw (bytes per id, as `TokenizerInfo` decodes them), so
special tokens look like text to it; the matcher clears their bits (and padding) after every
fill and refuses them in `accept_token`, except the tool markers in tool-call grammars.
Tool-call structures compile as xgrammar structural tags.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

import numpy as np
import torch

from agentserve.grammar import structure
from agentserve.grammar.one_of import one_of_as_any_of
from agentserve.grammar.schema_utils import (
    CHECKED_FORMAT_PATTERNS,
    DATE_TIME_REGEX,
    FULL_DATE_REGEX,
    IPV4_REGEX,
    TIME_REGEX,
    check_enforceable,
    formats_as_patterns,
    map_patterns,
    map_subschemas,
)
import xgrammar as xgr

from agentserve.grammar.interface import CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher, bitmask_words
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo
from agentserve.grammar import utf8_tails
from agentserve.grammar.utf8_tails import invalid_after, utf8_tail

# JSON whitespace: at most one whitespace character between tokens (interface.JSON_WHITESPACE is
# "[ ]?"; xgrammar's bound applies to any of space, tab, newline).
_MAX_WS = 1




def _bounded_strings_as_patterns(schema: Any) -> Any:
    """Tool-call JSON with each length-bounded string as a pattern of characters a JSON string holds
    unescaped. xgrammar (0.2) lets raw control characters into a string with minLength/maxLength; JSON
    grammars refuse those tokens (_forbidden), but tool-call grammars must allow tab, LF and CR (text
    and whitespace around the calls), so '"a": ["\\t"]' with a raw tab came out. The pattern gives up
    escapes in those strings: a valid subset."""
    def fix(node: dict, path: str) -> dict:
        bounds = ("minLength", "maxLength")
        if node.get("type") != "string" or not any(b in node for b in bounds) or \
                any(k in node for k in ("pattern", "format", "enum", "const")):
            return node
        low, high = node.get("minLength", 0), node.get("maxLength", "")
        return {**{k: v for k, v in node.items() if k not in bounds},
                "pattern": f'^[^"\\\\\\x00-\\x1F]{{{low},{high}}}$'}

    return map_subschemas(schema, fix)


def to_structural_format(node: Any) -> dict:
    """A `structure` tree as an xgrammar structural-tag format."""
    if "seq" in node:  # xgrammar refuses an empty sequence: the empty text is an empty constant
        if not node["seq"]:
            return {"type": "const_string", "value": ""}
        return {"type": "sequence", "elements": [to_structural_format(n) for n in node["seq"]]}
    if "alt" in node:
        return {"type": "or", "elements": [to_structural_format(n) for n in node["alt"]]}
    if "star" in node:
        return {"type": "star", "content": to_structural_format(node["star"])}
    if "opt" in node:
        return {"type": "optional", "content": to_structural_format(node["opt"])}
    if "lit" in node:
        return {"type": "const_string", "value": node["lit"]}
    if "marker" in node:
        return {"type": "const_string", "value": node["marker"]}
    if "ws" in node:
        return {"type": "regex", "pattern": structure.ws_regex(node["ws"], node.get("max"))}
    if "json" in node:
        schema = _patterns_fixed(_bounded_strings_as_patterns(formats_as_patterns(_exclusive_one_of(node["json"]),
                                                                                  FORMAT_PATTERNS)))
        return {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": _MAX_WS}
    if "text" in node:
        return {"type": "regex", "pattern": structure.text_then_regex(node["text"])}
    if "regex" in node:
        return {"type": "regex", "pattern": node["regex"]}
    raise GrammarError(f"unknown structure node {sorted(node)}")


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, info: TokenizerInfo, matcher: Any, forbidden: np.ndarray,
                 forbidden_ids: frozenset[int]) -> None:
        super().__init__(info)
        self._m = matcher
        self._forbidden_neg = ~forbidden
        self._forbidden_ids = forbidden_ids
        # The incomplete UTF-8 character the output ends with, and what it was before each accepted
        # token (for rollback): xgrammar's own automaton lets invalid sequences through (utf8_tails).
        self._tail = b""
        self._tails: list[bytes] = []

    def _accept(self, token_id: int) -> bool:
        if token_id in self._forbidden_ids or token_id in invalid_after(self.tokenizer_info, self._tail)[1]:
            return False
        if not self._m.accept_token(token_id):
            return False
        self._tails.append(self._tail)
        self._tail = utf8_tail(self._tail, self.tokenizer_info.token_bytes[token_id])
        return True

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)
        words = bitmask.numpy()[row]
        words &= self._forbidden_neg
        words &= invalid_after(self.tokenizer_info, self._tail)[0]

    def _rollback(self, num_tokens: int) -> None:
        self._m.rollback(num_tokens)
        self._tail = self._tails[-num_tokens]
        del self._tails[-num_tokens:]

    def _copy(self) -> "XGrammarMatcher":
        other = XGrammarMatcher(self.tokenizer_info, self._m.fork(), ~self._forbidden_neg, self._forbidden_ids)
        other._tail, other._tails = self._tail, list(self._tails)
        return other

    def _is_accepting(self) -> bool:
        return bool(self._m.is_completed())

    def _cannot_continue(self) -> bool:
        bm = torch.zeros((1, bitmask_words(self.tokenizer_info.vocab_size)), dtype=torch.int32)
        self._fill(bm, 0)
        self._fix_eos(bm, 0, False)
        return not bool(bm.any())


def _forbidden(info: TokenizerInfo, kind: str) -> tuple[np.ndarray, frozenset[int]]:
    """Ids xgrammar must never get: padding and special tokens (except tool markers in tool
    grammars), and tokens with raw control characters where JSON is written. xgrammar (0.2) lets raw
    control characters into strings with minLength/maxLength, which is invalid JSON; JSON never needs
    them (strings escape them, and our whitespace policy is a single space), so JSON grammars
    refuse every token with a byte below 0x20 and tool grammars those other than tab/LF/CR. A regex,
    choice or grammar says itself which characters it takes (a multi-line choice or GBNF rule needs
    its newlines), so only the special tokens are taken from those."""
    tools = kind == "tool_calls"
    free_text = kind in ("tool_calls", "structural_tag")  # text around the structure has tabs and newlines
    writes_json = kind in ("json_schema", "json_object") or free_text

    def build() -> tuple[np.ndarray, frozenset[int]]:
        words = info.forbidden_words(allow_markers=tools).copy()
        bad_bytes = set(range(0x20)) - ({0x09, 0x0A, 0x0D} if free_text else set()) if writes_json else set()
        for i, b in enumerate(info.token_bytes):
            if any(c in bad_bytes for c in b) and i not in info.eos_token_ids:
                words[i >> 5] |= np.int32(np.uint32(1 << (i & 31)).view(np.int32))
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: info.vocab_size]
        return words, frozenset(int(i) for i in np.flatnonzero(bits))

    return info.cached(("xgrammar.forbidden", tools, free_text, writes_json), build)


# xgrammar's messages start with its log's time and C++ source line ("[12:23:42] /project/cpp/
# json_schema_converter.cc:3562: "): nothing a client can act on.
_SOURCE_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")

# Keywords xgrammar (0.2) compiles but does not enforce (random walks break them).
NOT_ENFORCED = frozenset({
    "uniqueItems", "allOf", "contains", "minContains", "maxContains", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "if", "then", "else", "not",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})


# xgrammar's ipv4 regex allows octets past 255 and leading zeros ("426.904.30.98", "07.22.091.30"), its
# date and date-time regexes days past the month's end ("4167-02-31"), its time a leap second at any
# minute ("10:47:60Z"): validators or Python's datetime refuse those. Its relative-json-pointer
# writes bare counts, and the idn formats it does not implement (schema_utils.CHECKED_FORMAT_PATTERNS).
FORMAT_PATTERNS = {"ipv4": f"^{IPV4_REGEX}$", "date": f"^{FULL_DATE_REGEX}$", "time": f"^{TIME_REGEX}$",
                   "date-time": f"^{DATE_TIME_REGEX}$", **CHECKED_FORMAT_PATTERNS}


def _bounded_optional_groups(pattern: str) -> str:
    """`(...)?` written `(...){0,1}`, the same language. xgrammar 0.2.9 compiles a JSON string's pattern
    `^a(\\.b+)?$` as if the group's first element were optional on its own ("ab" passed, and
    "912066695206" for `^[0-9]{2}(\\.[0-9]+)?$`, and a date-time's seconds went on in digits without a dot)
    wherever the group holds a repetition; `{0,1}` compiles right, as its regex and EBNF paths do."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
            out.append(c)
            i += 1
            for literal in ("^", "]"):  # '[^]...]' / '[]...]': that ']' is a member
                if pattern[i:i + 1] == literal:
                    out.append(literal)
                    i += 1
            continue
        elif c == ")" and pattern[i + 1:i + 2] == "?":
            out.append("){0,1}")
            i += 3 if pattern[i + 2:i + 3] == "?" else 2  # a lazy `??` matches the same strings
            continue
        out.append(c)
        i += 1
    return "".join(out)


_CONTROL_ESCAPES = "nrtfv0"


def _escaped_code(pattern: str, i: int) -> tuple[Optional[int], int]:
    """The code point a `\\x..` / `\\u....` escape at `i` spells (None if malformed) and its length."""
    width = 2 if pattern[i + 1] == "x" else 4
    digits = pattern[i + 2:i + 2 + width]
    if len(digits) == width and all(c in "0123456789abcdefABCDEF" for c in digits):
        return int(digits, 16), 2 + width
    return None, 2


def _json_escaped_literal(pattern: str) -> Optional[str]:
    """The first place where `pattern` spells a character a JSON string must escape ('"', a backslash; a control
    character outside a class): xgrammar writes those into the string unescaped, so `^C:\\\\[a-z]+$` came out
    as "C:\\nry" (a newline, not a backslash) and `^a"b$` as '"a"b"' (not JSON); a control character left
    no token to choose. None when there is none."""
    i, in_class, negated = 0, False, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            code, length = _escaped_code(pattern, i) if letter in "xu" else (None, 2)
            spells = letter if letter in '"\\' else (chr(code) if code is not None else "")
            if (spells in ('"', "\\") and not negated) or (not in_class and (
                    letter in _CONTROL_ESCAPES or (code is not None and code < 0x20))):
                return pattern[i:i + length]
            i += length
            continue
        if (c == '"' and not negated) or (ord(c) < 0x20 and not in_class):
            return c
        if c == "[" and not in_class:
            in_class, negated = True, pattern.startswith("[^", i)
        elif c == "]" and in_class:
            in_class = negated = False
        i += 1
    return None


def _xgrammar_pattern(pattern: str, path: str) -> str:
    """`pattern` through _bounded_optional_groups; GrammarError where it spells a character xgrammar would
    write unescaped (_json_escaped_literal)."""
    bad = _json_escaped_literal(pattern)
    if bad is not None:
        raise GrammarError(f"xgrammar cannot write {bad!r} of the pattern {pattern!r} (at {path or 'the root'}) "
                           "inside a JSON string: it writes the character unescaped; use grammar_backend llguidance")
    return _bounded_optional_groups(pattern)


def _patterns_fixed(schema: Any) -> Any:
    """Every `pattern` and `patternProperties` key through _xgrammar_pattern."""
    return map_patterns(schema, _xgrammar_pattern)


def _exclusive_one_of(schema: Any) -> Any:
    """xgrammar compiles `oneOf` as `anyOf`: exact where the branches exclude each other, which one_of.py
    proves for more unions (discriminated ones: a required `kind` of distinct consts) than the check's
    plain-type test; those are written as `anyOf`, so that the check below refuses only the others."""
    return one_of_as_any_of(schema, required_sets=False)


def _check_schema(schema: Any) -> None:
    """Reject what xgrammar would accept but not enforce (outputs could break the schema)."""
    check_enforceable(schema, "xgrammar", NOT_ENFORCED)

    def check(node: dict, path: str) -> dict:
        if ("pattern" in node or "format" in node) and ("minLength" in node or "maxLength" in node):
            raise GrammarError(f"xgrammar does not enforce minLength/maxLength together with "
                               f"pattern/format (at {path or 'the root'})")
        bounded = any(k in node for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))
        if bounded and "type" not in node:  # xgrammar reads the bounds only beside "type": "number" / "integer":
            # {"minimum": 5, "maximum": 6} wrote 7
            raise GrammarError(f"xgrammar enforces minimum / maximum only on a schema with \"type\": \"number\" or "
                               f"\"integer\" (at {path or 'the root'}): add the type, or use grammar_backend llguidance")
        if "multipleOf" in node and (node.get("type") != "integer" or bounded):  # "Warning: multipleOf is not
            # supported for type:number; ignoring multipleOf": 5.3404 came out of 0.5; beside a bound it is
            # dropped silently (5 for `"minimum": -9, "multipleOf": 2`)
            raise GrammarError(f"xgrammar does not enforce 'multipleOf' except on integers without bounds "
                               f"(at {path or 'the root'})")
        return node

    map_subschemas(schema, check)


class XGrammarGrammar(CompiledGrammar):
    def __init__(self, spec: ConstraintSpec, info: TokenizerInfo, compiled: Any) -> None:
        super().__init__(spec, info, "xgrammar")
        self._compiled = compiled
        self._forbidden, self._forbidden_ids = _forbidden(info, spec.kind)
        utf8_tails.build_all(info)

    def new_matcher(self) -> XGrammarMatcher:
        return XGrammarMatcher(self.tokenizer_info, xgr.GrammarMatcher(self._compiled),
                               self._forbidden, self._forbidden_ids)


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"
    # 0.5-3 MiB per schema on a 49k vocabulary; vLLM gives xgrammar's cache 512 MiB.
    cache_entries = 128

    def __init__(self, max_threads: int = 1) -> None:
        self.max_threads = max_threads

    def compiler(self, info: TokenizerInfo) -> Any:
        def build() -> Any:
            encoded = list(info.token_bytes)
            ti = xgr.TokenizerInfo(encoded, vocab_type=xgr.VocabType.RAW, vocab_size=info.vocab_size,
                                   stop_token_ids=list(info.eos_token_ids))
            return xgr.GrammarCompiler(ti, max_threads=self.max_threads, cache_enabled=False)

        return info.cached(("xgrammar.compiler", self.max_threads), build)

    def compile(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo) -> XGrammarGrammar:
        comp = self.compiler(tokenizer_info)
        try:
            if spec.kind == "json_schema":
                schema = _patterns_fixed(formats_as_patterns(_exclusive_one_of(json.loads(str(spec.payload))),
                                                             FORMAT_PATTERNS))
                _check_schema(schema)
                compiled = comp.compile_json_schema(json.dumps(schema), any_whitespace=True,
                                                    max_whitespace_cnt=_MAX_WS)
            elif spec.kind == "json_object":
                compiled = comp.compile_json_schema('{"type":"object"}', any_whitespace=True,
                                                    max_whitespace_cnt=_MAX_WS)
            elif spec.kind == "regex":
                compiled = comp.compile_regex(str(spec.payload))
            elif spec.kind == "grammar":
                compiled = comp.compile_grammar(str(spec.payload))  # GBNF / EBNF (`root ::= ...`)
            elif spec.kind == "choice":
                compiled = comp.compile_regex("(" + "|".join(structure.regex_escape(c) for c in spec.payload) + ")")
            elif spec.kind in ("tool_calls", "structural_tag"):
                tree = json.loads(str(spec.payload))["grammar"]
                for schema in structure.walk_json(tree):
                    _check_schema(_exclusive_one_of(schema))
                tag = {"type": "structural_tag", "format": to_structural_format(tree)}
                compiled = comp.compile_structural_tag(json.dumps(tag))
            else:
                raise GrammarError(f"xgrammar: unsupported constraint kind {spec.kind!r}")
        except GrammarError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own errors
            msg = str(e).strip().splitlines()
            reason = _SOURCE_PREFIX.sub("", msg[-1]) if msg else type(e).__name__
            raise GrammarError(f"xgrammar cannot compile {spec.kind}: {reason}") from None
        return XGrammarGrammar(spec, tokenizer_info, compiled)
