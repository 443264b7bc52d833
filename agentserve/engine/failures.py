"""What a request that fails inside a step is told, and what the log says about it.

A failure inside a step belongs to one request whenever it can be traced to one (its grammar, its
detokenizer, its sampling parameters); that request alone finishes with an error. Messages carry only
the failing request's own data, and logs carry request ids and exception types, never prompts,
grammars or exception texts (which may quote either)."""

from __future__ import annotations

import logging
import traceback
from typing import Sequence

from agentserve.request import Request

logger = logging.getLogger("agentserve.engine")

# Longest exception text handed back to the request it belongs to.
MAX_ERROR_DETAIL_CHARS = 300

STEP_FAILED = ("internal error: the engine step running this request failed and it was stopped; "
               "retry the request (the server log names its id)")
STEP_FAILED_FOR_NEW_REQUEST = ("internal error: the engine step that admitted this request failed; the request was "
                               "stopped so that the others could go on (the server log names its id)")


def request_failure_message(where: str, req: Request, error: BaseException) -> str:
    """The error a request gets for a failure traced to it (its own data only), logged by id."""
    logger.warning("request %s failed %s: %s", req.request_id, where, type(error).__name__)
    detail = str(error)
    if len(detail) > MAX_ERROR_DETAIL_CHARS:
        detail = detail[:MAX_ERROR_DETAIL_CHARS] + "..."
    return f"the request failed {where}: {type(error).__name__}: {detail}"


def log_step_failure(stage: str, error: BaseException, request_ids: Sequence[str]) -> None:
    """Logs a failure no single request can be blamed for: its type, the stack (file and line, no
    values) and the ids of the requests involved, not the exception text."""
    stack = "".join(traceback.format_tb(error.__traceback__))
    logger.error("%s failed (%s) with requests %s\n%s", stage, type(error).__name__,
                 ", ".join(request_ids), stack)
