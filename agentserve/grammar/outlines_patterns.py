"""JSON Schema patterns as outlines-core's Rust regex must read them.

ASCII class escapes. JSON Schema reads `pattern` as ECMA-262, where `\\d` is [0-9] and `\\w` is
[A-Za-z0-9_]; Rust's regex matches every Unicode digit and letter there, so outlines wrote
`"pattern": "^\\d{6}$"` as "४６9꧘6４" and `format: date` (its regex spells the year `\\d{4}`) as
"꧘6４4-05-05": a JavaScript client's validator refuses them, and Python's refuses digits newer than its
Unicode tables. xgrammar and llguidance read these escapes as ASCII already.

JSON-safe string characters. outlines-core puts a string's `pattern` between the quotes as it is, so a
class, '.' or a negated escape (`"^[^,]{3}$"`) let the string hold a raw '"', a backslash or a control
character: invalid JSON ('{"k":"x"y"}'). Each of those is intersected with the characters a JSON string
holds unescaped (Rust's `&&`); a pattern that spells such a character itself is refused.

Whole strings. outlines-core strips a pattern's `^` and `$` only when it has both and puts the rest between
the quotes ungrouped, so `^a|b$` wrote the alternation across them ('b"' came out: not JSON) and `^ab` put
a literal '^' in the regex (refused). A JSON Schema pattern is a search; whole_string_pattern writes it as
the whole-string regex that means the same (text around it where it is not anchored), grouped.
"""

from __future__ import annotations

from agentserve.grammar.interface import GrammarError

_CLASS_RANGES = {"d": "0-9", "w": "A-Za-z0-9_"}


def _class_members_start(pattern: str, start: int) -> int:
    """Where the members of the class opened at `start` begin to need reading: past '[' or '[^', and past a
    ']' first in the class, which is a literal member, not the class's end."""
    i = start + 2 if pattern.startswith("[^", start) else start + 1
    return i + 1 if pattern.startswith("]", i) else i


def ascii_class_escapes(regex: str) -> str:
    """`regex` with `\\d` and `\\w` spelled as ASCII ranges. `\\D` and `\\W` are left Unicode: what they
    match then is outside both ECMA's and Python's `\\d` / `\\w`, so a value matches under either reading."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(regex):
        ch = regex[i]
        if ch == "\\" and i + 1 < len(regex):
            letter = regex[i + 1]
            if letter in _CLASS_RANGES:
                out.append(_CLASS_RANGES[letter] if in_class else f"[{_CLASS_RANGES[letter]}]")
            else:
                out.append(regex[i:i + 2])
            i += 2
            continue
        if ch == "[" and not in_class:
            in_class = True
            first = _class_members_start(regex, i)
            out.append(regex[i:first])
            i = first
            continue
        if ch == "]" and in_class:
            in_class = False
        out.append(ch)
        i += 1
    return "".join(out)


# The characters a JSON string holds as themselves: not '"', '\\' or a control character.
_JSON_TEXT = r'[^"\\\x00-\x1F]'
_NEGATED_ESCAPES = {"D": r"[\D]", "W": r"[\W]", "S": r"[\S]", "s": r"[\s]"}
_CONTROL_ESCAPES = "nrtfv0c"


def _refuse(text: str, where: str) -> GrammarError:
    return GrammarError(f"outlines cannot write {text!r} of the pattern at {where} inside a JSON string (it would "
                        "need a JSON escape); use grammar_backend llguidance or xgrammar")


def _class_end(pattern: str, start: int) -> int:
    """The index of the ']' that closes the class opened at `start`."""
    i = _class_members_start(pattern, start)
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i


def json_string_pattern(pattern: str, where: str) -> str:
    """`pattern` with each class, '.' and negated escape limited to the characters a JSON string holds
    as themselves (see the module); GrammarError naming `where` for a literal '"', backslash or control
    character."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            if letter in _NEGATED_ESCAPES:
                out.append(f"[{_NEGATED_ESCAPES[letter]}&&{_JSON_TEXT}]")
            elif letter in '"\\' or letter in _CONTROL_ESCAPES:
                raise _refuse(pattern[i:i + 2], where)
            elif letter in "xu":
                digits = pattern[i + 2:i + (4 if letter == "x" else 6)]
                code = int(digits, 16) if digits and all(c in "0123456789abcdefABCDEF" for c in digits) else None
                if code is not None and (code < 0x20 or chr(code) in '"\\'):
                    raise _refuse(pattern[i:i + 2 + len(digits)], where)
                out.append(pattern[i:i + 2])
            else:
                out.append(pattern[i:i + 2])
            i += 2
            continue
        if ch == "[":
            end = _class_end(pattern, i)
            out.append(f"[{pattern[i:end + 1]}&&{_JSON_TEXT}]")
            i = end + 1
            continue
        if ch == ".":
            out.append(_JSON_TEXT)
        elif ch == '"' or ord(ch) < 0x20:
            raise _refuse(ch, where)
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def _escaped(text: str, index: int) -> bool:
    """Whether the character at `index` follows an odd run of backslashes."""
    run = 0
    while index - run - 1 >= 0 and text[index - run - 1] == "\\":
        run += 1
    return run % 2 == 1


def whole_string_pattern(pattern: str) -> str:
    """`pattern` (a search, as JSON Schema reads it) as a regex of the whole string, anchored at both ends and
    its body grouped (see the module). A top-level alternation with its own anchors, `^a|b$`, becomes
    `^(a|b)$`: fewer strings than the search allows, every one of them valid."""
    body = pattern
    starts = body.startswith("^")
    if starts:
        body = body[1:]
    ends = body.endswith("$") and not _escaped(body, len(body) - 1)
    if ends:
        body = body[:-1]
    before = "" if starts else f"{_JSON_TEXT}*"
    after = "" if ends else f"{_JSON_TEXT}*"
    return f"^{before}({body}){after}$"
