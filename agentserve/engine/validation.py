"""Request checks that need the model (its vocabulary), run by Engine.validate before a request is queued."""

from __future__ import annotations

from typing import Optional

from agentserve.errors import FieldError, InvalidRequestError
from agentserve.grammar.registry import DEFAULT_BACKEND, VLLM_BACKEND_NAMES
from agentserve.sampling_params import SamplingParams


def truncate_prompt(token_ids: list[int], params: SamplingParams, max_model_len: int) -> list[int]:
    """The prompt's last truncate_prompt_tokens tokens (vLLM's left truncation); -1 keeps what the model
    can take with room for one output token."""
    k = params.truncate_prompt_tokens
    if k is None:
        return token_ids
    k = max_model_len - 1 if k == -1 else k
    return token_ids[-k:] if len(token_ids) > k else token_ids


def logprobs_limit(max_logprobs: int, vocab: int) -> int:
    """The most logprobs a request may ask for: the engine's max_logprobs (vLLM's flag; -1: no cap),
    never past the vocabulary (top-n of more tokens than the logits have would fail inside a step)."""
    return vocab if max_logprobs == -1 else min(max_logprobs, vocab)


def validate_logprobs(params: SamplingParams, max_logprobs: int, vocab: int) -> None:
    limit = logprobs_limit(max_logprobs, vocab)
    for name, value in (("logprobs", params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
        if value is not None and value > limit:
            raise InvalidRequestError(f"{name} must be in [0, {limit}], got {value} (the server's --max-logprobs "
                                      f"is {max_logprobs})")


def validate_vocab_params(params: SamplingParams, vocab: int) -> None:
    """The parts of SamplingParams only checkable against the model's vocabulary: out of it they
    would index past the logits inside a step (where the failure would hit the whole batch)."""
    if params.top_k > vocab:
        raise InvalidRequestError(f"top_k must be at most the vocabulary size ({vocab}), or 0 / -1 to "
                                  f"disable it; got {params.top_k}")
    bad = [t for t in params.stop_token_ids if t >= vocab]
    if bad:
        raise InvalidRequestError(f"stop_token_ids must be token ids in [0, {vocab}); got {bad[:5]}")
    bad = [t for t in (params.logit_bias or {}) if t >= vocab]
    if bad:
        raise InvalidRequestError(f"logit_bias keys must be token ids in [0, {vocab}); got {bad[:5]}")
    bad = [t for t in (params.allowed_token_ids or []) if t >= vocab]
    if bad:
        raise InvalidRequestError(f"allowed_token_ids must be token ids in [0, {vocab}); got {bad[:5]}")


def check_priority(priority: int, policy: str) -> None:
    """vLLM's rule: a request priority under the fcfs policy would be ignored, so it is the caller's mistake,
    not a no-op (one check for the HTTP API, gRPC and the offline LLM, all of which pass priorities)."""
    if priority != 0 and policy != "priority":
        raise FieldError(f"priority is {priority}, but the engine schedules first come, first served: start it with "
                         "--scheduling-policy priority (LLM(..., scheduling_policy='priority')), or leave priority "
                         "out", "priority")


def check_requested_backend(requested: Optional[str], server_backend: str, field: str) -> None:
    """vLLM V1's rule for a request that names a structured-output backend: the backend is chosen for the
    engine, so the name must be the engine's (or 'auto'); silently compiling with another would differ."""
    if requested is None or requested == "auto":
        return
    serving = DEFAULT_BACKEND if server_backend == "auto" else server_backend
    if VLLM_BACKEND_NAMES.get(requested) != serving:
        raise InvalidRequestError(f"{field} {requested!r}: request-level backend selection is not supported; this "
                                  f"server compiles constraints with {serving!r} (--grammar-backend): leave {field} "
                                  f"out or name {serving!r}")
