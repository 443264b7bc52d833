"""vLLM's `vllm serve` flags that agentserve takes as they are, so that a vLLM command line works here:
aliases onto agentserve's own options, and flags for behaviour agentserve always has (accepted, and
said so). A flag that asks for something agentserve does not do is an error naming it. LLM(...) reads
vLLM's keywords of these flags the same way (engine_kwargs_from_vllm_llm_kwargs).

    --port N                    --http-port N
    --swap-space GiB            --swap-space-gb GiB
    --scheduling-policy NAME    --policy NAME (fcfs or priority)
    --guided-decoding-backend   --grammar-backend (vLLM's "guidance" is llguidance)
    --chat-template, --generation-config: engine options (config.ModelConfig)
    --tool-call-parser NAME     checked against the format the chat template shows (agentserve reads
                                the tool-call format from the template; a different one is an error)
    --enable-auto-tool-choice, --enable-chunked-prefill, --trust-remote-code, --disable-log-requests,
    --disable-log-stats: accepted; what they turn on is always on here (or, for remote code, never needed)
    --quantization NAME         fp8; vLLM's names for what the checkpoint already says (gguf for a GGUF
                                file, compressed-tensors / fbgemm_fp8 / fp8 for such a checkpoint) are
                                accepted; every other method (awq, gptq, bitsandbytes, ...) is an error
    --kv-cache-dtype NAME       auto, fp8, fp8_e4m3; vLLM's fp8_e5m2 / bfloat16 / ... are errors saying why
    --dtype half|float          vLLM's aliases of float16 / float32 (config.DTYPE_ALIASES)
    --num-scheduler-steps 1, -O0, --api-server-count 1, ...: vLLM's flags without an agentserve option
                                (agentserve/vllm_serve_only_flags.py): accepted at their defaults, any other
                                value an error naming the flag and what to do instead
    VLLM_API_KEY (environment)  the API key when neither --api-key nor --api-key-file is given, as vLLM
                                reads it (a deployment that keeps its key there must not come up open)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from agentserve.grammar.registry import VLLM_BACKEND_NAMES
from agentserve.grammar.tool_formats import detect_tool_format
from agentserve.model.gguf_files import find_gguf_file
from agentserve.vllm_llm_options import take_vllm_only_llm_kwargs
from agentserve.vllm_serve_only_flags import add_vllm_only_flags, check_vllm_only_flags

logger = logging.getLogger(__name__)

_ALWAYS_ON = {
    "enable_auto_tool_choice": "tool calling is always on (tool_choice auto / required / named / none)",
    "enable_chunked_prefill": "prefill is always chunked under max_num_batched_tokens",
    "trust_remote_code": "agentserve runs its own implementation of each supported architecture: no remote code",
    "disable_log_requests": "requests are not logged",
    "disable_log_stats": "stats go to /metrics, not the log",
    "disable_fastapi_docs": "the API's docs pages (/docs, /redoc, /openapi.json) are never served",
    "enable_prompt_tokens_details": "usage.prompt_tokens_details.cached_tokens is always reported",
}
# vLLM's --tool-call-parser names -> the chat-template formats agentserve parses.
_TOOL_PARSERS = {"hermes": ("hermes",), "llama3_json": ("llama3_json",),
                 "mistral": ("mistral", "mistral_v11")}  # vLLM's mistral parser reads both, by tokenizer version


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM compatibility (vllm serve's flags)")
    group.add_argument("--port", type=int, default=None, help="vLLM's name for --http-port")
    group.add_argument("--swap-space", type=float, default=None, dest="swap_space",
                       help="vLLM's name for --swap-space-gb (GiB of host memory for swapped-out KV)")
    group.add_argument("--scheduling-policy", default=None, dest="scheduling_policy", choices=("fcfs", "priority"),
                       help="vLLM's name for --policy")
    group.add_argument("--guided-decoding-backend", "--structured-outputs-config.backend", default=None,
                       dest="guided_decoding_backend",
                       help="vLLM's names for --grammar-backend ('guidance' is llguidance)")
    group.add_argument("--tool-call-parser", default=None, dest="tool_call_parser",
                       help=f"checked against the chat template's tool-call format ({', '.join(_TOOL_PARSERS)})")
    for name, why in _ALWAYS_ON.items():
        # vLLM's --no-enable-chunked-prefill turns chunking off: refused by name (agentserve has no unchunked path).
        action = argparse.BooleanOptionalAction if name == "enable_chunked_prefill" else "store_true"
        group.add_argument("--" + name.replace("_", "-"), action=action, default=None, dest=name,
                           help=f"accepted: {why}")
    add_vllm_only_flags(group)  # vLLM's flags without an agentserve option: at their defaults (not in --help)


def engine_kwargs_from_vllm_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The engine keyword arguments the vLLM flags given stand for (errors name the flag)."""
    kw: dict[str, Any] = {}
    given = vars(args)
    if given.get("port") is not None:
        if given.get("http_port") not in (None, given["port"]):
            raise SystemExit("--port and --http-port name different ports; give one")
        kw["http_port"] = given["port"]
    if given.get("swap_space") is not None:
        kw["swap_space_gb"] = given["swap_space"]
    if given.get("scheduling_policy") is not None:
        if given.get("policy") not in (None, given["scheduling_policy"]):
            raise SystemExit("--scheduling-policy and --policy name different policies; give one")
        kw["policy"] = given["scheduling_policy"]
    env_key = os.environ.get("VLLM_API_KEY")
    if env_key and given.get("api_key") is None and given.get("api_key_file") is None:
        kw["api_key"] = env_key
        logger.info("the API key is VLLM_API_KEY's (vLLM's environment variable for --api-key)")
    backend = given.get("guided_decoding_backend")
    if backend is not None:
        if backend not in VLLM_BACKEND_NAMES:
            raise SystemExit(f"--guided-decoding-backend {backend!r} is not one of {sorted(VLLM_BACKEND_NAMES)}")
        kw["grammar_backend"] = VLLM_BACKEND_NAMES[backend]
    if given.get("enable_chunked_prefill") is False:
        raise SystemExit("--no-enable-chunked-prefill: agentserve always chunks prefill under "
                         "--max-num-batched-tokens (there is no unchunked path); leave the flag out")
    for name, why in _ALWAYS_ON.items():
        if given.get(name):
            logger.info("--%s: %s", name.replace("_", "-"), why)
    check_vllm_only_flags(given)  # refuses what agentserve does not do, naming the flag; the rest changes nothing
    return kw


