"""What the engine emits: per-request outputs, per-position logprobs and request metrics
(vLLM's names). A bottom-layer module, so that the servers and sessions read outputs without
importing the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection, Optional

from agentserve.errors import FailureKind, InvalidRequestError


@dataclass
class Logprob:
    logprob: float
    rank: int
    decoded_token: Optional[str] = None


# One generated position: token id -> Logprob for the sampled token and the top-n alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float]
    logprobs: Optional[list[PositionLogprobs]]
    finish_reason: Optional[str] = None
    stop_reason: Optional[str | int] = None
    # What is new since the previous RequestOutput of this request (streaming).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        """A method, as vLLM's CompletionOutput.finished() (RequestOutput.finished is an attribute in both)."""
        return self.finish_reason is not None

    def ends_on_stop_token(self, eos_token_ids: Collection[int]) -> bool:
        """Whether the last token is the EOS or stop token id that ended the output: sampled but never
        fed (no KV), and not part of the reply's text. A "stop" with neither a stop string nor a stop
        id whose last token is no EOS ended because its output constraint completed (a regex or choice
        that can take no more tokens): that last token is the reply's own."""
        if self.finish_reason != "stop" or not self.token_ids or isinstance(self.stop_reason, str):
            return False
        return isinstance(self.stop_reason, int) or self.token_ids[-1] in eos_token_ids


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float]
    first_token_time: Optional[float]
    finished_time: Optional[float]
    num_prompt_tokens: int
    num_cached_tokens: int
    num_prefilled_tokens: int


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: Optional[RequestMetrics] = None
    error: Optional[str] = None
    error_kind: FailureKind = FailureKind.INTERNAL  # whose fault `error` is
    # vLLM's prompt_logprobs: one entry per prompt token (None for the first) when the request asked.
    prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = None
    # Sessions: the pages and computed-token count the finished sequence hands back when it was
    # added with retain_blocks (the caller now owns those references).
    retained_block_table: Optional[list[int]] = None
    retained_num_computed_tokens: int = 0
    # ... and how many leading tokens of them hold the draft model's KV too (speculative decoding).
    retained_num_draft_computed_tokens: int = 0

    @property
    def num_cached_tokens(self) -> int:
        return self.metrics.num_cached_tokens if self.metrics else 0

    def failure(self, default: str) -> Exception:
        """The exception for an output that finished with an error: InvalidRequestError where the
        request's own input is at fault, else RuntimeError (INTERNAL)."""
        message = self.error or default
        if self.error_kind is FailureKind.INVALID_REQUEST:
            return InvalidRequestError(message)
        return RuntimeError(message)
