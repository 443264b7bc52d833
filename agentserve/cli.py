"""`agentserve serve | demo | generate | tiny-model | bench`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from pydantic import ValidationError

from agentserve.config import (CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig, ServerConfig,
                               SpecConfig)

_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, SpecConfig, ServerConfig)
_TOP_LEVEL = ("device", "attention_backend", "enforce_eager", "grammar_backend")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field (defaults stay in the pydantic models)."""
    seen = set()
    for cfg_cls in _SECTIONS:
        for name, field in cfg_cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            if field.annotation is bool:
                parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                    help=field.description)
            else:
                parser.add_argument(_flag(name), dest=name, default=None, help=field.description)
    for name in _TOP_LEVEL:
        field = EngineConfig.model_fields[name]
        if field.annotation is bool:
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=field.description)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "func")}
    engine_keys = {n for c in _SECTIONS for n in c.model_fields} | set(_TOP_LEVEL)
    kwargs = {k: v for k, v in given.items() if k in engine_keys and k != "model"}
    return EngineConfig.from_kwargs(given["model"], **kwargs)  # pydantic converts "8" -> 8 etc.


def cmd_generate(args: argparse.Namespace) -> int:
    from agentserve.llm import LLM
    from agentserve.sampling_params import SamplingParams

    llm = LLM.from_config(engine_config_from_args(args))
    params = SamplingParams(temperature=float(args.temperature), max_tokens=int(args.max_tokens),
                            seed=args.sampling_seed)
    start = time.perf_counter()
    outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(args.prompt, outputs):
        print(f"prompt: {prompt!r}\noutput: {out.outputs[0].text!r}  ({out.outputs[0].finish_reason})")
    n = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s)")
    return 0


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from agentserve.testing.tiny import make_tiny_model

    path = make_tiny_model(args.path, arch=args.arch, dtype=args.dtype)
    print(f"wrote a tiny {args.arch} model to {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agentserve.demo import run_demo

    return run_demo(arch=args.arch)


def cmd_serve(args: argparse.Namespace) -> int:
    from agentserve.service.serve import serve

    return serve(engine_config_from_args(args))


def cmd_bench(args: argparse.Namespace) -> int:
    import runpy

    script = args.script
    if not Path(script).exists() and (Path("benchmarks") / script).exists():
        script = str(Path("benchmarks") / script)
    sys.argv = [script, *args.rest]
    runpy.run_path(script, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentserve", description="LLM serving runtime for AI agents")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the gRPC and/or OpenAI-compatible HTTP server")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate from prompts with the offline API")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True)
    p.add_argument("--max-tokens", default=64)
    p.add_argument("--temperature", default=0.0)
    p.add_argument("--sampling-seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight model directory")
    p.add_argument("path")
    p.add_argument("--arch", default="qwen2")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("demo", help="run the main job on a built-in tiny model")
    p.add_argument("--arch", default="qwen2")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (default: fastpath.py, the GPU "
                                     "fast-path figures with their limits)")
    p.add_argument("script", nargs="?", default="benchmarks/fastpath.py")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValidationError, ValueError) as e:
        print(f"agentserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
