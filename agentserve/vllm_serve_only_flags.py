"""`vllm serve` flags without an agentserve option, so that a vLLM command line starts agentserve unchanged when
they are at vLLM's defaults: the engine's (the LLM keywords of agentserve/vllm_llm_options.py: --num-scheduler-steps
1, --no-enable-sleep-mode, -O0, ...) and the HTTP front end's own (--api-server-count 1, --max-log-len N, ...).
Any other value exits naming the flag and what to do instead; none of them changes the engine's config. The flags
stay out of --help (they do nothing here)."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from agentserve.vllm_llm_options import (ANY_VALUE, ANY_VALUE_SWITCHES, AT_DEFAULT, check_at_default,
                                         take_vllm_only_llm_kwargs)

logger = logging.getLogger(__name__)

# The HTTP front end's flags (not LLM keywords): name -> (the values accepted, why any other is refused).
SERVE_AT_DEFAULT: dict[str, tuple[tuple[Any, ...], str]] = {
    "api_server_count": ((1,), "one HTTP server process serves the API (it runs in the engine's process)"),
    "middleware": (([], None), "no middleware is imported from the command line"),
    "tool_parser_plugin": (("", None), "tool calls are parsed in the format the chat template shows; no plugins"),
    "enable_server_load_tracking": ((False,), "there is no /load endpoint: /metrics reports "
                                    "vllm:num_requests_running and vllm:num_requests_waiting"),
    "headless": ((False,), "the HTTP and gRPC servers run in the engine's process (no headless engine)"),
    "uds": ((None,), "the HTTP API listens on --host and --port (no Unix domain socket)"),
    "tool_server": ((None,), "no built-in tool servers run: tool calls go back to the client"),
    "log_config_file": ((None,), "logging is set by --uvicorn-log-level and Python's logging (no config file)"),
    "enable_tokenizer_info_endpoint": ((False,), "there is no /tokenizer_info endpoint (/tokenize and /detokenize "
                                       "are served)"),
    "enable_log_outputs": ((False,), "outputs are not logged"),
    "log_error_stack": ((False,), "error responses are not logged with their stack"),
    "tokens_only": ((False,), "the whole OpenAI API is served (no tokens-only mode)"),
    "enable_ssl_refresh": ((False,), "the certificate files are read when the server starts; restart it to serve a "
                           "renewed certificate"),
    "chat_template_content_format": (("auto", "string"), "content parts are joined into one string before the "
                                     "chat template (vLLM's 'string'); 'openai' part lists are not passed on"),
}
# name -> why any value is accepted.
SERVE_ANY_VALUE: dict[str, str] = {
    "max_log_len": "requests are not logged",
    "disable_frontend_multiprocessing": "the HTTP server runs in the engine's process",
}
SERVE_SWITCHES = frozenset(("disable_frontend_multiprocessing",))
# vllm serve's short forms.
SHORT_FLAGS = {"compilation_config": ("-O",)}


def _is_switch(name: str) -> bool:
    for table in (AT_DEFAULT, SERVE_AT_DEFAULT):
        if name in table:
            return all(isinstance(v, bool) for v in table[name][0])
    return name in ANY_VALUE_SWITCHES or name in SERVE_SWITCHES


def _names() -> list[str]:
    return sorted(set(AT_DEFAULT) | set(ANY_VALUE) | set(SERVE_AT_DEFAULT) | set(SERVE_ANY_VALUE))


def add_vllm_only_flags(group: "argparse._ArgumentGroup") -> None:
    """One flag per name: a switch for a boolean (--enable-sleep-mode, --no-use-tqdm-on-load), a value otherwise
    (--num-scheduler-steps 1). None is an agentserve option (argparse refuses a second definition)."""
    for name in _names():
        flags = ("--" + name.replace("_", "-"), *SHORT_FLAGS.get(name, ()))
        if _is_switch(name):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, dest=name,
                               help=argparse.SUPPRESS)
        else:
            group.add_argument(*flags, default=None, dest=name, metavar="VALUE", help=argparse.SUPPRESS)


def check_vllm_only_flags(given: dict[str, Any]) -> None:
    """The values given for those flags, typed as the LLM keywords are (JSON where it parses: 1, {}, [512]; the
    text otherwise), through their tables: SystemExit naming the flag for a value agentserve does not do."""
    for name in _names():
        value = given.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        try:
            if name in SERVE_AT_DEFAULT:
                check_at_default(name, value, SERVE_AT_DEFAULT)
            elif name in SERVE_ANY_VALUE:
                logger.info("--%s accepted: %s", name.replace("_", "-"), SERVE_ANY_VALUE[name])
            else:  # an LLM keyword's flag: judged as the keyword is
                take_vllm_only_llm_kwargs({name: value})
        except ValueError as e:
            raise SystemExit(f"--{name.replace('_', '-')}: {e}") from None
