"""JSON Schema patterns written so that every match is a match under both readings a client may check it with.

JSON Schema reads `pattern` as ECMA-262, whose `\\d` and `\\w` are ASCII; Python's `re` (the `jsonschema`
package, pydantic's checks) reads them as Unicode, and the two disagree on `\\s` too: U+FEFF is ECMA
whitespace only, U+001C-U+001F and U+0085 are Python's only. llguidance reads `\\D` as "not 0-9", so
`^\\D{2}$` wrote the NKo digit U+07C8 (Python: a digit), `^\\W+$` wrote Hangul (Python: a word character),
and a backend's `\\s` wrote U+FEFF (Python: not whitespace). Each shorthand is written as the characters both
readings agree on: a positive one as the narrower set, a negated one as the complement of the wider one, and
the other way round inside a negated class (whose members are what the output must avoid). Patterns only
lose characters this way; a string either reading refuses never comes out.

The rewritten pattern uses Rust regex syntax (nested classes, `\\p{..}`): for llguidance, whose regexes are
Rust's.
"""

from __future__ import annotations

from typing import Any

from agentserve.grammar.schema_utils import map_patterns

_SPACE_BOTH = r"\t\n\x0b\x0c\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE_EITHER = _SPACE_BOTH + r"\ufeff\x1c-\x1f\x85"
# shorthand -> (members both readings match, members either reading matches)
_MEMBERS = {
    "d": ("0-9", r"0-9\p{Nd}"),
    "w": ("A-Za-z0-9_", r"A-Za-z0-9_\p{L}\p{N}"),
    "s": (_SPACE_BOTH, _SPACE_EITHER),
}


def _shorthand(letter: str, in_class: bool, negated_class: bool) -> str:
    narrow, wide = _MEMBERS[letter.lower()]
    if letter.islower():  # \d \w \s: narrow where the output takes them, wide where it avoids them
        members = wide if negated_class else narrow
        return members if in_class else f"[{members}]"
    # \D \W \S: the complement of the wide set where taken, of the narrow one where avoided
    return f"[^{narrow if negated_class else wide}]"


def both_dialects(pattern: str) -> str:
    """`pattern` with `\\d \\D \\w \\W \\s \\S` written as the module says."""
    out: list[str] = []
    i, in_class, negated = 0, False, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            letter = pattern[i + 1]
            out.append(_shorthand(letter, in_class, negated) if letter in "dDwWsS" else pattern[i:i + 2])
            i += 2
            continue
        if c == "[" and not in_class:
            in_class, negated = True, pattern.startswith("[^", i)
            opened = 2 if negated else 1
            out.append(pattern[i:i + opened])
            i += opened
            if pattern.startswith("]", i):  # ECMA: a ']' first is a member ('[]a]'); Rust needs it escaped
                out.append("\\]")
                i += 1
            continue
        if c == "]" and in_class:
            in_class = negated = False
        out.append(c)
        i += 1
    return "".join(out)


def patterns_in_both_dialects(schema: Any) -> Any:
    """Every `pattern` and `patternProperties` key of `schema` through both_dialects."""
    return map_patterns(schema, lambda pattern, path: both_dialects(pattern))