def engine_kwargs_from_vllm_llm_kwargs(kwargs: dict[str, Any], model: str = "") -> dict[str, Any]:
    """vLLM's LLM(...) keywords of the flags above, read as the CLI reads them: swap_space (GiB) is
    swap_space_gb, guided_decoding_backend and structured_outputs_config={'backend': ...} are
    grammar_backend, and those of behaviour agentserve always has are accepted (turning chunked prefill
    off is not: agentserve has no unchunked path); vLLM's keywords without an agentserve option are
    accepted at their defaults (agentserve/vllm_llm_options.py); `quantization` and `kv_cache_dtype` take
    the CLI's values and reasons (gguf, compressed-tensors, fbgemm_fp8 where the checkpoint is one)."""
    kw = _llm_quantization(take_vllm_only_llm_kwargs(kwargs), model)  # tokenizer_mode, revision, ... at defaults
    backends = [kw.pop("guided_decoding_backend", None)]  # vLLM's older keyword, then its structured outputs'
    outputs_config = kw.pop("structured_outputs_config", None)
    if outputs_config is not None:
        if not isinstance(outputs_config, dict) or set(outputs_config) - {"backend"}:
            raise ValueError(f"structured_outputs_config={outputs_config!r}: only {{'backend': name}} is supported "
                             f"(one of {sorted(VLLM_BACKEND_NAMES)})")
        backends.append(outputs_config.get("backend"))
    for backend in filter(None, backends):
        if backend not in VLLM_BACKEND_NAMES:
            raise ValueError(f"structured outputs backend {backend!r} is not one of {sorted(VLLM_BACKEND_NAMES)}")
        if kw.setdefault("grammar_backend", VLLM_BACKEND_NAMES[backend]) != VLLM_BACKEND_NAMES[backend]:
            raise ValueError(f"structured outputs backend {backend!r} and grammar_backend "
                             f"{kw['grammar_backend']!r} disagree; give one")
    if "swap_space" in kw:
        if "swap_space_gb" in kw:
            raise ValueError("swap_space and swap_space_gb are the same option; give one")
        kw["swap_space_gb"] = kw.pop("swap_space")
    if "scheduling_policy" in kw:
        if "policy" in kw:
            raise ValueError("scheduling_policy and policy are the same option; give one")
        kw["policy"] = kw.pop("scheduling_policy")
    if kw.get("enable_chunked_prefill") is False:
        raise ValueError("enable_chunked_prefill=False: agentserve always chunks prefill under max_num_batched_tokens")
    for name, why in _ALWAYS_ON.items():
        if name in kw:
            kw.pop(name)
            logger.info("%s: %s", name, why)
    return kw


