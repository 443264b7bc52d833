"""Tool calls: chat-format detection, tool-schema normalization, call constraints and parsing.

Formats (what the model emits for calls):
  hermes       Hermes/Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one
               block per call (several allowed), after optional text.
  llama3_json  Llama 3.1 JSON tool calling: `{"name": ..., "parameters": {...}}` as the whole
               output (optionally after `<|python_tag|>`); several separated by `; `.
  mistral      `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after optional text.

tool_choice "auto": free text until the format's opener (it can never contain the opener), then
calls constrained to a declared tool's name and that tool's argument schema; "required" and a
named tool constrain from the first token; "none": no constraint. The constraint and the parser
agree on where calls start, so every call the parser returns validates.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from agentserve.grammar.backend import ConstraintSpec, GrammarError, canonical_json

TOOL_FORMATS = ("hermes", "llama3_json", "mistral")

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_OPEN = "[TOOL_CALLS]"

ARGUMENTS_KEY = {"hermes": "arguments", "llama3_json": "parameters", "mistral": "arguments"}


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------


def detect_tool_format(chat_template: Union[None, str, dict, Sequence[Any]], override: Optional[str] = None) -> str:
    """The tool-call format a chat template renders, by its markers; `override` wins.

    `[TOOL_CALLS]` -> mistral; `<tool_call>` -> hermes; `<|python_tag|>`, an `ipython` role or
    calls rendered with `"parameters"` -> llama3_json. Templates without markers -> hermes (the
    most common format of open models)."""
    if override:
        fmt = override.lower().replace("-", "_")
        aliases = {"qwen": "hermes", "qwen2": "hermes", "qwen3": "hermes", "llama3": "llama3_json",
                   "llama": "llama3_json", "llama3_1": "llama3_json", "json": "llama3_json"}
        fmt = aliases.get(fmt, fmt)
        if fmt not in TOOL_FORMATS:
            raise ValueError(f"unknown tool-call format {override!r}; expected one of {TOOL_FORMATS}")
        return fmt
    if isinstance(chat_template, dict):
        text = "\n".join(str(v) for v in chat_template.values())
    elif isinstance(chat_template, (list, tuple)):
        text = "\n".join(str(t.get("template", "")) if isinstance(t, dict) else str(t) for t in chat_template)
    else:
        text = chat_template or ""
    if MISTRAL_OPEN in text:
        return "mistral"
    if HERMES_OPEN in text:
        return "hermes"
    if PYTHON_TAG in text or "ipython" in text or '"parameters"' in text:
        return "llama3_json"
    return "hermes"


# --------------------------------------------------------------------------------------------
# Tool-schema normalization
# --------------------------------------------------------------------------------------------

_TYPE_ALIASES = {
    "object": "object", "dict": "object", "map": "object", "hash": "object", "struct": "object",
    "number": "number", "float": "number", "double": "number", "decimal": "number", "real": "number",
    "integer": "integer", "int": "integer", "long": "integer", "int32": "integer", "int64": "integer",
    "boolean": "boolean", "bool": "boolean",
    "array": "array", "list": "array", "tuple": "array", "set": "array",
    "string": "string", "str": "string", "text": "string", "char": "string",
    "null": "null", "none": "null",
}
_ANY_TYPES = ("any", "")

# Keywords that no supported backend enforces: rejected rather than silently dropped.
UNSUPPORTED_KEYWORDS = (
    "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "not", "if", "then", "else",
    "dependentRequired", "dependentSchemas", "dependencies", "unevaluatedProperties", "unevaluatedItems",
    "contains", "minContains", "maxContains", "propertyNames", "uniqueItems",
)

_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions")
_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _norm_type(value: Any, path: str) -> Any:
    def one(t: Any) -> Optional[str]:
        if not isinstance(t, str):
            raise GrammarError(f"unsupported type {t!r} at {path}.type")
        key = t.strip().lower()
        if key in _ANY_TYPES:
            return None
        if key not in _TYPE_ALIASES:
            raise GrammarError(f"unsupported type {t!r} at {path}.type")
        return _TYPE_ALIASES[key]

    if isinstance(value, list):
        types = [one(t) for t in value]
        if any(t is None for t in types):
            return None
        return list(dict.fromkeys(types)) if len(set(types)) > 1 else types[0]
    return one(value)


def normalize_tool_schema(schema: Any, path: str = "parameters") -> dict:
    """A tool's parameter schema in plain JSON Schema, or GrammarError naming what is unsupported.

    Fixes the dialects real tool definitions use: type aliases ("dict", "float", "int", "bool",
    "list", "str", "string " ...), enums without a type (inferred), properties without
    `"type": "object"`, OpenAPI-2 `"required": true` on properties, OpenAPI-3 `nullable`,
    `"items": "string"` and `"properties": {"x": "int"}` shorthands."""
    if schema is None or schema == {}:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"tool parameters must be a JSON object schema at {path}, got {type(schema).__name__}")
    out = _normalize(schema, path)
    if not isinstance(out, dict):
        raise GrammarError(f"tool parameters must be an object schema at {path}")
    t = out.get("type")
    if t is None:
        out = {"type": "object", **out}
    elif t != "object" and not (isinstance(t, list) and "object" in t):
        raise GrammarError(f"tool parameters must be an object schema, got type {t!r} at {path}.type")
    return out


def _normalize(node: Any, path: str) -> Any:
    if isinstance(node, bool):
        return node
    if isinstance(node, str):  # shorthand: "int" for {"type": "integer"}
        t = _norm_type(node, path)
        return {"type": t} if t else {}
    if not isinstance(node, dict):
        raise GrammarError(f"expected a schema object at {path}, got {type(node).__name__}")
    for kw in UNSUPPORTED_KEYWORDS:
        if kw in node and not (kw == "uniqueItems" and node[kw] is False):
            raise GrammarError(f"unsupported keyword '{kw}' at {path}")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise GrammarError(f"unsupported keyword '$ref' (only local '#/...' references) at {path}")

    out: dict[str, Any] = {}
    required: list[str] = []
    req = node.get("required")
    if isinstance(req, list):
        required = [r for r in req if isinstance(r, str)]
    elif isinstance(req, str):
        required = [req]
    nullable = node.get("nullable") is True

    for key, value in node.items():
        sub = f"{path}.{key}"
        if key in ("required", "nullable", "optional", "uniqueItems"):
            continue
        if key == "type":
            t = _norm_type(value, path)
            if t is not None:
                out["type"] = t
        elif key in _MAP_KEYWORDS:
            if not isinstance(value, dict):
                raise GrammarError(f"'{key}' must be an object at {sub}")
            mapped = {}
            for name, prop in value.items():
                prop_path = f"{sub}.{name}"
                if key == "properties" and isinstance(prop, dict) and isinstance(prop.get("required"), bool):
                    if prop["required"] and name not in required:
                        required.append(name)
                    prop = {k: v for k, v in prop.items() if k != "required"}
                mapped[name] = _normalize(prop, prop_path)
            out[key] = mapped
        elif key in _LIST_KEYWORDS:
            if not isinstance(value, list) or not value:
                raise GrammarError(f"'{key}' must be a non-empty array at {sub}")
            out[key] = [_normalize(v, f"{sub}[{i}]") for i, v in enumerate(value)]
        elif key == "items":
            if isinstance(value, list):  # draft-4 tuple form
                out["prefixItems"] = [_normalize(v, f"{sub}[{i}]") for i, v in enumerate(value)]
                extra = node.get("additionalItems", True)
                if extra is not True:
                    out["items"] = _normalize(extra, f"{path}.additionalItems")
            else:
                out["items"] = _normalize(value, sub)
        elif key == "additionalItems":
            continue  # folded into items above (ignored without tuple items, as JSON Schema does)
        elif key == "additionalProperties":
            out[key] = _normalize(value, sub)
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise GrammarError(f"'enum' must be a non-empty array at {sub}")
            out[key] = list(value)
        else:
            out[key] = value

    if "type" not in out:
        if "enum" in out or "const" in out:
            values = out.get("enum", [out.get("const")])
            types = list(dict.fromkeys(_json_type(v) for v in values))
            if set(types) == {"integer", "number"}:
                types = ["number"]
            if "anyOf" not in out and "oneOf" not in out and "allOf" not in out and "$ref" not in out:
                out["type"] = types[0] if len(types) == 1 else types
        elif "properties" in out or "additionalProperties" in out or "patternProperties" in out or required:
            out["type"] = "object"
        elif "items" in out or "prefixItems" in out:
            out["type"] = "array"
    if "type" in out and "enum" in out:  # enum values must fit the (possibly aliased) type
        t = out["type"]
        types = set(t) if isinstance(t, list) else {t}
        if "number" in types:
            types.add("integer")
        for v in out["enum"]:
            if _json_type(v) not in types:
                raise GrammarError(f"enum value {v!r} does not match type {t!r} at {path}.enum")
    if required:
        out["required"] = list(dict.fromkeys(required))
    if nullable:
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
        t = out.get("type")
        if t is not None:
            types = t if isinstance(t, list) else [t]
            if "null" not in types:
                out["type"] = types + ["null"]
    return out


# --------------------------------------------------------------------------------------------
# Constraints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolDef:
    name: str
    parameters: dict
    description: str = ""


def parse_tools(tools: Iterable[Any]) -> list[ToolDef]:
    """OpenAI-shape tools ({"type": "function", "function": {...}}) or flat {"name", "parameters"}."""
    out: list[ToolDef] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise GrammarError(f"tools[{i}] must be an object")
        fn = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if tool.get("type", "function") != "function":
            raise GrammarError(f"tools[{i}]: unsupported tool type {tool.get('type')!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{i}] needs a non-empty function name")
        if name in seen:
            raise GrammarError(f"tools[{i}]: duplicate tool name {name!r}")
        seen.add(name)
        params = normalize_tool_schema(fn.get("parameters"), path=f"tools[{i}].function.parameters")
        out.append(ToolDef(name=name, parameters=params, description=str(fn.get("description") or "")))
    return out


def call_schema(tool: ToolDef, fmt: str) -> dict:
    """The JSON schema of one call object in the format (name first, then the arguments)."""
    key = ARGUMENTS_KEY[fmt]
    return {"type": "object",
            "properties": {"name": {"const": tool.name}, key: tool.parameters},
            "required": ["name", key], "additionalProperties": False}


def _calls_schema(tools: Sequence[ToolDef], fmt: str) -> dict:
    schemas = [call_schema(t, fmt) for t in tools]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def tool_grammar(tools: Sequence[ToolDef], fmt: str, mode: str, parallel: bool) -> dict:
    """The `structure` tree of the outputs allowed in `fmt` (mode: "auto" or "required")."""
    call = {"json": _calls_schema(tools, fmt)}
    # chat templates often put a space/newline before the first call; bounded, so an unsure model
    # cannot emit whitespace forever instead of the call
    lead = {"ws": " \n", "max": 2}
    if fmt == "hermes":
        body = {"seq": [{"lit": "\n"}, call, {"lit": "\n"}, {"marker": HERMES_CLOSE}]}
        block = {"seq": [{"marker": HERMES_OPEN}, body]}
        more = [{"star": {"seq": [{"lit": "\n"}, block]}}] if parallel else []
        if mode == "required":
            return {"seq": [lead, block] + more}
        text_then_call = {"text": {"exclude": [HERMES_OPEN], "then": HERMES_OPEN}}
        return {"alt": [{"text": {"exclude": [HERMES_OPEN]}},
                        {"seq": [text_then_call, body] + more}]}
    if fmt == "llama3_json":
        seq = {"seq": [call] + ([{"star": {"seq": [{"lit": "; "}, call]}}] if parallel else [])}
        calls = {"seq": [lead, {"opt": {"marker": PYTHON_TAG}}, seq]}
        if mode == "required":
            return calls
        text = {"exclude": [PYTHON_TAG], "lead_ws": " \n", "not_start": "{"}
        return {"alt": [calls, {"text": text}, {"seq": [{"text": {**text, "then": PYTHON_TAG}}, seq]}]}
    if fmt == "mistral":
        array = {"type": "array", "items": _calls_schema(tools, fmt), "minItems": 1}
        if not parallel:
            array["maxItems"] = 1
        calls = [{"ws": " ", "max": 1}, {"json": array}]
        if mode == "required":
            return {"seq": [lead, {"marker": MISTRAL_OPEN}] + calls}
        return {"alt": [{"text": {"exclude": [MISTRAL_OPEN]}},
                        {"seq": [{"text": {"exclude": [MISTRAL_OPEN], "then": MISTRAL_OPEN}}] + calls}]}
    raise GrammarError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")


def call_schemas_of(spec: ConstraintSpec) -> list[tuple[str, dict]]:
    """(tool name, call schema) for each tool of a "tool_calls" constraint, in declaration order:
    to find which tool's parameters make a tool-call grammar fail (compile each alone)."""
    found: list[tuple[str, dict]] = []

    def add(schema: dict) -> None:
        for one in schema.get("anyOf", [schema]):
            name = one["properties"]["name"]["const"]
            if all(name != seen for seen, _ in found):
                found.append((name, one))

    def visit(node: dict) -> None:
        if "json" in node:
            schema = node["json"]
            add(schema["items"] if schema.get("type") == "array" else schema)
        for key in ("seq", "alt"):
            for child in node.get(key, ()):
                visit(child)
        for key in ("star", "opt"):
            if key in node:
                visit(node[key])

    visit(json.loads(str(spec.payload))["grammar"])
    return found


