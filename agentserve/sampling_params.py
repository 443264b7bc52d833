"""Per-request sampling parameters and output constraints, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

_UNSET_MAX_TOKENS = 16


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    max_tokens: Optional[int] = _UNSET_MAX_TOKENS  # None: up to max_model_len
    min_tokens: int = 0
    stop: Union[None, str, list[str]] = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # top-n logprobs per generated token (0: only the sampled token's)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Output constraints (grammar/): at most one of these.
    json_schema: Union[None, str, dict[str, Any]] = None
    json_object: bool = False
    regex: Optional[str] = None
    choice: Optional[list[str]] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[None, str, dict[str, Any]] = None
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):  # type: ignore[union-attr]
            bad("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        constraints = [self.json_schema is not None, self.json_object, self.regex is not None,
                       self.choice is not None, bool(self.tools) and self.tool_choice != "none"]
        if sum(constraints) > 1:
            bad("at most one of json_schema, json_object, regex, choice and tools may be given")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            bad("choice must be a non-empty list of strings")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            bad("tool_choice needs tools")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_constraint(self) -> bool:
        return (self.json_schema is not None or self.json_object or self.regex is not None
                or self.choice is not None or (bool(self.tools) and self.tool_choice != "none"))

    def clone(self, **changes: Any) -> "SamplingParams":
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)
