"""Per-request limits and text validity at the edge, shared by the HTTP adapter, the gRPC service and
the offline API: counts (messages, tools, stop strings, bad words), JSON schema size and nesting depth, and
strings that are not valid UTF-8 (a lone surrogate such as "\\ud800", which JSON can spell but no
tokenizer can take). Each failure is an EdgeLimitError naming the field, checked before the request
costs any work that grows with its size.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from agentserve.config import ServerConfig
from agentserve.errors import FieldError
from agentserve.sampling_params import SamplingParams


class EdgeLimitError(FieldError):
    """A request over a limit, or with an invalid string: HTTP 400 / gRPC INVALID_ARGUMENT."""


def check_count(count: int, limit: int, field: str, flag: str) -> None:
    if count > limit:
        raise EdgeLimitError(f"{field} has {count} entries; this server takes at most {limit} (--{flag})", field)


def check_token_id_count(count: int, vocab_size: int, field: str) -> None:
    """A token-id set (allowed_token_ids, stop_token_ids) longer than the vocabulary only repeats ids: refused
    by its length, before any pass over its elements (millions of ids held the event loop for seconds)."""
    if count > vocab_size:
        raise EdgeLimitError(f"{field} has {count} entries, more than the model's {vocab_size} token ids; "
                             "list each id once", field)


def schema_depth(schema: Any) -> int:
    """Nesting depth of objects and arrays, iteratively (a deep schema must not exhaust the stack)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in node)
    return deepest


def check_schema(schema: Any, field: str, limits: ServerConfig) -> None:
    """A JSON schema's size (bytes of its JSON text) and nesting depth. A string is parsed first."""
    if isinstance(schema, str):
        size = len(schema.encode("utf-8", "surrogatepass"))
        if size > limits.max_schema_bytes:
            raise EdgeLimitError(f"{field} is {size} bytes; the limit is {limits.max_schema_bytes} "
                                 "(--max-schema-bytes)", field)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            return  # not JSON: the constraint's own validation names it
    depth = schema_depth(schema)
    if depth > limits.max_schema_depth:
        raise EdgeLimitError(f"{field} nests {depth} levels deep; the limit is {limits.max_schema_depth} "
                             "(--max-schema-depth)", field)
    size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if size > limits.max_schema_bytes:
        raise EdgeLimitError(f"{field} is {size} bytes of JSON; the limit is {limits.max_schema_bytes} "
                             "(--max-schema-bytes)", field)


def _check_strings(strings: Optional[Sequence[str]], field: str, max_count: int, count_flag: str,
                   max_chars: int, chars_flag: str) -> None:
    if not strings:
        return
    check_count(len(strings), max_count, field, count_flag)
    for i, s in enumerate(strings):
        if isinstance(s, str) and len(s) > max_chars:
            raise EdgeLimitError(f"{field}[{i}] is {len(s)} characters; the limit is {max_chars} (--{chars_flag})",
                                 f"{field}[{i}]")


def check_stop(stop: Optional[Sequence[str]], limits: ServerConfig, field: str = "stop") -> None:
    _check_strings(stop, field, limits.max_stop_strings, "max-stop-strings", limits.max_stop_string_chars,
                   "max-stop-string-chars")


def check_bad_words(bad_words: Optional[Sequence[str]], limits: ServerConfig, field: str = "bad_words") -> None:
    """Each bad word is tokenized when the request is added and matched against the output at every
    step, on the step thread: an unbounded list would stall every other request."""
    _check_strings(bad_words, field, limits.max_bad_words, "max-bad-words", limits.max_bad_word_chars,
                   "max-bad-word-chars")


# OpenAI's limits on `metadata` (Responses, Assistants): 16 pairs, keys of at most 64 characters,
# values of at most 512. A session echoes its metadata in every SessionInfo, so it must stay small.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


def check_metadata(metadata: Mapping[str, str], field: str = "metadata") -> None:
    """Pair count, key and value lengths, and valid UTF-8 (metadata is stored and echoed back)."""
    check_utf8(metadata, field)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise EdgeLimitError(f"{field} has {len(metadata)} pairs; at most {MAX_METADATA_PAIRS} are allowed", field)
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise EdgeLimitError(f"{field} key {key[:16]!r}... is {len(key)} characters; keys may have at most "
                                 f"{MAX_METADATA_KEY_CHARS}", field)
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise EdgeLimitError(f"{field}[{key!r}] is {len(value)} characters; values may have at most "
                                 f"{MAX_METADATA_VALUE_CHARS}", f"{field}[{key!r}]")


def check_tools(tools: Optional[Sequence[dict[str, Any]]], limits: ServerConfig, field: str = "tools") -> None:
    """Tool count, and each tool's parameter schema."""
    if not tools:
        return
    check_count(len(tools), limits.max_tools, field, "max-tools")
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        if params is not None:
            check_schema(params, f"{field}[{i}].function.parameters", limits)


def _lone_surrogate(text: str) -> Optional[int]:
    if text.isascii():  # the common case, in C, without copying
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def check_utf8(value: Any, field: str) -> None:
    """Every string in `value` (a string, or lists/dicts of them, keys included) is valid UTF-8; the
    first that is not is named by its path (`messages[0].content`). Iterative: no recursion limit."""
    # Paths are built only for the nodes that hold text: a token-id list of millions of ints is skipped by
    # one C-level scan of its element types (a path string per element held the event loop for seconds).
    stack: list[tuple[Any, str]] = [(value, field)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            at = _lone_surrogate(node)
            if at is not None:
                raise EdgeLimitError(f"{path} is not valid UTF-8: a lone surrogate (U+{ord(node[at]):04X}) at "
                                     f"character {at}; send text as valid Unicode", path)
        elif isinstance(node, dict):
            for k, v in node.items():
                sub = f"{path}.{k}" if path else str(k)
                if isinstance(k, str):
                    stack.append((k, sub))
                if not isinstance(v, _SCALARS):
                    stack.append((v, sub))
        elif isinstance(node, (list, tuple)):
            if _SCALAR_TYPES.issuperset(set(map(type, node))):
                continue
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node) if not isinstance(v, _SCALARS))


_SCALARS = (int, float, bool, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)


def check_sampling(params: SamplingParams, limits: ServerConfig) -> None:
    """The limits a SamplingParams carries (stop strings, the JSON schema, tools): for the offline API,
    whose requests come as SamplingParams rather than through an HTTP or gRPC edge."""
    stop = [params.stop] if isinstance(params.stop, str) else params.stop
    check_stop(stop, limits)
    check_bad_words(params.bad_words, limits)
    if params.json_schema is not None:
        check_schema(params.json_schema, "json_schema", limits)
    check_tools(params.tools, limits)
