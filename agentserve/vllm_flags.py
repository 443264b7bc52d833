"""vLLM's `vllm serve` flags that agentserve takes as they are, so that a vLLM command line works here:
aliases onto agentserve's own options, and flags for behaviour agentserve always has (accepted, and
said so). A flag that asks for something agentserve does not do is an error naming it.

    --port N                    --http-port N
    --swap-space GiB            --swap-space-gb GiB
    --guided-decoding-backend   --grammar-backend (vLLM's "guidance" is llguidance)
    --chat-template, --generation-config: engine options (config.ModelConfig)
    --tool-call-parser NAME     checked against the format the chat template shows (agentserve reads
                                the tool-call format from the template; a different one is an error)
    --enable-auto-tool-choice, --enable-chunked-prefill, --trust-remote-code, --disable-log-requests,
    --disable-log-stats: accepted; what they turn on is always on here (or, for remote code, never needed)
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Optional

from agentserve.grammar.tool_formats import detect_tool_format

logger = logging.getLogger(__name__)

_ALWAYS_ON = {
    "enable_auto_tool_choice": "tool calling is always on (tool_choice auto / required / named / none)",
    "enable_chunked_prefill": "prefill is always chunked under max_num_batched_tokens",
    "trust_remote_code": "agentserve runs its own implementation of each supported architecture: no remote code",
    "disable_log_requests": "requests are not logged",
    "disable_log_stats": "stats go to /metrics, not the log",
}
# vLLM's --tool-call-parser names -> the chat-template formats agentserve parses.
_TOOL_PARSERS = {"hermes": "hermes", "llama3_json": "llama3_json", "mistral": "mistral"}
_GRAMMAR_BACKENDS = {"guidance": "llguidance", "llguidance": "llguidance", "xgrammar": "xgrammar",
                     "outlines": "outlines", "auto": "auto"}


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM compatibility (vllm serve's flags)")
    group.add_argument("--port", type=int, default=None, help="vLLM's name for --http-port")
    group.add_argument("--swap-space", type=float, default=None, dest="swap_space",
                       help="vLLM's name for --swap-space-gb (GiB of host memory for swapped-out KV)")
    group.add_argument("--guided-decoding-backend", default=None, dest="guided_decoding_backend",
                       help="vLLM's name for --grammar-backend ('guidance' is llguidance)")
    group.add_argument("--tool-call-parser", default=None, dest="tool_call_parser",
                       help=f"checked against the chat template's tool-call format ({', '.join(_TOOL_PARSERS)})")
    for name, why in _ALWAYS_ON.items():
        group.add_argument("--" + name.replace("_", "-"), action="store_true", default=None, dest=name,
                           help=f"accepted: {why}")


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
    backend = given.get("guided_decoding_backend")
    if backend is not None:
        if backend not in _GRAMMAR_BACKENDS:
            raise SystemExit(f"--guided-decoding-backend {backend!r} is not one of {sorted(_GRAMMAR_BACKENDS)}")
        kw["grammar_backend"] = _GRAMMAR_BACKENDS[backend]
    for name, why in _ALWAYS_ON.items():
        if given.get(name):
            logger.info("--%s: %s", name.replace("_", "-"), why)
    return kw


def check_tool_call_parser(parser: Optional[str], chat_template: Optional[str]) -> None:
    """vLLM's --tool-call-parser against the format agentserve reads from the chat template."""
    if parser is None:
        return
    if parser not in _TOOL_PARSERS:
        raise SystemExit(f"--tool-call-parser {parser!r}: agentserve parses {sorted(_TOOL_PARSERS)} tool calls")
    detected = detect_tool_format(chat_template) if chat_template else None
    if detected != _TOOL_PARSERS[parser]:
        raise SystemExit(f"--tool-call-parser {parser!r}: this model's chat template writes {detected or 'no'} tool "
                         "calls; agentserve parses the format the template shows (leave the flag out)")
