"""The tool-call constraint: tool definitions and tool_choice -> the grammar of the allowed outputs.

tool_choice "auto": free text until the format's opener (it can never contain the opener), then
calls constrained to a declared tool's name and that tool's argument schema; "required" and a
named tool constrain from the first token (a named tool: one call of it, as in vLLM); "none": no
constraint. The constraint and the parser
(tool_parser.py) agree on where calls start, so every call the parser returns validates.
`spec.build_tool_constraint` wraps the payload built here into a ConstraintSpec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from agentserve.grammar.closed_objects import close_objects
from agentserve.grammar.draft4_bounds import numeric_exclusive_bounds
from agentserve.grammar.interface import GrammarError, canonical_json
from agentserve.grammar.recent_results import RecentResults
from agentserve.grammar.schema_utils import map_subschemas
from agentserve.grammar.tool_formats import (
    ARGUMENTS_KEY,
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_ARGS,
    MISTRAL_OPEN,
    PYTHON_TAG,
    TOOL_FORMATS,
)
from agentserve.grammar.tool_schema import normalize_tool_schema
from agentserve.grammar.unenforced_keywords import best_effort

if TYPE_CHECKING:  # pragma: no cover - spec.py imports this module
    from agentserve.grammar.spec import ConstraintSpec



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
        nested = tool.get("function")
        fn = nested if isinstance(nested, dict) else tool
        if tool.get("type", "function") != "function":
            raise GrammarError(f"tools[{i}]: unsupported tool type {tool.get('type')!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{i}] needs a non-empty function name")
        if name in seen:
            raise GrammarError(f"tools[{i}]: duplicate tool name {name!r}")
        seen.add(name)
        where = f"tools[{i}].function.parameters"
        # what no backend enforces is left out of the calls' grammar (unenforced_keywords.best_effort)
        params = best_effort(numeric_exclusive_bounds(fn.get("parameters"), where), f"tool {name!r}")
        params = close_objects(normalize_tool_schema(params, path=where))
        out.append(ToolDef(name=name, parameters=params, description=str(fn.get("description") or "")))
    return out


def _has_local_ref(schema: Any) -> bool:
    """Whether any subschema holds a local reference ("#", "#/...")."""
    found = False

    def visit(node: dict, path: str) -> dict:
        nonlocal found
        found = found or str(node.get("$ref", "")).startswith("#")
        return node

    map_subschemas(schema, visit)
    return found


def _rebased(schema: Any, base: str) -> Any:
    """The schema with each local reference ('#', '#/...') made relative to `base` instead of the root."""
    def fix(node: dict, path: str) -> dict:
        ref = node.get("$ref")
        return {**node, "$ref": base + ref[1:]} if isinstance(ref, str) and ref.startswith("#") else node

    return map_subschemas(schema, fix)


# Keywords that give a schema its own base URI ("id": draft 4): local references inside resolve against it.
_BASE_URI_KEYWORDS = ("$id", "id")


def _without_base_uri(schema: dict) -> dict:
    """The parameters without their root base URI: once rebased, their references ('#/$defs/<slot>/...')
    point from the compiled schema's root, which a `$id` there would hide (llguidance: "Pointer ...
    does not exist", or a fetch of the URI). A base URI names the document; it constrains nothing."""
    return {k: v for k, v in schema.items() if not (k in _BASE_URI_KEYWORDS and isinstance(v, str))}


def call_schema(tool: ToolDef, fmt: str) -> dict:
    """The JSON schema of one call object in the format (name first, then the arguments).

    The parameters' references ('#/$defs/X', '#') point into the parameters, but inside the call
    object the root is the call: parameters that use them move to the call's `$defs` under a slot
    of their own (the tool name, hex-encoded: unique and pointer-safe), their references rebased
    there and their root `$id` dropped. _calls_schema lifts these `$defs` to the root of what is
    compiled."""
    key = ARGUMENTS_KEY[fmt]
    params: dict = tool.parameters
    defs: dict[str, Any] = {}
    if _has_local_ref(params):
        slot = "tool_" + tool.name.encode().hex()
        defs[slot] = _rebased(_without_base_uri(params), f"#/$defs/{slot}")
        params = {"$ref": f"#/$defs/{slot}"}
    schema = {"type": "object",
              "properties": {"name": {"const": tool.name}, key: params},
              "required": ["name", key], "additionalProperties": False}
    return {**schema, "$defs": defs} if defs else schema


def _calls_schema(tools: Sequence[ToolDef], fmt: str, *, array: bool = False, parallel: bool = True) -> dict:
    """One call of any of the tools; with `array`, Mistral's list of one or more calls (at most one
    without `parallel`). The calls' `$defs` sit at the root, where their references point."""
    schemas = [call_schema(t, fmt) for t in tools]
    defs: dict[str, Any] = {}
    for one in schemas:
        defs.update(one.pop("$defs", {}))
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    if array:
        schema = {"type": "array", "items": schema, "minItems": 1}
        if not parallel:
            schema["maxItems"] = 1
    return {**schema, "$defs": defs} if defs else schema


