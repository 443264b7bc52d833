"""Structural tags (vLLM's and SGLang's `structural_tag`, xgrammar's format objects) -> a `structure` tree.

A structural tag describes an output that is free text in places and constrained in others, e.g.
"any text; whenever `<function=` appears, a call `<function=NAME>{json}</function>` follows". Two
request shapes exist and both are read:

    {"type": "structural_tag", "structures": [{"begin", "schema", "end"}, ...], "triggers": [...]}
        vLLM's first form (SGLang's too): free text, and each trigger starts one of the structures
        whose begin starts with it; after its end, free text again.
    {"type": "structural_tag", "format": {...}}
        xgrammar's format objects: const_string, json_schema, regex, any_text, sequence, or,
        optional, plus, star, repeat, tag, triggered_tags, tags_with_separator.

Every backend compiles the tree (structure.py), so a structural tag works with llguidance, xgrammar and
outlines alike. Begin, end and trigger strings are text (no special-token spelling), as vLLM gives them
to xgrammar. What the tree cannot state is refused naming its place: EBNF `grammar` content, token-level
formats, `dispatch`, non-JSON `style`s, `any_text` length budgets, JSON keywords no backend enforces.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Union

from agentserve.grammar.closed_objects import close_objects
from agentserve.grammar.draft4_bounds import numeric_exclusive_bounds
from agentserve.grammar.interface import GrammarError, canonical_json
from agentserve.grammar.recent_results import RecentResults
from agentserve.grammar.unenforced_keywords import exact_forms, refuse_unenforced

_FREE_TEXT = ("any_text", "triggered_tags")  # formats whose extent is up to what follows them
# A request's tree is compiled by every request that sends it: bounded so one cannot stall the compiler.
MAX_NODES = 2000
MAX_REPEAT = 32  # `repeat` is unrolled: at most this many copies of its content

_SUPPORTED = ("const_string", "json_schema", "regex", "any_text", "sequence", "or", "optional", "plus", "star",
              "repeat", "tag", "triggered_tags", "tags_with_separator")
_NOT_SUPPORTED = {
    "grammar": "EBNF content inside a structural tag is not supported (send the whole output as a grammar instead)",
    "qwen_xml_parameter": "Qwen XML parameters are not supported (use json_schema content)",
    "dispatch": "dispatch is not supported (use triggered_tags)",
    "token": "token-level formats are not supported (begin / end / triggers are matched as text)",
    "exclude_token": "token-level formats are not supported",
    "any_tokens": "token-level formats are not supported (use any_text)",
    "token_triggered_tags": "token-level formats are not supported (use triggered_tags)",
    "token_dispatch": "token-level formats are not supported",
}


# The payloads of the last distinct tags: the edge checks a tag (its 400 / INVALID_ARGUMENT names the
# field) and the engine builds it again, and agent loops resend the same tag every turn.
_RECENT_PAYLOADS: RecentResults[str] = RecentResults(capacity=64)


def structural_tag_payload(tag: Union[str, dict], where: str = "structural_tag") -> str:
    """The canonical JSON payload of a "structural_tag" constraint: {"grammar": structure tree}. `where`
    names the field in errors only (the tree does not depend on it), so a kept payload serves any field."""
    return _RECENT_PAYLOADS.get_or_build(tag, lambda: canonical_json({"grammar": structural_tag_tree(tag, where)}))


def structural_tag_tree(tag: Union[str, dict], where: str = "structural_tag") -> dict:
    """The `structure` tree of a structural tag given as a dict or its JSON text (either request shape)."""
    if isinstance(tag, str):
        try:
            tag = json.loads(tag)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(tag, dict):
        raise GrammarError(f"{where} must be an object, got {type(tag).__name__}")
    kind = tag.get("type", "structural_tag")
    if kind != "structural_tag":
        raise GrammarError(f"{where}.type must be 'structural_tag', got {kind!r}")
    builder = _Builder()
    if "format" in tag:
        _no_extra(tag, ("type", "format"), where)
        return builder.format(tag["format"], f"{where}.format", None)
    if "structures" in tag or "triggers" in tag:
        _no_extra(tag, ("type", "structures", "triggers"), where)
        return builder.format(_legacy_as_triggered_tags(tag, where), where, None)
    raise GrammarError(f"{where} needs 'format' (xgrammar's format objects) or 'structures' and 'triggers'")


def _legacy_as_triggered_tags(tag: dict, where: str) -> dict:
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(structures, list) or not structures:
        raise GrammarError(f"{where}.structures must be a non-empty list of {{begin, schema, end}} objects")
    tags = []
    for i, s in enumerate(structures):
        if not isinstance(s, dict):
            raise GrammarError(f"{where}.structures[{i}] must be an object with begin, schema and end")
        _no_extra(s, ("begin", "schema", "end"), f"{where}.structures[{i}]")
        schema = s.get("schema", {})  # vLLM's schema is optional: any JSON value then
        tags.append({"type": "tag", "begin": s.get("begin"), "end": s.get("end"),
                     "content": {"type": "json_schema", "json_schema": {} if schema is None else schema}})
    return {"type": "triggered_tags", "triggers": triggers, "tags": tags}


def _no_extra(obj: dict, known: tuple[str, ...], where: str) -> None:
    extra = [k for k in obj if k not in known]
    if extra:
        raise GrammarError(f"{where}: unknown field {extra[0]!r} (expected {', '.join(known)})")


def _string(obj: dict, key: str, where: str, empty_ok: bool = False) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or (not value and not empty_ok):
        raise GrammarError(f"{where}.{key} must be a {'' if empty_ok else 'non-empty '}string")
    return value


def _strings(obj: dict, key: str, where: str, required: bool) -> list[str]:
    value = obj.get(key, None if required else [])
    if not isinstance(value, list) or (required and not value) or \
            not all(isinstance(v, str) and v for v in value):
        raise GrammarError(f"{where}.{key} must be a {'non-empty ' if required else ''}list of non-empty strings")
    return list(dict.fromkeys(value))


def _flag(obj: dict, key: str, where: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise GrammarError(f"{where}.{key} must be true or false")
    return value


def _lit(text: str) -> dict:
    return {"lit": text} if text else {"seq": []}


def _ends_node(ends: list[str]) -> dict:
    return _lit(ends[0]) if len(ends) == 1 else {"alt": [_lit(e) for e in ends]}


def _schema(value: Any, where: str) -> dict:
    """The schema as a JSON constraint reads it (ConstraintSpec.json_schema), keywords no backend enforces
    refused with their place."""
    if value is True:
        value = {}
    if not isinstance(value, dict):
        raise GrammarError(f"{where} must be a JSON schema object")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"{where} is not JSON-serializable: {e}") from None
    schema = exact_forms(numeric_exclusive_bounds(value, where))
    refuse_unenforced(schema, where)
    return close_objects(schema)


class _Builder:
    """Translates format objects into `structure` nodes. `ends` (a list of end strings, or None): the
    node is the content of a tag and must be followed by one of them; free text there stops at the end
    (xgrammar's rule: an unlimited format inside a tag ends where the tag's end begins). `stop`: the
    ends of the innermost enclosing tag, which no free text inside it may contain anywhere (else the
    tag's end would be text, and where the tag ends would be a guess)."""

    def __init__(self) -> None:
        self.nodes = 0

    def format(self, fmt: Any, where: str, ends: Optional[list[str]], stop: tuple[str, ...] = (),
               tail: bool = True) -> dict:
        """`tail`: nothing follows the node before its tag's end or the output's (free text may stand only
        there, or before a constant that it stops at)."""
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise GrammarError(f"{where}: the structural tag has more than {MAX_NODES} format objects")
        if not isinstance(fmt, dict):
            raise GrammarError(f"{where} must be a format object ({{\"type\": ...}})")
        kind = fmt.get("type")
        if kind in _NOT_SUPPORTED:
            raise GrammarError(f"{where}.type {kind!r}: {_NOT_SUPPORTED[kind]}")
        if kind not in _SUPPORTED:
            raise GrammarError(f"{where}.type must be one of {', '.join(_SUPPORTED)}, got {kind!r}")
        if ends is not None:
            stop = tuple(dict.fromkeys(stop + tuple(ends)))
        if kind in _FREE_TEXT:
            if ends is None and not tail:  # "any text, then JSON": no place where the text must end
                raise GrammarError(f"{where}: {kind} must end its tag or the output, or be followed by a "
                                   "const_string, where it stops")
            build = self._any_text if kind == "any_text" else self._triggered_tags
            return build(fmt, where, ends, stop)
        if kind == "sequence":
            return self._sequence(fmt, where, ends, stop, tail)
        if kind == "or":
            return {"alt": [self.format(e, f"{where}.elements[{i}]", ends, stop, tail)
                            for i, e in enumerate(self._elements(fmt, where))]}
        if kind == "optional":
            _no_extra(fmt, ("type", "content"), where)
            inner = self.format(fmt.get("content"), f"{where}.content", ends, stop, tail)
            return {"opt": inner} if ends is None else {"alt": [inner, _ends_node(ends)]}
        node = self._closed(fmt, kind, where, stop)
        return node if ends is None else {"seq": [node, _ends_node(ends)]}

    def _sequence(self, fmt: dict, where: str, ends: Optional[list[str]], stop: tuple[str, ...],
                  tail: bool) -> dict:
        """The elements in order; free text followed by a constant stops at its first occurrence (the two
        read as one), and only the last element meets the enclosing end."""
        elements = self._elements(fmt, where)
        parts: list[dict] = []
        i, ended = 0, False
        while i < len(elements):
            element, at, last = elements[i], f"{where}.elements[{i}]", i == len(elements) - 1
            follower = None if last else elements[i + 1]
            if isinstance(element, dict) and element.get("type") in _FREE_TEXT and isinstance(follower, dict) \
                    and follower.get("type") == "const_string" and isinstance(follower.get("value"), str) \
                    and follower["value"]:
                _no_extra(follower, ("type", "value"), f"{where}.elements[{i + 1}]")
                self.nodes += 1
                parts.append(self.format(element, at, [follower["value"]], stop))
                ended, i = False, i + 2
                continue
            parts.append(self.format(element, at, ends if last else None, stop, tail and last))
            ended, i = ends is not None and last, i + 1
        if ends is not None and not ended:  # the last element, a constant, was read with the text before it
            parts.append(_ends_node(ends))
        return {"seq": parts}

    def _closed(self, fmt: dict, kind: str, where: str, stop: tuple[str, ...]) -> dict:
        """A format whose extent does not depend on what follows it."""
        if kind == "const_string":
            _no_extra(fmt, ("type", "value"), where)
            return _lit(_string(fmt, "value", where, empty_ok=True))
        if kind == "json_schema":
            _no_extra(fmt, ("type", "json_schema", "style", "any_order"), where)
            if fmt.get("style", "json") != "json":
                raise GrammarError(f"{where}.style {fmt['style']!r} is not supported (only 'json')")
            if fmt.get("any_order", False) is not False:
                raise GrammarError(f"{where}.any_order is not supported (properties come in their declared order)")
            return {"json": _schema(fmt.get("json_schema"), f"{where}.json_schema")}
        if kind == "regex":
            _no_extra(fmt, ("type", "pattern"), where)
            return {"regex": _string(fmt, "pattern", where)}
        if kind in ("plus", "star"):  # a repetition: the next one may follow, so nothing in it is last
            _no_extra(fmt, ("type", "content"), where)
            inner = self.format(fmt.get("content"), f"{where}.content", None, stop, tail=False)
            return {"star": inner} if kind == "star" else {"seq": [inner, {"star": inner}]}
        if kind == "repeat":
            return self._repeat(fmt, where, stop)
        if kind == "tag":
            return self._tag(fmt, where)
        return self._tags_with_separator(fmt, where)

    def _elements(self, fmt: dict, where: str) -> list:
        _no_extra(fmt, ("type", "elements"), where)
        elements = fmt.get("elements")
        if not isinstance(elements, list) or not elements:
            raise GrammarError(f"{where}.elements must be a non-empty list of format objects")
        return elements

    def _repeat(self, fmt: dict, where: str, stop: tuple[str, ...]) -> dict:
        _no_extra(fmt, ("type", "min", "max", "content"), where)
        low, high = fmt.get("min"), fmt.get("max")
        if not isinstance(low, int) or isinstance(low, bool) or low < 0:
            raise GrammarError(f"{where}.min must be a non-negative integer")
        if not isinstance(high, int) or isinstance(high, bool) or (high != -1 and high < low):
            raise GrammarError(f"{where}.max must be an integer >= min, or -1 (unbounded)")
        if max(low, high) > MAX_REPEAT:
            raise GrammarError(f"{where}: min and max may be at most {MAX_REPEAT} (or max -1, unbounded)")
        inner = self.format(fmt.get("content"), f"{where}.content", None, stop, tail=False)
        optional: dict = {"star": inner}
        if high != -1:
            optional = {"seq": []}
            for _ in range(high - low):  # nested, so that "2 of at most 3" has one parse
                optional = {"opt": {"seq": [inner, optional]}}
        return {"seq": [inner] * low + [optional]}

    def _tag(self, fmt: dict, where: str) -> dict:
        _no_extra(fmt, ("type", "begin", "content", "end"), where)
        begin = _string(fmt, "begin", where)
        end = fmt.get("end")
        ends = [end] if isinstance(end, str) else end
        if not isinstance(ends, list) or not ends or not all(isinstance(e, str) for e in ends):
            raise GrammarError(f"{where}.end must be a string or a non-empty list of strings (token ends are not "
                               "supported)")
        return {"seq": [_lit(begin), self.format(fmt.get("content"), f"{where}.content", list(dict.fromkeys(ends)))]}

    def _tags(self, fmt: dict, where: str) -> list[tuple[str, dict]]:
        tags = fmt.get("tags")
        if not isinstance(tags, list) or not tags:
            raise GrammarError(f"{where}.tags must be a non-empty list of tag objects")
        out = []
        for i, tag in enumerate(tags):
            if not isinstance(tag, dict) or tag.get("type", "tag") != "tag":
                raise GrammarError(f"{where}.tags[{i}] must be a tag object ({{\"type\": \"tag\", begin, content, end}})")
            out.append((_string(tag, "begin", f"{where}.tags[{i}]"), self._tag({"type": "tag", **tag},
                                                                                f"{where}.tags[{i}]")))
        return out

    def _any_text(self, fmt: dict, where: str, ends: Optional[list[str]], stop: tuple[str, ...]) -> dict:
        _no_extra(fmt, ("type", "excludes", "max_tokens", "max_chars"), where)
        for budget in ("max_tokens", "max_chars"):
            if fmt.get(budget) is not None:
                raise GrammarError(f"{where}.{budget} is not supported (use max_tokens on the request)")
        excludes = _strings(fmt, "excludes", where, required=False)
        return _free_text(excludes + list(stop), ends)

    def _triggered_tags(self, fmt: dict, where: str, ends: Optional[list[str]], stop: tuple[str, ...]) -> dict:
        _no_extra(fmt, ("type", "triggers", "tags", "at_least_one", "stop_after_first", "excludes"), where)
        triggers = _strings(fmt, "triggers", where, required=True)
        excludes = _strings(fmt, "excludes", where, required=False)
        at_least_one, first_only = _flag(fmt, "at_least_one", where), _flag(fmt, "stop_after_first", where)
        tags = self._tags(fmt, where)
        by_trigger: dict[str, list[dict]] = {t: [] for t in triggers}
        for i, (begin, node) in enumerate(tags):
            starts = [t for t in triggers if begin.startswith(t)]
            if len(starts) != 1:
                raise GrammarError(f"{where}.tags[{i}].begin {begin!r} must start with exactly one of the triggers "
                                   f"{triggers} (it starts with {len(starts)})")
            # the trigger ends the free text (one lexeme with it); the tag continues after the trigger
            rest = dict(node, seq=[_lit(begin[len(starts[0]):])] + node["seq"][1:])
            by_trigger[starts[0]].append(rest)
        used = [t for t in triggers if by_trigger[t]]
        words = list(dict.fromkeys(triggers + excludes + list(stop)))  # what free text here never holds

        def call_after_text() -> dict:
            return {"alt": [{"seq": [{"text": {"exclude": words, "then_text": t}}, {"alt": by_trigger[t]}]}
                            for t in used]}

        whole_tag = {"alt": [node for _, node in tags]}
        tail = _free_text(words, ends)  # the text after the last tag (and the tag's end, inside a tag)
        if at_least_one:
            more = [] if first_only else [{"star": call_after_text()}]
            return {"seq": [whole_tag] + more + [tail if not first_only else _after(ends)]}
        if first_only:
            return {"alt": [tail, {"seq": [call_after_text(), _after(ends)]}]}
        return {"seq": [{"star": call_after_text()}, tail]}

    def _tags_with_separator(self, fmt: dict, where: str) -> dict:
        _no_extra(fmt, ("type", "tags", "separator", "at_least_one", "stop_after_first"), where)
        separator = _string(fmt, "separator", where, empty_ok=True)
        at_least_one, first_only = _flag(fmt, "at_least_one", where), _flag(fmt, "stop_after_first", where)
        one = {"alt": [node for _, node in self._tags(fmt, where)]}
        some = one if first_only else {"seq": [one, {"star": {"seq": [_lit(separator), one]}}]}
        return some if at_least_one else {"opt": some}


def _after(ends: Optional[list[str]]) -> dict:
    return {"seq": []} if ends is None else _ends_node(ends)


def _free_text(excludes: list[str], ends: Optional[list[str]]) -> dict:
    """Text containing none of `excludes`; inside a tag, up to and including the first of its `ends`."""
    if ends is None:
        return {"text": {"exclude": excludes}}
    stop = list(dict.fromkeys(excludes + ends))
    texts = [{"text": {"exclude": stop, "then_text": e}} for e in ends]
    return texts[0] if len(texts) == 1 else {"alt": texts}
