"""The usage block of completions and chat completions, and which stream chunks carry it."""

from __future__ import annotations

from typing import Any


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    # prompt_tokens_details always (vLLM puts it behind --enable-prompt-tokens-details): agents read the cache hits.
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def stream_usage(stream_options: Any, force_include_usage: bool) -> tuple[bool, bool]:
    """(a final usage chunk, usage on every chunk) for a stream's stream_options; force_include_usage (vLLM's
    --enable-force-include-usage) gives every stream its final usage chunk."""
    include = force_include_usage or bool(stream_options and stream_options.include_usage)
    return include, include and bool(stream_options and stream_options.continuous_usage_stats)
