"""A small structural grammar, the common form of tool-call constraints across backends.

Tool-call outputs are "free text, then a marker, then JSON, then ...": more than a JSON schema
and more than a regex. `tools.build_tool_constraint` writes them as a tree of these JSON nodes,
which each backend translates to what it speaks (Lark for llguidance, a structural tag for
xgrammar, one regex for outlines-core):

    {"seq": [node, ...]}            concatenation
    {"alt": [node, ...]}            alternatives
    {"star": node} / {"opt": node}  zero or more / zero or one
    {"lit": "text"}                 literal text
    {"ws": " \n", "max": 2}         up to `max` (default unbounded) of these whitespace characters
    {"marker": "<tool_call>"}       a format marker; a single (special) token when the tokenizer
                                    has one, else its text
    {"json": {...schema...}}        a JSON value valid against the schema
    {"text": {"exclude": [...], "lead_ws": " \n", "not_start": "{", "then": "<tool_call>" | null}}
                                    free text that contains none of `exclude` and whose first
                                    character after optional leading `lead_ws` characters is not
                                    in `not_start`, followed by the marker `then` (when given)
    {"text": {..., "then_text": "<function="}}
                                    the same followed by literal text (never a special token): the
                                    trigger of a structural tag (structural_tag.py)
    {"regex": "[A-Z]{3}"}           text matching the regex

The "text" node is the free-text-until-trigger part of tool_choice="auto": because the text can
never contain the trigger, the first trigger always starts a call, and the grammar and the
tool-call parser agree on where calls are.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Optional

_META = set("\\.+*?()|[]{}^$#&-~/\"'")


def regex_escape(text: str) -> str:
    """Escape `text` for the regex dialects of all backends (Rust regex, llguidance, xgrammar,
    Python re): punctuation that may be special gets a backslash, control chars become escapes."""
    out = []
    for ch in text:
        if ch in _META:
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _class_escape(chars: Iterable[str]) -> str:
    return "".join(regex_escape(c) for c in sorted(set(chars)))


class _WordAutomaton:
    """The Aho-Corasick automaton of `words`: state 0 is the root, `matched[s]` when a word ends
    at s (or at a suffix of it), `depth[s]` the length of the prefix s stands for."""

    def __init__(self, words: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.fail = [0]
        self.matched = [False]
        for w in words:
            self._add_word(w)
        self.depth = [0] * len(self.goto)
        self._link_failures()

    def _add_word(self, word: str) -> None:
        s = 0
        for ch in word:
            if ch not in self.goto[s]:
                self.goto.append({})
                self.fail.append(0)
                self.matched.append(False)
                self.goto[s][ch] = len(self.goto) - 1
            s = self.goto[s][ch]
        self.matched[s] = True

    def _link_failures(self) -> None:
        queue = deque(self.goto[0].values())
        while queue:
            r = queue.popleft()
            for ch, s in self.goto[r].items():
                self.depth[s] = self.depth[r] + 1
                queue.append(s)
                f = self.fail[r]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                self.fail[s] = self.goto[f].get(ch, 0) if r != 0 else 0
                self.matched[s] = self.matched[s] or self.matched[self.fail[s]]

    def step(self, s: int, ch: str) -> int:
        while s and ch not in self.goto[s]:
            s = self.fail[s]
        return self.goto[s].get(ch, 0)


def _alt(parts: list[str]) -> str:
    """The alternation of `parts` (duplicates dropped; an empty part makes the whole optional)."""
    parts = list(dict.fromkeys(parts))
    nonempty = [p for p in parts if p]
    if not nonempty:
        return ""
    body = nonempty[0] if len(nonempty) == 1 else "(" + "|".join(nonempty) + ")"
    if len(nonempty) < len(parts):  # an empty alternative
        return body + "?" if _atomic(body) else "(" + body + ")?"
    return body


class _RegexGraph:
    """Edges labelled with regexes between states; eliminating every state but the start and the
    final one leaves the regex of all paths between them."""

    def __init__(self) -> None:
        self.edges: dict[tuple[Any, Any], list[str]] = {}

    def add(self, p: Any, q: Any, rx: str) -> None:
        self.edges.setdefault((p, q), []).append(rx)

    def eliminate(self, k: Any) -> None:
        """Remove state k, joining every path p -> k -> q into one edge p -> q."""
        loop = _alt(self.edges.pop((k, k), []))
        star = ((loop if _atomic(loop) else f"({loop})") + "*") if loop else ""
        ins = [(p, _alt(v)) for (p, q), v in list(self.edges.items()) if q == k]
        outs = [(q, _alt(v)) for (p, q), v in list(self.edges.items()) if p == k]
        for key in [e for e in self.edges if k in e]:
            del self.edges[key]
        for p, a in ins:
            for q, c in outs:
                self.add(p, q, _cat(a, star, c))

    def regex(self, p: Any, q: Any) -> str:
        return _alt(self.edges.get((p, q), []))


def _add_char_edges(graph: _RegexGraph, words: _WordAutomaton, alphabet: list[str], src: Any, state: int,
                    banned: str) -> None:
    """Edges from `src` for every character but `banned`, moving as the automaton does from
    `state`; characters completing a word have no edge."""
    targets: dict[int, list[str]] = {}
    for ch in alphabet:
        if ch in banned:
            continue
        q = words.step(state, ch)
        if not words.matched[q]:
            targets.setdefault(q, []).append(ch)
    # characters outside the alphabet go back to the root
    for q, chars in targets.items():
        if q == 0:
            graph.add(src, q, f"[^{_class_escape(set(alphabet) - set(chars))}]")
        elif len(chars) == 1:
            graph.add(src, q, regex_escape(chars[0]))
        else:
            graph.add(src, q, f"[{_class_escape(chars)}]")
    if 0 not in targets:
        graph.add(src, 0, f"[^{_class_escape(alphabet)}]")


def regex_excluding(words: Iterable[str], not_start: str = "") -> str:
    """A regex matching every string (possibly empty; newlines included) that contains none of
    `words` as a substring and does not start with a character in `not_start`.

    Built as the Aho-Corasick automaton of `words` with the match states removed, converted to a
    regex by state elimination; only plain constructs are used (groups, classes, `*`, `?`, `|`).
    """
    words = [w for w in dict.fromkeys(words) if w]
    if not words and not not_start:  # any text: an empty class `[^]` reads differently in each dialect
        return "(.|\\n)*"
    automaton = _WordAutomaton(words)
    alphabet = sorted(set("".join(words)) | set(not_start))
    live = [s for s in range(len(automaton.goto)) if not automaton.matched[s]]
    start, final, first = "I", "F", "S"  # FIRST: before the first character (not_start applies)
    graph = _RegexGraph()
    for s in live:
        _add_char_edges(graph, automaton, alphabet, s, s, "")
        graph.add(s, final, "")
    if not_start:
        _add_char_edges(graph, automaton, alphabet, first, 0, not_start)
        graph.add(first, final, "")
        graph.add(start, first, "")
    else:
        graph.add(start, 0, "")
    # deepest states first keeps the intermediate regexes small
    for k in sorted(live, key=lambda s: -automaton.depth[s]) + ([first] if not_start else []):
        graph.eliminate(k)
    return graph.regex(start, final)


def _atomic(rx: str) -> bool:
    """Whether a postfix operator may be appended to `rx` directly."""
    if len(rx) == 1 or (len(rx) == 2 and rx[0] == "\\"):
        return True
    if rx.startswith("[") and rx.endswith("]") and _balanced(rx, "[", "]"):
        return True
    if rx.startswith("(") and rx.endswith(")") and _balanced(rx, "(", ")"):
        return True
    return False


def _balanced(rx: str, open_: str, close: str) -> bool:
    """rx[0] opens a group/class that closes exactly at the end."""
    depth = 0
    i = 0
    in_class = False
    while i < len(rx):
        ch = rx[i]
        if ch == "\\":
            i += 2
            continue
        if open_ == "(":
            if in_class:
                if ch == "]":
                    in_class = False
            elif ch == "[":
                in_class = True
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
                if depth == 0 and i != len(rx) - 1:
                    return False
        else:
            if ch == "]" and i != len(rx) - 1:
                return False
        i += 1
    return True


def _cat(*parts: str) -> str:
    out = []
    for p in parts:
        if not p:
            continue
        if "|" in p and not _atomic(p):
            p = f"({p})"
        out.append(p)
    return "".join(out)


# --------------------------------------------------------------------------------------------
# Translations shared by the regex-based backends
# --------------------------------------------------------------------------------------------


def ws_regex(chars: str, max_count: Optional[int] = None) -> str:
    return f"[{_class_escape(chars)}]" + ("*" if max_count is None else f"{{0,{int(max_count)}}}")


def text_regex(t: dict) -> str:
    """The regex of a "text" node without its trigger."""
    lead = t.get("lead_ws", "")
    rx = regex_excluding(t.get("exclude", []), t.get("not_start", "") + lead)
    return (ws_regex(lead) + f"({rx})") if lead else rx


def text_then_regex(t: dict) -> str:
    """The regex of a "text" node with what follows it (its marker's text or its then_text)."""
    then = t.get("then") or t.get("then_text")
    return f"({text_regex(t)})" + (regex_escape(then) if then else "")


def to_regex(node: Any, json_to_regex: Callable[[dict], str]) -> str:
    """The node as one regex (outlines-core); JSON nodes through `json_to_regex`."""
    if "seq" in node:
        return "".join(f"({to_regex(n, json_to_regex)})" for n in node["seq"])
    if "alt" in node:
        return "(" + "|".join(f"({to_regex(n, json_to_regex)})" for n in node["alt"]) + ")"
    if "star" in node:
        return f"({to_regex(node['star'], json_to_regex)})*"
    if "opt" in node:
        return f"({to_regex(node['opt'], json_to_regex)})?"
    if "lit" in node:
        return regex_escape(node["lit"])
    if "ws" in node:
        return ws_regex(node["ws"], node.get("max"))
    if "marker" in node:
        return regex_escape(node["marker"])
    if "json" in node:
        return json_to_regex(node["json"])
    if "text" in node:
        return text_then_regex(node["text"])
    if "regex" in node:
        return f"({node['regex']})"
    raise ValueError(f"unknown structure node {sorted(node)}")


def markers(node: Any) -> set[str]:
    """Every marker the structure names (as marker, text trigger or excluded word)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if "marker" in node:
            found.add(node["marker"])
        if "text" in node:
            if node["text"].get("then"):
                found.add(node["text"]["then"])
        for key in ("seq", "alt"):
            for n in node.get(key, []):
                found |= markers(n)
        for key in ("star", "opt"):
            if key in node:
                found |= markers(node[key])
    return found


def walk_json(node: Any) -> list[dict]:
    """The JSON schemas the structure contains."""
    if isinstance(node, dict):
        if "json" in node:
            return [node["json"]]
        found: list[dict] = []
        for key in ("seq", "alt"):
            for n in node.get(key, []):
                found += walk_json(n)
        for key in ("star", "opt"):
            if key in node:
                found += walk_json(node[key])
        return found
    return []