def _choice_mode(tool_choice: Any, tools: list[ToolDef]) -> tuple[str, list[ToolDef]]:
    if tool_choice is None or tool_choice == "auto":
        return "auto", tools
    if tool_choice == "none":
        return "none", tools
    if tool_choice == "required" or tool_choice == "any":
        return "required", tools
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if isinstance(tool_choice.get("function"), dict) else tool_choice
        name = fn.get("name")
        for t in tools:
            if t.name == name:
                return "required", [t]
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools "
                           f"({', '.join(t.name for t in tools)})")
    raise GrammarError(f"invalid tool_choice {tool_choice!r}: expected 'auto', 'none', 'required' "
                       "or {'type': 'function', 'function': {'name': ...}}")


def build_tool_constraint(tools: Sequence[Any], tool_choice: Any, fmt: str, parallel: bool = True
                          ) -> Optional[ConstraintSpec]:
    """The constraint for a request with tools, or None (tool_choice "none" or no tools)."""
    if fmt not in TOOL_FORMATS:
        raise GrammarError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")
    defs = parse_tools(tools)
    if not defs:
        return None
    mode, defs = _choice_mode(tool_choice, defs)
    if mode == "none":
        return None
    grammar = tool_grammar(defs, fmt, mode, parallel)
    payload = {"format": fmt, "mode": mode, "parallel": parallel, "tools": [t.name for t in defs],
               "grammar": grammar}
    return ConstraintSpec("tool_calls", canonical_json(payload))


