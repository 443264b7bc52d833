"""`vllm serve` command lines as vLLM's FlexibleArgumentParser reads them, turned into the plain argparse
form before parsing: flag names with underscores (`--max_model_len 512` is `--max-model-len 512`),
`--config FILE.yaml`, a YAML mapping of long flag names to values that the command line's own flags
override (vLLM puts the file's flags first, so a flag typed on the command line wins), and the dotted form
of JSON flags (`--speculative-config.method ngram` is `--speculative-config '{"method": "ngram"}'`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection

import yaml


def dashed_flag_names(words: list[str]) -> list[str]:
    """`--a_b[=v]` as `--a-b[=v]` (`--a_b.c_d` as `--a-b.c_d`); values, short flags and what follows a bare `--`
    as given."""
    out: list[str] = []
    for i, word in enumerate(words):
        if word == "--":
            return out + words[i:]
        if word.startswith("--") and not word.startswith("---"):
            name, eq, value = word.partition("=")
            flag, dot, keys = name.partition(".")  # a JSON flag's dotted keys keep their own spelling
            word = "--" + flag[2:].replace("_", "-") + dot + keys + eq + value
        out.append(word)
    return out


def _config_path(words: list[str]) -> tuple[str | None, list[str]]:
    """The --config file named in `words` (None: none) and the words without it."""
    for i, word in enumerate(words):
        if word == "--config":
            if i + 1 >= len(words):
                raise ValueError("--config needs a YAML file: --config FILE.yaml")
            return words[i + 1], words[:i] + words[i + 2:]
        if word.startswith("--config="):
            return word.split("=", 1)[1], words[:i] + words[i + 1:]
    return None, words


def _flag_words(key: Any, value: Any, known_flags: Collection[str], where: str) -> list[str]:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{where}: every key must be a flag's long name (e.g. max-model-len); got {key!r}")
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        if value:
            return [flag]
        negated = "--no-" + flag[2:]
        return [negated] if negated in known_flags else []  # a store_true flag's false is its default
    if value is None:
        return []
    if isinstance(value, list):
        return [flag, *(json.dumps(v) if isinstance(v, (dict, list)) else str(v) for v in value)]
    if isinstance(value, dict):
        return [flag, json.dumps(value)]
    return [flag, str(value)]


def expand_config_file(words: list[str], known_flags: Collection[str]) -> list[str]:
    """`serve ... --config FILE ...` as `serve <the file's flags> ...` (the command line's flags after them)."""
    path, rest = _config_path(words)
    if path is None:
        return words
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--config {path}: not valid YAML ({e})") from None
    if loaded is None:
        return rest
    if not isinstance(loaded, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, e.g. 'max-model-len: 4096'")
    flags = [w for key, value in loaded.items() for w in _flag_words(key, value, known_flags, f"--config {path}")]
    # `serve MODEL` keeps its positional model first: after a list flag of the file it would be a list item.
    head = 2 if len(rest) > 1 and not rest[1].startswith("-") else 1
    return rest[:head] + flags + rest[head:]


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word (ngram, a path) is a string


def folded_json_flags(words: list[str], known_flags: Collection[str]) -> list[str]:
    """`--flag.key[.key...][+] value` (or `=value`) for a flag whose value is JSON, folded into one `--flag JSON`
    (merged into the flag's own JSON when it is given too; `+` appends to a list), as vLLM's JSON arguments."""
    out: list[str] = []
    objects: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        name, eq, value = word.partition("=")
        base, dot, path = name.partition(".")
        if not (word.startswith("--") and dot and base in known_flags and name not in known_flags):
            out.append(word)
            i += 1
            continue
        if not eq:
            if i + 1 >= len(words):
                raise ValueError(f"{name} needs a value")
            value, i = words[i + 1], i + 1
        i += 1
        if base not in objects:
            objects[base] = {}
            out += [base, ""]  # the folded JSON goes where the flag first appeared
        node, keys = objects[base], path.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"{name}: {key!r} is given both as a value and as an object")
        last = keys[-1]
        if last.endswith("+"):
            node.setdefault(last[:-1], []).append(_json_value(value))
        else:
            node[last] = _json_value(value)
    for base, obj in objects.items():
        explicit = [k for k, w in enumerate(out) if w == base and k + 1 < len(out) and out[k + 1] != ""]
        for k in explicit:  # the flag's own JSON too: the dotted keys merged into it, given once
            given = _json_value(out[k + 1])
            obj = {**given, **obj} if isinstance(given, dict) else obj
            del out[k:k + 2]
        at = out.index(base)
        out[at + 1] = json.dumps(obj)
    return out
