"""outlines-core backend: everything becomes one regex, compiled to a token-level DFA (`Index`).

JSON schemas go through outlines-core's JSON-schema-to-regex; tool-call structures through
`structure.to_regex`. The Index is the compiled grammar (immutable, shared); a matcher is a
`Guide` over it, which keeps a bounded history of states for rollback and is cloned by copy.

Compiling a large schema can take seconds to minutes (the DFA of the whole schema regex against
the whole vocabulary), which is why compiles run off the step loop with a time limit.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch

from agentserve.grammar import structure
from agentserve.grammar.outlines_patterns import ascii_class_escapes, json_string_pattern, whole_string_pattern
from agentserve.grammar.one_of import one_of_as_any_of
from agentserve.grammar.schema_utils import (
    CHECKED_FORMAT_PATTERNS,
    DATE_TIME_REGEX,
    EMAIL_REGEX,
    FULL_DATE_REGEX,
    IPV4_REGEX,
    IPV6_REGEX,
    TIME_REGEX,
    check_enforceable,
    formats_as_patterns,
    map_subschemas,
    strip_formats,
)
import outlines_core
from outlines_core.json_schema import URI, build_regex_from_schema

from agentserve.grammar.interface import JSON_WHITESPACE, CompiledGrammar, GrammarBackend, GrammarError, GrammarMatcher
from agentserve.grammar.spec import ConstraintSpec
from agentserve.grammar.tokenizer_info import TokenizerInfo

# outlines-core 0.2 does not explore transitions out of a final state into a non-final one (after
# "a", `a|axb` allows only EOS; `(xb)*` allows nothing but EOS). So the regex we compile is
# `(R)END`, where END is a character only the EOS token can produce: no state of R is final, and
# "R is complete" is "the EOS token (spelling END) may follow". END is U+10FFFF; tokens containing
# its lead byte 0xF4 (plane-16 private use characters) are left out of the vocabulary.
_END = "\U0010FFFF"
_END_LEAD = 0xF4

# Tokens a matcher can roll back (speculative drafts are a handful; jump-forward a few dozen).
MAX_ROLLBACK = 512


# String formats outlines-core translates; others are dropped (annotations) instead of failing.
FORMATS = frozenset({"date-time", "date", "time", "uuid", "uri", "email"})


# Formats written as a `pattern` of ours in their place (then made JSON-safe like any pattern): dates
# with each month's own last day (its regex allowed "4167-02-31"), ipv4 and ipv6 (not translated: any string);
# outlines-core's date-time and time regexes have no UTC offset, which RFC 3339 requires, and a year of
# any length ("5048653648271310837813009467045489276673-02-08T05:19:12Z"); its uri regex's negated
# classes let a raw '"' or control character into the string (10 of 11 finished outputs were invalid
# JSON), and its email regex allows a quoted local part ('"a b"@c.d') whose quotes end the JSON string.
FORMAT_PATTERNS = {
    "time": f"^{TIME_REGEX}$",
    "date-time": f"^{DATE_TIME_REGEX}$",
    "date": f"^{FULL_DATE_REGEX}$",
    "ipv4": f"^{IPV4_REGEX}$",
    "ipv6": f"^{IPV6_REGEX}$",
    "uri": f"^{URI[1:-1]}$",  # outlines-core's, without the quotes it writes around a string's regex
    "email": f"^{EMAIL_REGEX}$",
    **CHECKED_FORMAT_PATTERNS,
}


def _json_safe_patterns(schema: Any) -> Any:
    """`schema` with each string `pattern` limited to what a JSON string holds unescaped (outlines_patterns)."""
    def fix(node: dict, path: str) -> dict:
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            where = f"{path}.pattern" if path else "pattern"
            if "minLength" in node or "maxLength" in node:  # outlines-core writes the length, not the pattern
                raise GrammarError(f"outlines does not enforce minLength/maxLength together with a pattern or "
                                   f"format (at {path or 'the root'}); use grammar_backend llguidance")
            node = {**node, "pattern": whole_string_pattern(json_string_pattern(pattern, where))}
        return node

    return map_subschemas(schema, fix)


def _check_object_keys(schema: Any) -> None:
    """GrammarError for an object key (a property name, a key of a const or enum object) holding '"' or a
    backslash: outlines-core writes keys without escaping those ('{"a"b": 1}' for the property 'a"b', invalid
    JSON; 'a\\b' became a regex word boundary and failed with a message about DFAs)."""
    def check_value(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if '"' in key or "\\" in key:
                    raise GrammarError(f"outlines cannot write the object key {key!r} (at {where}): outlines-core does "
                                       "not escape '\"' or '\\' in keys; use grammar_backend llguidance or xgrammar")
                check_value(item, where)
        elif isinstance(value, list):
            for item in value:
                check_value(item, where)

    def check(node: dict, path: str) -> dict:
        if isinstance(node.get("properties"), dict):
            check_value({name: None for name in node["properties"]}, f"{path}.properties" if path else "properties")
        for keyword in ("const", "enum"):
            if keyword in node:
                check_value(node[keyword], f"{path}.{keyword}" if path else keyword)
        return node

    map_subschemas(schema, check)


# Keywords outlines-core (0.2) compiles but does not enforce (random walks break them).
NOT_ENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems",
    "minProperties", "maxProperties", "allOf", "contains", "minContains", "maxContains", "propertyNames",
    "dependentRequired", "dependentSchemas", "dependencies", "if", "then", "else", "not",
    "unevaluatedProperties", "unevaluatedItems", "$dynamicRef", "$recursiveRef",
})


# outlines-core expands recursive references ("$ref": "#", cycles through $defs) this many levels deep
# (its default), each level a copy of the whole regex at every place the reference is used. The size
# grows geometrically: the sample's Github_medium/o33692 (18 optional properties, an array of itself)
# is 3.8 MB at depth 0, 61 MB at 1, 974 MB at 2 and ~15 GB at 3; building it took the server's memory
# until the OS killed the process, and a compile thread cannot be stopped at its time limit.
RECURSION_DEPTH = 3
# Regexes larger than this are refused before outlines-core builds them (or their token index): the
# largest that compiled over the sample was 0.86 MB (14 s on 2 cores); all from 1.7 MB on timed out.
MAX_REGEX_CHARS = 4_000_000


# A subschema that constrains nothing ({}, or annotations only) becomes this: outlines-core 0.2 writes
# `{}` as an alternation it does not group, so an optional property of that schema let the object go on
# with any bare value (`{"a":truenull}`) and never with the property itself. The type list is grouped.
ANY_VALUE = {"type": ["object", "array", "string", "number", "boolean", "null"]}
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "$schema", "$id", "deprecated",
                          "readOnly", "writeOnly"})


def _typed_any(schema: Any) -> Any:
    """`schema` with each subschema that allows any value spelled as ANY_VALUE."""
    def fix(node: dict, path: str) -> dict:
        return {**node, **ANY_VALUE} if set(node) <= _ANNOTATIONS else node

    return map_subschemas(schema, fix)


def _build_regex(text: str, depth: int) -> str:
    try:
        return build_regex_from_schema(text, whitespace_pattern=JSON_WHITESPACE, max_recursion_depth=depth)
    except Exception as e:  # outlines-core raises ValueError/TypeError/RuntimeError variants
        raise GrammarError(f"outlines cannot translate the JSON schema: {e}") from None


def _too_large(size: float, what: str) -> GrammarError:
    return GrammarError(f"outlines cannot compile this JSON schema: its regex{what} would be {size / 1e6:,.1f} MB "
                        f"(limit {MAX_REGEX_CHARS / 1e6:g} MB); use grammar_backend llguidance, which "
                        "does not expand the schema into one regex")


def _pointer(root: Any, ref: str) -> Any:
    """The subschema a local reference ("#", "#/definitions/a~1b") names, or None."""
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        return None  # an anchor ("#name"): not followed
    node = root
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _refs_in(node: Any) -> set[str]:
    """The local references in a subschema, not followed."""
    if isinstance(node, dict):
        own = {node["$ref"]} if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#") else set()
        return own.union(*(_refs_in(v) for v in node.values()))
    return set().union(*(_refs_in(v) for v in node)) if isinstance(node, list) else set()


def _cyclic_refs(schema: Any) -> set[str]:
    """The references that lead back to themselves: the ones outlines-core expands only so deep."""
    edges: dict[str, set[str]] = {}
    todo = list(_refs_in(schema))
    while todo:
        ref = todo.pop()
        if ref not in edges:
            edges[ref] = _refs_in(_pointer(schema, ref))
            todo += edges[ref]

    def reaches(start: str) -> bool:
        seen, stack = set(), list(edges[start])
        while stack:
            ref = stack.pop()
            if ref == start:
                return True
            if ref not in seen:
                seen.add(ref)
                stack += edges.get(ref, ())
        return False

    return {ref for ref in edges if reaches(ref)}


def _required_through_recursion(schema: Any) -> list[str]:
    """Paths of required properties that hold a reference leading back to itself. At its recursion depth
    outlines-core writes the referenced object without such properties: an optional one is simply absent there,
    but a required one leaves the object missing it, after a dangling comma (`{"label": "a", }`): output that
    breaks the schema."""
    cyclic = _cyclic_refs(schema)
    found: list[str] = []

    def visit(node: dict, path: str) -> dict:
        properties = node.get("properties")
        for name in node.get("required") or []:
            if isinstance(properties, dict) and isinstance(name, str) and _refs_in(properties.get(name)) & cyclic:
                found.append(f"{path}.properties.{name}" if path else f"properties.{name}")
        return node

    if cyclic:
        map_subschemas(schema, visit)
    return found


def schema_to_regex(schema: Any) -> str:
    """The schema's regex, sized before it is built: depth 0 first, then, when the schema refers to
    itself (depth 1 differs), the growth per level predicts the size at RECURSION_DEPTH."""
    if isinstance(schema, str):
        schema = json.loads(schema)
    schema = one_of_as_any_of(schema, required_sets=False)  # outlines writes oneOf as anyOf: exact only if exclusive
    check_enforceable(schema, "outlines", NOT_ENFORCED)
    _check_object_keys(schema)
    text = json.dumps(_typed_any(_json_safe_patterns(strip_formats(formats_as_patterns(schema, FORMAT_PATTERNS), FORMATS))))
    regex = _build_regex(text, 0)
    if len(regex) > MAX_REGEX_CHARS:
        raise _too_large(len(regex), "")
    if "$ref" not in text:
        return regex
    deeper = _build_regex(text, 1)
    if deeper == regex:  # no recursion: every depth gives the same regex
        return regex
    required = _required_through_recursion(schema)
    if required:
        raise GrammarError(f"outlines cannot enforce this recursive JSON schema: the required property at {required[0]} "
                           f"refers back into the schema, and at its recursion depth ({RECURSION_DEPTH}) outlines-core "
                           "writes objects without it; use grammar_backend llguidance or xgrammar")
    estimate = len(deeper) * (len(deeper) / len(regex)) ** (RECURSION_DEPTH - 1)
    if estimate > MAX_REGEX_CHARS:
        raise _too_large(estimate, f" (its recursive references expanded {RECURSION_DEPTH} levels deep)")
    return _build_regex(text, RECURSION_DEPTH)


class OutlinesMatcher(GrammarMatcher):
    def __init__(self, info: TokenizerInfo, guide: Any, index: Any) -> None:
        super().__init__(info)
        self._g = guide
        self._index = index
        self._eos = info.eos_token_ids[0]

    def _accept(self, token_id: int) -> bool:
        try:
            self._g.advance(token_id, return_tokens=False)
        except ValueError:
            return False
        return True

    def _fill(self, bitmask: torch.Tensor, row: int) -> None:
        r = bitmask[row]
        if not r.is_contiguous():
            raise ValueError("bitmask rows must be contiguous")
        self._g.write_mask_into(r.data_ptr(), r.numel(), r.element_size())

    def _rollback(self, num_tokens: int) -> None:
        if num_tokens > self._g.get_allowed_rollback():
            raise ValueError(f"outlines: cannot roll back {num_tokens} tokens "
                             f"(history holds {self._g.get_allowed_rollback()})")
        self._g.rollback_state(num_tokens)

    def _copy(self) -> "OutlinesMatcher":
        return OutlinesMatcher(self.tokenizer_info, copy.copy(self._g), self._index)

    def _is_accepting(self) -> bool:
        # END may also be an ordinary character inside a JSON string: accepting means END leads
        # to the final state, not merely that it is allowed.
        nxt = self._index.get_next_state(self._g.get_state(), self._eos)
        return nxt is not None and self._index.is_final_state(nxt)

    def _cannot_continue(self) -> bool:
        # END only ever leads to the final state here (is_accepting() held): nothing else allowed
        return all(t == self._eos for t in self._g.get_tokens())


class OutlinesGrammar(CompiledGrammar):
    def __init__(self, spec: ConstraintSpec, info: TokenizerInfo, index: Any, regex: str) -> None:
        super().__init__(spec, info, "outlines")
        self.index = index
        self.regex = regex

    def new_matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self.tokenizer_info, outlines_core.Guide(self.index, max_rollback=MAX_ROLLBACK),
                               self.index)


class OutlinesBackend(GrammarBackend):
    name = "outlines"
    # an index holds a state table over the whole vocabulary: ~38 MiB per 12-field schema on SmolLM2's 49k
    # tokens (more on a 128k vocabulary); vLLM keeps 128 outlines entries.
    cache_entries = 32

    def vocabulary(self, info: TokenizerInfo, with_markers: bool) -> Any:
        """outlines-core Vocabulary: every non-special token (plus the tool markers, for tool
        grammars) by its bytes, and the first EOS id spelling the END character (see _END)."""

        def build() -> Any:
            skip = set(info.special_ids) | set(info.eos_token_ids)
            if with_markers:
                skip -= info.marker_ids()
            skip |= set(info.eos_token_ids)
            entries: dict[bytes, list[int]] = {}
            for i, b in enumerate(info.token_bytes):
                if b and i not in skip and _END_LEAD not in b:
                    entries.setdefault(b, []).append(i)
            entries[_END.encode("utf-8")] = [info.eos_token_ids[0]]
            used = {i for ids in entries.values() for i in ids}
            # outlines' own EOS id only loops on the state after END, which matchers never enter
            spare = next((i for i in sorted(info.special_ids) if i not in used),
                         info.tokenizer_vocab_size if info.vocab_size > info.tokenizer_vocab_size else None)
            if spare is None:
                raise GrammarError("outlines: the tokenizer has no spare token id for outlines' EOS")
            return outlines_core.Vocabulary(spare, entries)

        return info.cached(("outlines.vocabulary", with_markers), build)

    def regex_for(self, spec: ConstraintSpec) -> str:
        if spec.kind == "json_schema":
            return schema_to_regex(spec.payload)
        if spec.kind == "json_object":
            return schema_to_regex('{"type":"object"}')
        if spec.kind == "regex":
            return str(spec.payload)
        if spec.kind == "choice":
            return "(" + "|".join(structure.regex_escape(c) for c in spec.payload) + ")"
        if spec.kind in ("tool_calls", "structural_tag"):
            return structure.to_regex(json.loads(str(spec.payload))["grammar"], schema_to_regex)
        if spec.kind == "grammar":
            raise GrammarError("grammar (a context-free grammar) is not supported by the outlines backend, which "
                               "compiles regular languages only; use grammar_backend llguidance or xgrammar")
        raise GrammarError(f"outlines: unsupported constraint kind {spec.kind!r}")

    def compile(self, spec: ConstraintSpec, tokenizer_info: TokenizerInfo) -> OutlinesGrammar:
        regex = ascii_class_escapes(self.regex_for(spec))
        vocab = self.vocabulary(tokenizer_info, with_markers=spec.kind == "tool_calls")
        try:
            index = outlines_core.Index(f"({regex}){_END}", vocab)
        except Exception as e:
            raise GrammarError(f"outlines cannot compile {spec.kind}: {e}") from None
        return OutlinesGrammar(spec, tokenizer_info, index, regex)
