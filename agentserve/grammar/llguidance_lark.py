"""A `structure` tree (structure.py: tool calls, structural tags) as an llguidance Lark grammar."""

from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence

from agentserve.grammar import structure
from agentserve.grammar.interface import GrammarError
from agentserve.grammar.tokenizer_info import TokenizerInfo


def _lark_slashes(pattern: str) -> str:
    """The regex inside a Lark `/.../` literal: each unescaped slash escaped."""
    out, i = [], 0
    while i < len(pattern):
        if pattern[i] == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        out.append("\\/" if pattern[i] == "/" else pattern[i])
        i += 1
    return "".join(out)


class LarkWriter:
    """Translates a `structure` tree into an llguidance Lark grammar."""

    def __init__(self, lltok: Any, info: TokenizerInfo, added_texts: Sequence[str],
                 json_body: Callable[[dict], str]) -> None:
        self.lltok = lltok
        self.json_body = json_body  # a schema as the JSON after Lark's %json (the backend's rewrites applied)
        self.info = info
        self.added_texts = added_texts  # llguidance reads each of these only as its token, never as text
        self.rules: list[str] = []
        self.n = 0

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _special_token(self, marker: str) -> Optional[str]:
        tid = self.info.single_token_id(marker)
        if tid is not None and self.lltok.is_special_token(tid):
            return f"<[{tid}]>"
        return None

    def _before_added(self, text: str) -> tuple[str, str]:
        """`text` split before the first added token's text in it ("" when there is none)."""
        at = min((i for added in self.added_texts if (i := text.find(added)) >= 0), default=len(text))
        return text[:at], text[at:]

    def _literal(self, text: str) -> str:
        """Literal text as Lark: an added token's text as that token (llguidance never matches it as
        text), refused when the tokenizer marks it special (other backends never emit those)."""
        parts = []
        while text:
            head, text = self._before_added(text)
            if head:
                parts.append(json.dumps(head, ensure_ascii=False))
            if text:
                added = max((a for a in self.added_texts if text.startswith(a)), key=len)
                tid = self.info.single_token_id(added)
                if tid is None or tid in self.info.special_ids:
                    raise GrammarError(f"llguidance cannot write {added!r} as text: it is a special token of this "
                                       "tokenizer (use another grammar backend, or leave it out of the literal)")
                parts.append(f"<[{tid}]>")
                text = text[len(added):]
        return " ".join(parts) if parts else '""'

    def expr(self, node: Any) -> str:
        if "seq" in node:
            parts = [self.expr(n) for n in node["seq"]]
            return "(" + " ".join(parts) + ")" if parts else '""'
        if "alt" in node:
            return "(" + " | ".join(self.expr(n) for n in node["alt"]) + ")"
        if "star" in node:
            return f"({self.expr(node['star'])})*"
        if "opt" in node:
            return f"({self.expr(node['opt'])})?"
        if "lit" in node:
            return self._literal(node["lit"])
        if "marker" in node:
            return self._special_token(node["marker"]) or json.dumps(node["marker"], ensure_ascii=False)
        if "ws" in node:
            term = self._name("WS")
            self.rules.append(f"{term}: /{structure.ws_regex(node['ws'], node.get('max'))}/")
            return term
        if "json" in node:
            name = self._name("json")
            self.rules.append(f"{name}: %json {self.json_body(node['json'])}")
            return name
        if "text" in node:
            t = node["text"]
            rx = structure.text_regex(t)
            then = t.get("then")
            term = self._name("TEXT")
            if then and (tok := self._special_token(then)):
                self.rules.append(f"{term}: /{rx}/")
                return f"{term}? {tok}"
            if then_text := t.get("then_text"):
                head, tail = self._before_added(then_text)
                if tail:  # the trigger holds an added token: the text, then the trigger's parts
                    self.rules.append(f"{term}: /({rx}){structure.regex_escape(head)}/")
                    return (term if head else f"{term}?") + " " + self._literal(tail)
            if then or then_text:  # one lexeme up to (and including) the first occurrence of the trigger
                self.rules.append(f"{term}: /{structure.text_then_regex(t)}/")
                return term
            self.rules.append(f"{term}: /{rx}/")
            return f"{term}?"
        if "regex" in node:
            term = self._name("RX")
            self.rules.append(f"{term}: /{_lark_slashes(node['regex'])}/")
            return term  # a lexeme may match the empty string in llguidance
        raise GrammarError(f"unknown structure node {sorted(node)}")

    def grammar(self, node: Any) -> str:
        start = self.expr(node)
        return "\n".join(["%llguidance {}", f"start: {start}"] + self.rules) + "\n"