# --------------------------------------------------------------------------------------------
# Parsing (incremental)
# --------------------------------------------------------------------------------------------


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    arguments_delta: str = ""
    id: Optional[str] = None      # on the first delta of a call
    name: Optional[str] = None    # on the first delta of a call


@dataclass
class ToolCall:
    id: str
    name: str
    arguments_json: str

    @property
    def arguments(self) -> Any:
        return json.loads(self.arguments_json)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments_json}}


_ALNUM = string.ascii_letters + string.digits


def new_call_id(fmt: str) -> str:
    if fmt == "mistral":  # Mistral's templates require 9 alphanumeric characters
        return "".join(secrets.choice(_ALNUM) for _ in range(9))
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


_WS = " \t\r\n"


class _ValueScanner:
    """Finds the end of one JSON value, a character at a time."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.kind = ""  # "container", "string", "scalar"
        self.done = False

    def feed(self, ch: str) -> bool:
        """Consume `ch` if it belongs to the value; False (not consumed) when the value ended before it."""
        if self.done:
            return False
        if not self.kind:
            if ch in "{[":
                self.kind, self.depth = "container", 1
            elif ch == '"':
                self.kind, self.in_string = "string", True
            else:
                self.kind = "scalar"
            return True
        if self.kind == "scalar":
            if ch in ",}]" or ch in _WS:
                self.done = True
                return False
            return True
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.kind == "string":
                    self.done = True
            return True
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                self.done = True
        return True


class _CallObject:
    """Scans one call object `{"name": ..., "arguments": ...}` after its `{`; streams arguments."""

    def __init__(self, args_keys: tuple[str, ...]) -> None:
        self.args_keys = args_keys
        self.state = "key_or_end"
        self.key_buf = ""
        self.key = ""
        self.value: Optional[_ValueScanner] = None
        self.value_buf = ""
        self.name: Optional[str] = None
        self.args_raw = ""         # streamed argument text so far
        self.args_pending = ""     # argument text not yet reported
        self.args_is_string = False
        self.args_final: Optional[str] = None
        self.done = False

    def feed(self, ch: str) -> bool:
        """Consume one char; returns False when the object is complete (char not consumed)."""
        if self.done:
            return False
        st = self.state
        if st == "key_or_end":
            if ch in _WS or ch == ",":
                return True
            if ch == '"':
                self.state, self.key_buf = "key", '"'
                return True
            if ch == "}":
                self.done = True
                self.state = "end"
                return True
            raise ValueError(f"unexpected {ch!r} in a tool call object")
        if st == "key":
            self.key_buf += ch
            if ch == '"' and not _escaped(self.key_buf):
                self.key = json.loads(self.key_buf)
                self.state = "colon"
            return True
        if st == "colon":
            if ch in _WS:
                return True
            if ch == ":":
                self.state = "value_start"
                return True
            raise ValueError(f"unexpected {ch!r} after a key in a tool call object")
        if st == "value_start":
            if ch in _WS:
                return True
            self.value = _ValueScanner()
            self.value_buf = ""
            self.state = "value"
            if self.key in self.args_keys and ch == '"':
                self.args_is_string = True
            # fall through into value
        if self.state == "value":
            assert self.value is not None
            if self.value.feed(ch):
                self._value_char(ch)
                if self.value.done:
                    self._value_end()
                return True
            self._value_end()
            return self.feed(ch)
        if self.state == "after_value":
            if ch in _WS:
                return True
            if ch == ",":
                self.state = "key_or_end"
                return True
            if ch == "}":
                self.done = True
                self.state = "end"
                return True
            raise ValueError(f"unexpected {ch!r} after a value in a tool call object")
        return False

    def _value_char(self, ch: str) -> None:
        self.value_buf += ch
        if self.key in self.args_keys and not self.args_is_string:
            self.args_raw += ch
            self.args_pending += ch

    def _value_end(self) -> None:
        self.state = "after_value"
        if self.key == "name":
            try:
                name = json.loads(self.value_buf)
            except json.JSONDecodeError:
                name = self.value_buf
            self.name = name if isinstance(name, str) else json.dumps(name)
        elif self.key in self.args_keys:
            if self.args_is_string:  # arguments given as a JSON-encoded string
                decoded = json.loads(self.value_buf)
                self.args_raw = decoded if isinstance(decoded, str) else json.dumps(decoded)
                self.args_pending = self.args_raw
            self.args_final = self.args_raw


def _escaped(buf: str) -> bool:
    """Whether the last char of `buf` is escaped by an odd run of backslashes."""
    n = 0
    i = len(buf) - 2
    while i >= 0 and buf[i] == "\\":
        n += 1
        i -= 1
    return n % 2 == 1


class ToolCallParser:
    """Incremental parser of a model's output into content and tool calls.

        parser = ToolCallParser("hermes")
        for delta_text in stream: events = parser.feed(delta_text)   # ContentDelta / ToolCallDelta
        content, calls = parser.finish()

    Argument fragments are reported as they arrive (the first delta of a call carries its id and
    name); the fragments of a call concatenate to its final `arguments_json`. The parser needs
    the output text with the format's markers (decode without skipping special tokens, or keep
    the marker tokens). A call cut off by the end of the output is not returned (`truncated`).
    """

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]] = None) -> None:
        if fmt not in TOOL_FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")
        self.fmt = fmt
        self.args_keys = ("arguments", "parameters")
        self.openers = {"hermes": [HERMES_OPEN], "llama3_json": [PYTHON_TAG], "mistral": [MISTRAL_OPEN]}[fmt]
        self.mode = "text"
        self.pending = ""        # text held back (may be the start of a marker)
        self.content_parts: list[str] = []
        self.calls: list[ToolCall] = []
        self.truncated = False
        self._obj: Optional[_CallObject] = None
        self._call_index = -1
        self._call_id = ""
        self._announced = False
        self._ws_after_call = ""
        self._close_buf = ""
        self._finished = False
        self._between_calls = True  # only whitespace since the start / the last call block

    # -- public -------------------------------------------------------------------------------
    def feed(self, text: str) -> list[Union[ContentDelta, ToolCallDelta]]:
        events: list[Union[ContentDelta, ToolCallDelta]] = []
        for ch in text:
            self._feed_char(ch, events)
        self._flush_content(events, final=False)
        self._flush_args(events)
        return _merge(events)

    def flush(self) -> list[Union[ContentDelta, ToolCallDelta]]:
        """End of output: the last deltas (held-back text that turned out not to be a marker)."""
        events: list[Union[ContentDelta, ToolCallDelta]] = []
        if self._finished:
            return events
        self._finished = True
        mode = self.mode
        if mode == "text":
            self._flush_content(events, final=True)
        elif mode in ("hermes_obj", "llama_obj", "mistral_obj"):
            self._flush_args(events)
            self.truncated = True  # a call cut off mid-object is not returned
            self._obj = None
        elif mode in ("hermes_pre", "hermes_post", "llama_list", "mistral_pre", "mistral_list",
                      "mistral_after_call"):
            self.truncated = True  # the format's closing part is missing
        return _merge(events)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content, complete tool calls). Calls `flush()` if it was not called."""
        self.flush()
        return "".join(self.content_parts), list(self.calls)

    @property
    def content(self) -> str:
        return "".join(self.content_parts)

    # -- internals ----------------------------------------------------------------------------
    def _emit_content(self, text: str, events: list) -> None:
        if text:
            self._between_calls = False
            self.content_parts.append(text)
            events.append(ContentDelta(text))

    def _flush_content(self, events: list, final: bool) -> None:
        if self.mode != "text" or not self.pending:
            return
        if self._between_calls and not self.pending.strip(" \t\r\n"):
            if final:
                if self.calls:  # whitespace after the last call is not content
                    self.pending = ""
                else:
                    self._emit_content(self.pending, events)
                    self.pending = ""
            return
        if final:
            self._emit_content(self.pending, events)
            self.pending = ""
            return
        keep = _partial_marker_suffix(self.pending, self.openers)
        emit = self.pending[: len(self.pending) - keep]
        if self._between_calls and not emit.strip(" \t\r\n"):
            return  # whitespace before what may be the next call: hold it
        self._emit_content(emit, events)
        self.pending = self.pending[len(emit):]

    def _flush_args(self, events: list) -> None:
        obj = self._obj
        if obj is None or obj.name is None:
            return
        if not self._announced:
            self._announced = True
            events.append(ToolCallDelta(index=self._call_index, id=self._call_id, name=obj.name,
                                        arguments_delta=obj.args_pending))
            obj.args_pending = ""
        elif obj.args_pending:
            events.append(ToolCallDelta(index=self._call_index, arguments_delta=obj.args_pending))
            obj.args_pending = ""

    def _start_call(self) -> None:
        self._obj = _CallObject(self.args_keys)
        self._call_index += 1
        self._call_id = new_call_id(self.fmt)
        self._announced = False

    def _complete_call(self, events: list) -> None:
        obj = self._obj
        assert obj is not None
        self._flush_args(events)
        if obj.name is None:
            self.truncated = True  # a call without a name cannot be returned
        else:
            args = obj.args_final
            if args is None:  # no arguments key: an empty object
                args = "{}"
                events.append(ToolCallDelta(index=self._call_index, arguments_delta=args))
            self.calls.append(ToolCall(id=self._call_id, name=obj.name, arguments_json=args))
        self._obj = None

    def _feed_char(self, ch: str, events: list) -> None:
        mode = self.mode
        if self._finished:
            raise RuntimeError("ToolCallParser.feed after flush/finish")
        if mode == "text":
            if (self.fmt == "llama3_json" and ch == "{" and not self.content_parts and not self.calls
                    and self._obj is None and not self.pending.strip(" \t\r\n")):
                self.pending = ""  # a call at the start of the output (after optional whitespace)
                self.mode = "llama_obj"
                self._start_call()
                return
            self.pending += ch
            for op in self.openers:
                if self.pending.endswith(op):
                    before = self.pending[: -len(op)]
                    if not (self._between_calls and not before.strip(" \t\r\n")):
                        self._emit_content(before, events)
                    self._between_calls = False
                    self.pending = ""
                    self.mode = {"hermes": "hermes_pre", "llama3_json": "llama_list",
                                 "mistral": "mistral_pre"}[self.fmt]
                    return
            return
        if mode == "hermes_pre":
            if ch in _WS:
                return
            if ch == "{":
                self.mode = "hermes_obj"
                self._start_call()
                return
            self._recover(HERMES_OPEN + ch, events)
            return
        if mode in ("hermes_obj", "llama_obj", "mistral_obj"):
            obj = self._obj
            assert obj is not None
            try:
                consumed = obj.feed(ch)
            except ValueError:
                self._recover(ch, events)
                return
            if obj.done:
                self._complete_call(events)
                self.mode = {"hermes_obj": "hermes_post", "llama_obj": "llama_after_call",
                             "mistral_obj": "mistral_after_call"}[mode]
                self._close_buf = ""
                if not consumed:
                    self._feed_char(ch, events)
            return
        if mode == "hermes_post":
            if ch in _WS and not self._close_buf:
                return
            self._close_buf += ch
            if HERMES_CLOSE.startswith(self._close_buf):
                if self._close_buf == HERMES_CLOSE:
                    self.mode = "hermes_after_block"
                    self._ws_after_call = ""
                return
            # no closing tag: treat what follows as text
            self.mode = "text"
            text, self._close_buf = self._close_buf, ""
            for c in text:
                self._feed_char(c, events)
            return
        if mode == "hermes_after_block":
            if ch in _WS:
                self._ws_after_call += ch
                return
            self.mode = "text"
            self.pending = self._ws_after_call
            self._ws_after_call = ""
            self._between_calls = True
            self._feed_char(ch, events)
            return
        if mode == "llama_list":
            if ch in _WS:
                return
            if ch == "{":
                self.mode = "llama_obj"
                self._start_call()
                return
            self._recover(ch, events)
            return
        if mode == "llama_after_call":
            if ch in _WS:
                return
            if ch == ";":
                self.mode = "llama_list"
                return
            self._recover(ch, events)
            return
        if mode == "mistral_pre":
            if ch in _WS:
                return
            if ch == "[":
                self.mode = "mistral_list"
                return
            self._recover(MISTRAL_OPEN + ch, events)
            return
        if mode == "mistral_list":
            if ch in _WS or ch == ",":
                return
            if ch == "{":
                self.mode = "mistral_obj"
                self._start_call()
                return
            if ch == "]":
                self.mode = "mistral_done"
                return
            self._recover(ch, events)
            return
        if mode == "mistral_after_call":
            if ch in _WS:
                return
            if ch == ",":
                self.mode = "mistral_list"
                return
            if ch == "]":
                self.mode = "mistral_done"
                return
            self._recover(ch, events)
            return
        if mode == "mistral_done":
            self.mode = "text"
            self._feed_char(ch, events)
            return

    def _recover(self, text: str, events: list) -> None:
        """Malformed call text (only possible without a constraint): keep it as content."""
        if self._obj is not None:
            self._obj = None
            self.truncated = True
        self.mode = "text"
        self.pending += text