# Chat templates often put a space/newline before the first call; bounded, so an unsure model cannot emit
# whitespace forever instead of the call.
_LEAD_WS = {"ws": " \n", "max": 2}


def tool_grammar(tools: Sequence[ToolDef], fmt: str, mode: str, parallel: bool,
                 answer_schema: Optional[dict] = None) -> dict:
    """The `structure` tree of the outputs allowed in `fmt` (mode: "auto" or "required"). With an
    `answer_schema` in mode "auto": one or more calls, or a final answer (JSON matching the schema)
    instead of free text; the calls then always start with the format's opener, so that the parser
    can tell a call from an answer (llama3_json's bare calls are JSON too)."""
    if fmt == "mistral_v11":
        return _mistral_v11_grammar(tools, mode, parallel, answer_schema)
    if answer_schema is not None and mode == "auto":
        calls = tool_grammar(tools, fmt, "required", parallel)
        if fmt == "llama3_json":
            call = {"json": _calls_schema(tools, fmt)}
            more = [{"star": {"seq": [{"lit": "; "}, call]}}] if parallel else []
            calls = {"seq": [_LEAD_WS, {"marker": PYTHON_TAG}, call] + more}
        return {"alt": [calls, {"json": answer_schema, "answer": True}]}
    call = {"json": _calls_schema(tools, fmt)}
    if fmt == "hermes":
        body = {"seq": [{"lit": "\n"}, call, {"lit": "\n"}, {"marker": HERMES_CLOSE}]}
        block = {"seq": [{"marker": HERMES_OPEN}, body]}
        more = [{"star": {"seq": [{"lit": "\n"}, block]}}] if parallel else []
        if mode == "required":
            return {"seq": [_LEAD_WS, block] + more}
        text_then_call = {"text": {"exclude": [HERMES_OPEN], "then": HERMES_OPEN}}
        return {"alt": [{"text": {"exclude": [HERMES_OPEN]}},
                        {"seq": [text_then_call, body] + more}]}
    if fmt == "llama3_json":
        seq = {"seq": [call] + ([{"star": {"seq": [{"lit": "; "}, call]}}] if parallel else [])}
        calls = {"seq": [_LEAD_WS, {"opt": {"marker": PYTHON_TAG}}, seq]}
        if mode == "required":
            return calls
        text = {"exclude": [PYTHON_TAG], "lead_ws": " \n", "not_start": "{"}
        return {"alt": [calls, {"text": text}, {"seq": [{"text": {**text, "then": PYTHON_TAG}}, seq]}]}
    if fmt == "mistral":
        array = _calls_schema(tools, fmt, array=True, parallel=parallel)
        after_open: list[dict[str, Any]] = [{"ws": " ", "max": 1}, {"json": array}]
        if mode == "required":
            return {"seq": [_LEAD_WS, {"marker": MISTRAL_OPEN}] + after_open}
        return {"alt": [{"text": {"exclude": [MISTRAL_OPEN]}},
                        {"seq": [{"text": {"exclude": [MISTRAL_OPEN], "then": MISTRAL_OPEN}}] + after_open}]}
    raise GrammarError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")


def _mistral_v11_grammar(tools: Sequence[ToolDef], mode: str, parallel: bool, answer_schema: Optional[dict]) -> dict:
    """`[TOOL_CALLS]name[ARGS]{arguments}` per call: the name a declared tool's, the arguments its
    parameters (a JSON node of their own, named by `tool`, so local references resolve in them)."""
    after_open = {"alt": [{"seq": [{"lit": t.name}, {"marker": MISTRAL_ARGS}, {"json": t.parameters, "tool": t.name}]}
                          for t in tools]}
    more = [{"star": {"seq": [{"marker": MISTRAL_OPEN}, after_open]}}] if parallel else []
    calls = {"seq": [_LEAD_WS, {"marker": MISTRAL_OPEN}, after_open] + more}
    if mode == "required":
        return calls
    if answer_schema is not None:
        return {"alt": [calls, {"json": answer_schema, "answer": True}]}
    return {"alt": [{"text": {"exclude": [MISTRAL_OPEN]}},
                    {"seq": [{"text": {"exclude": [MISTRAL_OPEN], "then": MISTRAL_OPEN}}, after_open] + more}]}


