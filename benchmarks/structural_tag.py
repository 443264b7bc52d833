"""Structural tags against the tool-call constraint they can express: compile time and per-token mask time.

A Hermes-style tool set (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` after free text)
is constrained two ways on each grammar backend: as the server's own tool_choice="auto" constraint
(ConstraintSpec kind "tool_calls") and as the structural tag a vLLM client would send for it
(triggers ["<tool_call>"], one structure per tool). Both compile to the same kind of structure tree, so
they should cost about the same; this measures it. Tools' parameters are the first N object schemas of
the real-world sample that every backend compiles. Walks are steered into a call (the trigger fed), then
random; every finished call's arguments are validated with jsonschema.

    python benchmarks/structural_tag.py --tools 1,8,32 --out benchmarks/results/s36/structural_tag.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "schemas" / "sample.jsonl"


def _tools(n: int, backends: list[str], info: Any) -> list[dict]:
    """The first `n` object schemas of the sample that every backend compiles as a tool's parameters."""
    from agentserve.grammar.compiler import GrammarCompiler
    from agentserve.grammar.interface import GrammarError
    from agentserve.grammar.registry import get_backend
    from agentserve.grammar.spec import build_tool_constraint

    schemas = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    params = [s.get("schema", s) for s in schemas]
    plain = [p for p in params if isinstance(p, dict) and p.get("type") == "object" and "$ref" not in json.dumps(p)
             and len(json.dumps(p)) < 2000]
    tools: list[dict] = []
    for p in plain:
        tool = {"type": "function", "function": {"name": f"tool_{len(tools)}", "parameters": p}}
        try:
            for b in backends:
                GrammarCompiler(get_backend(b), info, timeout_s=30.0).compile(build_tool_constraint([tool], "auto", "hermes"))
        except GrammarError:
            continue
        tools.append(tool)
        if len(tools) == n:
            break
    return tools


def _as_structural_tag(tools: list[dict]) -> dict:
    structures = [{"begin": "<tool_call>\n", "end": "\n</tool_call>", "schema": {
        "type": "object", "properties": {"name": {"const": t["function"]["name"]}, "arguments": t["function"]["parameters"]},
        "required": ["name", "arguments"], "additionalProperties": False}} for t in tools]
    return {"type": "structural_tag", "triggers": ["<tool_call>"], "structures": structures}


def _calls_valid(text: str, tools: list[dict]) -> tuple[int, int]:
    """(calls, valid calls) in a walk's text: each `<tool_call>` followed by a call object whose arguments
    validate against the named tool's parameters (jsonschema), then its end."""
    import jsonschema

    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls = valid = 0
    for part in text.split("<tool_call>")[1:]:
        calls += 1
        try:
            call, end = json.JSONDecoder().raw_decode(part, len(part) - len(part.lstrip()))
            jsonschema.validate(call["arguments"], params[call["name"]])
            valid += part[end:].lstrip().startswith("</tool_call>")
        except (ValueError, KeyError, TypeError, jsonschema.ValidationError):
            pass
    return calls, valid


def _measure(backend: str, spec: Any, info: Any, tok: Any, walks: int, tools: list[dict]) -> dict[str, Any]:
    from agentserve.grammar.compiler import GrammarCompiler
    from agentserve.grammar.registry import get_backend
    from helpers.grammar_walks import decode, random_walk

    t0 = time.perf_counter()
    compiled = GrammarCompiler(get_backend(backend), info, timeout_s=120.0).compile(spec)
    compile_ms = (time.perf_counter() - t0) * 1e3
    trigger = tok.encode("Calling it now. <tool_call>\n", add_special_tokens=False)
    steps: list[float] = []
    finished = calls = valid = 0
    for w in range(walks):
        matcher = compiled.new_matcher()
        assert all(matcher.accept_token(t) for t in trigger)
        walk = random_walk(matcher, random.Random(w), max_tokens=300, eos_prob=0.5)
        steps += walk.step_seconds
        if walk.finished:
            finished += 1
            got = _calls_valid(decode(info, trigger + walk.tokens), tools)
            calls, valid = calls + got[0], valid + got[1]
    return {"compile_ms": compile_ms, "mask_us_p50": statistics.median(steps) * 1e6 if steps else None,
            "mask_us_mean": statistics.fmean(steps) * 1e6 if steps else None, "walks_finished": finished,
            "calls": calls, "calls_valid": valid}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tools", default="1,8,32")
    ap.add_argument("--backends", default="llguidance,xgrammar,outlines")
    ap.add_argument("--walks", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from agentserve.grammar.interface import GrammarError
    from agentserve.grammar.spec import ConstraintSpec, build_tool_constraint
    from agentserve.testing.tiny import tiny_model_cached
    from helpers.grammar_walks import tokenizer_info_for

    tok, info = tokenizer_info_for(tiny_model_cached("qwen2"))
    backends = args.backends.split(",")
    counts = [int(x) for x in args.tools.split(",")]
    every = _tools(max(counts), backends, info)  # also the warm-up: each backend's tokenizer set up before timing
    rows = []
    for n in counts:
        tools = every[:n]
        specs = {"tool_calls": build_tool_constraint(tools, "auto", "hermes"),
                 "structural_tag": ConstraintSpec.structural_tag(_as_structural_tag(tools))}
        for backend in backends:
            for kind, spec in specs.items():
                try:
                    row = {"tools": len(tools), "backend": backend, "kind": kind,
                           **_measure(backend, spec, info, tok, args.walks, tools)}
                except GrammarError as e:
                    row = {"tools": len(tools), "backend": backend, "kind": kind, "error": str(e)[:160]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'tools':>5} {'backend':<11} {'kind':<15} {'compile ms':>10} {'mask us p50':>11} {'mean':>8} "
          f"{'valid calls':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['tools']:>5} {r['backend']:<11} {r['kind']:<15} refused: {r['error'][:60]}")
        else:
            print(f"{r['tools']:>5} {r['backend']:<11} {r['kind']:<15} {r['compile_ms']:>10.1f} "
                  f"{r['mask_us_p50']:>11.1f} {r['mask_us_mean']:>8.1f} {r['calls_valid']:>5}/{r['calls']:<5}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
