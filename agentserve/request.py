"""A request as the engine tracks it (one sequence): its tokens, status, timing and page state.
A bottom-layer module: the scheduler, the KV cache manager and the runner all read it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Protocol

from agentserve.errors import FailureKind
from agentserve.lora.key import LoRAKey
from agentserve.outputs import PositionLogprobs
from agentserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class Detokenizer(Protocol):
    """What the engine's incremental detokenizer (engine/detokenizer.py) offers a request; typed
    here so that this bottom-layer module does not import the engine."""

    output_text: str

    def append(self, token_id: int) -> Optional[str]:
        """Adds a token; returns the stop string it completed, if any."""
        ...

    def take_new_text(self, finished: bool) -> str:
        ...


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    WAITING_FOR_GRAMMAR = 3
    FINISHED_STOPPED = 10
    FINISHED_LENGTH = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> Optional[str]:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass
class RequestTiming:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: Optional[float] = None
    first_token: Optional[float] = None
    last_token: Optional[float] = None
    finished: Optional[float] = None


class Request:
    """One sequence: prompt tokens, generated tokens, and how much of it has KV in pages.

    Invariant (vLLM V1): tokens [0, num_computed_tokens) have their KV written in the pages of
    `block_table`; the scheduler hands out the rest a chunk at a time.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        eos_token_ids: frozenset[int] = frozenset(),
        priority: int = 0,
        cache_salt: Optional[str] = None,
        lora_name: Optional[str] = None,
        lora_key: Optional[LoRAKey] = None,
        index: int = 0,
        parent_id: Optional[str] = None,
    ) -> None:
        self.request_id = request_id
        self.parent_id = parent_id or request_id  # the id the caller knows (differs for n > 1 children)
        self.index = index  # which of the n completions this sequence is
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.sampling_params = sampling_params
        # Penalties count output tokens on the host each step (async scheduling must wait for them).
        self.uses_penalties = (sampling_params.repetition_penalty != 1.0 or sampling_params.presence_penalty != 0.0
                               or sampling_params.frequency_penalty != 0.0)
        self.eos_token_ids = eos_token_ids
        # bad_words as token id sequences (sampling/bad_words.py; set by the engine, which has the tokenizer).
        self.bad_words_token_ids: list[list[int]] = []
        self.priority = priority
        self.cache_salt = cache_salt
        self.lora_name = lora_name
        self.lora_key = lora_key  # what the prefix cache keys the adapter by (id + load generation)
        self.status = RequestStatus.WAITING
        self.stop_reason: Optional[str | int] = None
        self.error: Optional[str] = None
        self.error_kind = FailureKind.INTERNAL  # whose fault `error` is, once it is set

        self.num_computed_tokens = 0
        # Async scheduling: tokens sampled by launched steps but not yet appended on the host. The
        # scheduler counts them as known (their KV is computed by the next step, whose input id is
        # gathered on the device); num_computed_tokens may run up to num_tokens + placeholders.
        self.num_output_placeholders = 0
        # Speculative tokens proposed for the positions after the last known token. The scheduler
        # schedules them with the next decode (1 + len tokens), the runner samples the target at
        # each of them, and update_from_output keeps the accepted prefix (engine/output.py).
        self.spec_token_ids: list[int] = []
        # A draft model's proposal that stays on the device until the verification's result comes
        # back ([k] int64): spec_token_ids then holds DRAFT_ON_DEVICE placeholders of the same count
        # (the host only needs how many; spec/device_drafts.py puts the values in place on the device).
        self.spec_token_ids_device: Optional["torch.Tensor"] = None
        # The draft model's distribution at each proposed token ([k, V] on the device) when the
        # proposal was sampled from it (random sampling); None for point-mass proposals.
        self.spec_draft_probs: Optional["torch.Tensor"] = None
        # Leading positions whose draft-model KV is written (spec/draft.py; <= num_computed_tokens
        # whenever the draft proposes), and the draft's own random stream for a seeded request.
        self.num_draft_computed_tokens = 0
        self.draft_generator: Optional["torch.Generator"] = None
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained SHA-256 digests of the full blocks of all_token_ids
        self.num_registered_blocks = 0  # leading pages of block_table already offered to the prefix cache
        self.num_cached_tokens = -1  # prompt tokens found in the prefix cache at first admission
        self.num_preemptions = 0
        self.num_prefilled_tokens = 0  # tokens actually run through the model (recomputes included)
        # Pages handed in by the caller (a session's or a forked parent's): the request starts with
        # these `num_computed_tokens` already in place instead of asking the prefix cache.
        self.retain_blocks = False  # keep pages at finish for the caller (sessions) instead of freeing
        # Called by the scheduler at admission to hand in the prefix's pages (scheduler.AdmitHook).
        self.admit_hook: Any = None

        self.logprobs: Optional[list[PositionLogprobs]] = [] if sampling_params.logprobs is not None else None
        # Prompt logprobs (worker/prompt_logprobs.py): one entry per prompt token, None for the first
        # (nothing precedes it); the cursor is the next prompt token a launched step will score. Only
        # the first of n > 1 sequences scores: the others fork its prompt's pages, and share the scores.
        self.prompt_logprobs: Optional[list[Optional[PositionLogprobs]]] = (
            [None] if sampling_params.prompt_logprobs is not None and index == 0 else None)
        self.num_prompt_logprobs_planned = 1
        self.cumulative_logprob = 0.0
        self.generator: Optional["torch.Generator"] = None
        self.detokenizer: Optional[Detokenizer] = None
        self.grammar: Any = None  # grammar matcher state (grammar/state.py) when constrained
        self.timing = RequestTiming()
        # Token ids emitted since the last RequestOutput (for streaming deltas).
        self.pending_token_ids: list[int] = []

    # --- speculation -----------------------------------------------------------------------------
    def clear_proposal(self) -> None:
        """Drops the speculative proposal (its tokens, the draft's q, the drafts left on the device):
        a proposal is for one step, and a dropped one is never verified."""
        self.spec_token_ids = []
        self.spec_draft_probs = None
        self.spec_token_ids_device = None

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens or 0

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