def call_schemas_of(spec: ConstraintSpec) -> list[tuple[str, dict]]:
    """(tool name, call schema) for each tool of a "tool_calls" constraint, in declaration order:
    to find which tool's parameters make a tool-call grammar fail (compile each alone)."""
    found: list[tuple[str, dict]] = []

    def add(schema: dict, defs: Optional[dict]) -> None:
        for one in schema.get("anyOf", [schema]):
            name = one["properties"]["name"]["const"]
            if all(name != seen for seen, _ in found):
                # the root's $defs go along: the call's parameters may refer to them
                found.append((name, {**one, "$defs": defs} if defs else one))

    def visit(node: dict) -> None:
        if "json" in node and "tool" in node:  # mistral_v11: one tool's parameters
            if all(node["tool"] != seen for seen, _ in found):
                found.append((node["tool"], node["json"]))
        elif "json" in node and not node.get("answer"):  # the typed final answer is no call
            schema = node["json"]
            add(schema["items"] if schema.get("type") == "array" else schema, schema.get("$defs"))
        for key in ("seq", "alt"):
            for child in node.get(key, ()):
                visit(child)
        for key in ("star", "opt"):
            if key in node:
                visit(node[key])

    visit(json.loads(str(spec.payload))["grammar"])
    return found


def _allowed_tools(tool_choice: dict, tools: list[ToolDef]) -> tuple[str, list[ToolDef]]:
    """tool_choice {"type": "allowed_tools", ...}: Chat Completions nests {"mode", "tools"} under
    "allowed_tools", the Responses API gives them inline; each tool names a function either way."""
    nested = tool_choice.get("allowed_tools")
    spec: dict = nested if isinstance(nested, dict) else tool_choice
    mode = spec.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise GrammarError(f"tool_choice.allowed_tools.mode must be 'auto' or 'required', got {mode!r}")
    names: list[object] = []  # the client's values: not necessarily strings
    for entry in spec.get("tools") or []:
        fn = entry.get("function") if isinstance(entry, dict) and isinstance(entry.get("function"), dict) else entry
        names.append(fn.get("name") if isinstance(fn, dict) else None)
    by_name: dict[object, ToolDef] = {t.name: t for t in tools}
    unknown = [n for n in names if n not in by_name]
    if not names or unknown:
        raise GrammarError("tool_choice.allowed_tools.tools must name declared tools; "
                           f"{'none given' if not names else f'unknown: {unknown}'}")
    return mode, [by_name[n] for n in dict.fromkeys(names)]


def _choice_mode(tool_choice: Any, tools: list[ToolDef]) -> tuple[str, list[ToolDef]]:
    if tool_choice is None or tool_choice == "auto":
        return "auto", tools
    if tool_choice == "none":
        return "none", tools
    if tool_choice == "required" or tool_choice == "any":
        return "required", tools
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "allowed_tools":
        return _allowed_tools(tool_choice, tools)
    if isinstance(tool_choice, dict):
        nested = tool_choice.get("function")
        fn = nested if isinstance(nested, dict) else tool_choice
        name = fn.get("name")
        for t in tools:
            if t.name == name:
                return "named", [t]
        raise GrammarError(f"tool_choice names {name!r}, which is not among the tools "
                           f"({', '.join(t.name for t in tools)})")
    raise GrammarError(f"invalid tool_choice {tool_choice!r}: expected 'auto', 'none', 'required' "
                       "or {'type': 'function', 'function': {'name': ...}}")


# The payloads of the last distinct requests' tools (an agent loop repeats its tool list every turn;
# building the payload of 20 real tool schemas takes ~2.5 ms of the host).
_RECENT_PAYLOADS: RecentResults[Optional[str]] = RecentResults(capacity=64)


def tool_call_payload(tools: Sequence[Any], tool_choice: Any, fmt: str, parallel: bool = True,
                      answer_schema: Optional[dict] = None) -> Optional[str]:
    """The canonical JSON payload of a "tool_calls" constraint, or None (tool_choice "none" or no
    tools). `answer_schema`: a typed final answer allowed instead of calls (tool_choice "auto")."""
    return _RECENT_PAYLOADS.get_or_build(
        [list(tools or []), tool_choice, fmt, parallel, answer_schema],
        lambda: _build_tool_call_payload(tools, tool_choice, fmt, parallel, answer_schema))


def _build_tool_call_payload(tools: Sequence[Any], tool_choice: Any, fmt: str, parallel: bool,
                             answer_schema: Optional[dict]) -> Optional[str]:
    if fmt not in TOOL_FORMATS:
        raise GrammarError(f"unknown tool-call format {fmt!r}; expected one of {TOOL_FORMATS}")
    defs = parse_tools(tools)
    if not defs:
        return None
    mode, defs = _choice_mode(tool_choice, defs)
    if mode == "none":
        return None
    if mode == "named":  # one call of that tool, as vLLM answers a named tool_choice
        mode, parallel = "required", False
    grammar = tool_grammar(defs, fmt, mode, parallel, answer_schema)
    payload = {"format": fmt, "mode": mode, "parallel": parallel, "tools": [t.name for t in defs],
               "grammar": grammar}
    if answer_schema is not None and mode == "auto":
        payload["answer"] = True
    return canonical_json(payload)