def _partial_marker_suffix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), 0, -1):
            if text.endswith(m[:k]):
                best = max(best, k)
                break
    return best


def _merge(events: list) -> list:
    out: list = []
    for e in events:
        if out and isinstance(e, ContentDelta) and isinstance(out[-1], ContentDelta):
            out[-1] = ContentDelta(out[-1].text + e.text)
        elif (out and isinstance(e, ToolCallDelta) and isinstance(out[-1], ToolCallDelta)
              and e.index == out[-1].index and e.id is None and e.name is None):
            prev = out[-1]
            out[-1] = ToolCallDelta(index=prev.index, arguments_delta=prev.arguments_delta + e.arguments_delta,
                                    id=prev.id, name=prev.name)
        else:
            out.append(e)
    return out


class SessionToolStreamer:
    """Adapter for sessions/turns: `feed(text_delta) -> (plain text delta, [ToolCallDelta])` and
    `finish(full_text=None) -> (content, [OpenAI tool_call dicts])`."""

    def __init__(self, fmt: str, tools: Optional[Sequence[Any]] = None) -> None:
        self.parser = ToolCallParser(fmt, tools)

    @staticmethod
    def _split(events: list) -> tuple[str, list[ToolCallDelta]]:
        text = "".join(e.text for e in events if isinstance(e, ContentDelta))
        return text, [e for e in events if isinstance(e, ToolCallDelta)]

    def feed(self, text_delta: str) -> tuple[str, list[ToolCallDelta]]:
        return self._split(self.parser.feed(text_delta))

    def flush(self) -> tuple[str, list[ToolCallDelta]]:
        """The last deltas at the end of the output (held-back text)."""
        return self._split(self.parser.flush())

    def finish(self, full_text: Optional[str] = None) -> tuple[str, list[dict]]:
        content, calls = self.parser.finish()
        return content, [c.to_openai() for c in calls]


def make_session_streamer(fmt: Optional[str], tools: Optional[Sequence[Any]], tokenizer: Any = None
                          ) -> Optional[SessionToolStreamer]:
    """A streamer for `fmt` (None when the format is unknown). The tokenizer is not needed: the
    parser works on text (decoded with the format's markers kept)."""
    if not fmt:
        return None
    return SessionToolStreamer(fmt, tools)
