"""vLLM request fields agentserve does not implement, refused by name (400 with the field as `param`).

Unknown fields are otherwise ignored (clients send OpenAI fields that do not matter here), but these
are vLLM's own and each changes what the reply is: dropping one would answer 200 with an output the
client did not ask for (sampled text instead of beam search, free text instead of a structural tag's
format). A field at the value vLLM's clients send when the feature is off (false, null, an empty list,
best_of equal to n) is accepted.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from agentserve.adapters.openai.protocol import OpenAIError
from agentserve.engine.validation import check_priority, check_requested_backend
from agentserve.errors import InvalidRequestError

# field -> (is it asking for the feature?, what to say)
_REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "use_beam_search": (bool, "beam search is not supported (sample with n instead)"),
    "guided_whitespace_pattern": (lambda v: v is not None, "a whitespace pattern for JSON is not supported"),
    "logits_processors": (bool, "custom logits processors are not supported (logit_bias, allowed_token_ids and "
                                "bad_words are)"),
    "prompt_embeds": (lambda v: v is not None, "prompt embeddings are not supported (send text or token ids)"),
}
_REFUSED_STRUCTURED_OUTPUTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "whitespace_pattern": (lambda v: v is not None, "a whitespace pattern for JSON is not supported"),
}


def _check(extra: Optional[dict[str, Any]], refused: dict[str, tuple[Callable[[Any], bool], str]],
           prefix: str) -> None:
    for name, value in (extra or {}).items():
        if name in refused and refused[name][0](value):
            param = prefix + name
            raise OpenAIError(400, f"{param}: {refused[name][1]}", param=param)


def check_vllm_unsupported(req: Any, policy: str, grammar_backend: str) -> None:
    """400 for a vLLM field of `req` (a completions or chat request) that asks for what agentserve lacks,
    or for what the server's configuration would ignore (`policy`: its scheduling policy; `grammar_backend`:
    the backend its constraints compile with, which a request may name but not change)."""
    check_priority(req.priority or 0, policy)  # before any other work; the engine checks it again
    extra = req.model_extra
    _check(extra, _REFUSED, "")
    best_of = (extra or {}).get("best_of")  # completions declares best_of and checks it itself
    if best_of is not None and best_of != req.n:
        raise OpenAIError(400, f"best_of: best_of must equal n (got best_of={best_of}, n={req.n}); best_of > n is "
                               "not supported", param="best_of")
    check_structured_outputs_extras(req.structured_outputs, grammar_backend)
    try:
        check_requested_backend((extra or {}).get("guided_decoding_backend"), grammar_backend, "guided_decoding_backend")
    except InvalidRequestError as e:
        raise OpenAIError(400, str(e), param="guided_decoding_backend") from None


def check_structured_outputs_extras(so: Any, grammar_backend: str) -> None:
    """vLLM's `structured_outputs` fields beyond the constraint itself (chat, completions and Responses):
    a whitespace pattern is refused, a backend other than the server's too."""
    if so is None:
        return
    _check(so.model_extra, _REFUSED_STRUCTURED_OUTPUTS, "structured_outputs.")
    try:
        check_requested_backend((so.model_extra or {}).get("backend"), grammar_backend, "structured_outputs.backend")
    except InvalidRequestError as e:
        raise OpenAIError(400, str(e), param="structured_outputs.backend") from None