def _llm_quantization(kw: dict[str, Any], model: str) -> dict[str, Any]:
    """LLM(quantization=..., kv_cache_dtype=...) read as the CLI reads its flags, a ValueError naming the keyword."""
    method = kw.get("quantization")
    if isinstance(method, str) and method != "fp8":
        try:
            kw["quantization"] = quantization_from_flag(method, model)
        except SystemExit as e:
            raise ValueError(str(e).replace(f"--quantization {method}", f"quantization={method!r}", 1)) from None
    if kw.get("kv_cache_dtype") in _KV_CACHE_DTYPE_REFUSALS:
        raise ValueError(f"kv_cache_dtype={kw['kv_cache_dtype']!r} is not supported: "
                         f"{_KV_CACHE_DTYPE_REFUSALS[kw['kv_cache_dtype']]}")
    return kw


def check_tool_call_parser(parser: Optional[str], chat_template: Optional[str]) -> None:
    """vLLM's --tool-call-parser against the format agentserve reads from the chat template."""
    if parser is None:
        return
    if parser not in _TOOL_PARSERS:
        raise SystemExit(f"--tool-call-parser {parser!r}: agentserve parses {sorted(_TOOL_PARSERS)} tool calls")
    detected = detect_tool_format(chat_template) if chat_template else None
    if detected not in _TOOL_PARSERS[parser]:
        raise SystemExit(f"--tool-call-parser {parser!r}: this model's chat template writes {detected or 'no'} tool "
                         "calls; agentserve parses the format the template shows (leave the flag out)")


# vLLM's --quantization methods that name a checkpoint's own quantization_config: agentserve reads
# that config whether or not the flag is given, so the flag only has to agree with it.
_CHECKPOINT_METHODS = ("compressed-tensors", "fbgemm_fp8")
_QUANTIZATION_HINT = ("agentserve serves FP8: --quantization fp8 quantizes a 16-bit checkpoint at load, and FP8 "
                      "checkpoints (compressed-tensors, fp8, fbgemm_fp8) and GGUF files load without the flag")


def quantization_from_flag(method: str, model: str) -> Optional[str]:
    """The engine's `quantization` for vLLM's --quantization METHOD (None: the checkpoint says it all).
    Refusing the methods agentserve has no kernels for is the honest answer: their packed integer
    weights served any other way would be garbage, and vLLM itself errors on a method the checkpoint
    does not match."""
    if method == "fp8":
        return "fp8"
    path = Path(model).expanduser()
    if method == "gguf":
        if path.exists() and find_gguf_file(path) is not None:
            return None  # the GGUF's tensors are dequantized at load (model/gguf.py)
        raise SystemExit(f"--quantization gguf: {model} is not a .gguf file (nor a directory holding one); "
                         "leave the flag out for a Hugging Face checkpoint")
    if method in _CHECKPOINT_METHODS:
        config_file = path / "config.json"
        found = (json.loads(config_file.read_text()).get("quantization_config") or {}).get("quant_method") \
            if config_file.is_file() else None
        if found == method:
            return None
        raise SystemExit(f"--quantization {method}: the checkpoint's quantization_config says {found or 'none'}; "
                         f"leave the flag out ({_QUANTIZATION_HINT})")
    raise SystemExit(f"--quantization {method}: agentserve cannot serve {method} weights ({_QUANTIZATION_HINT}); "
                     "serve the model's 16-bit or FP8 checkpoint instead")


# vLLM's --kv-cache-dtype values agentserve does not take, and why.
_KV_CACHE_DTYPE_REFUSALS = {
    "fp8_e5m2": "agentserve's fp8 KV pages are e4m3 (with calibrated per-layer scales): use --kv-cache-dtype fp8",
    "bfloat16": "the KV pages are in the model's dtype: use --kv-cache-dtype auto (with --dtype bfloat16 for bf16)",
    "float16": "the KV pages are in the model's dtype: use --kv-cache-dtype auto (with --dtype float16 for fp16)",
    "fp8_inc": "Intel Gaudi's fp8 is not supported: use --kv-cache-dtype fp8 (e4m3)",
    "fp8_ds_mla": "DeepSeek MLA's fp8 layout is not supported: use --kv-cache-dtype fp8 (e4m3)",
}


def kv_cache_dtype_flag(value: str) -> str:
    """argparse type of --kv-cache-dtype: vLLM's values agentserve refuses get a reason, not only a list."""
    if value in _KV_CACHE_DTYPE_REFUSALS:
        raise argparse.ArgumentTypeError(f"{value!r} is not supported: {_KV_CACHE_DTYPE_REFUSALS[value]}")
    return value
