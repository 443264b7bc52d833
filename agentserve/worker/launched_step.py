"""A step whose forward and sampling have been launched on the device but whose sampled ids may not
be on the host yet. With async scheduling the engine launches step N+1 before it reads step N's
results: step N+1 gathers its decode input ids from `sampled` on the device, and the host copy of
the ids comes back through a pinned buffer and an event, without a device-wide sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from agentserve.worker.prompt_logprobs import PromptScores


@dataclass
class StepResult:
    """Per sampling row (chunks with num_sampled > 0, in order): a list with one entry per sampled
    position of the row."""
    sampled: list[list[int]]
    logprob_ids: Optional[list[list[list[int]]]] = None  # per position: the sampled token then top-n
    logprobs: Optional[list[list[list[float]]]] = None
    ranks: Optional[list[list[int]]] = None


def _split(flat: list, counts: list[int]) -> list[list]:
    if len(flat) == len(counts):  # every row sampled one position (counts are >= 1): no slicing
        return [[x] for x in flat]
    out, lo = [], 0
    for n in counts:
        out.append(flat[lo:lo + n])
        lo += n
    return out


def _truncate_padded(result: StepResult) -> StepResult:
    """A verification step's rows are padded to the widest row with -1 (rejection.py's layout): each
    row keeps its emitted tokens only (accepted drafts, then the recovered or bonus token)."""
    lengths = [row.index(-1) if -1 in row else len(row) for row in result.sampled]

    def cut(rows: Optional[list]) -> Optional[list]:
        return None if rows is None else [r[:n] for r, n in zip(rows, lengths)]

    return StepResult(sampled=[r[:n] for r, n in zip(result.sampled, lengths)], logprob_ids=cut(result.logprob_ids),
                      logprobs=cut(result.logprobs), ranks=cut(result.ranks))


def copy_to_host(src: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
    """A device tensor's copy into pinned host memory, queued on the current stream, and the event that
    marks it done (None for a tensor already on the host, returned as it is)."""
    if src.device.type != "cuda":
        return src, None
    host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
    host.copy_(src, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class LaunchedStep:
    def __init__(self, sampled: Optional[torch.Tensor], rows: dict[str, int], row_counts: list[int],
                 packed_logprobs: Optional[torch.Tensor] = None, logprob_width: int = 0,
                 padded: bool = False, prompt_scores: Optional["PromptScores"] = None) -> None:
        """`padded`: a speculative verification step, whose rows all have row_counts' width and end
        in -1 padding after their emitted tokens. `prompt_scores`: the prompt logprobs its prefill
        rows scored (worker/prompt_logprobs.py)."""
        self.padded = padded
        self.prompt_scores = prompt_scores
        self.sampled = sampled  # [num sampling rows] int64 on the device; stays there for the next step
        self.rows = rows        # request id -> its last row in `sampled`
        self.row_counts = row_counts  # sampled positions of each sampling chunk, in order
        self._width = logprob_width
        self._result: Optional[StepResult] = None
        self._event: Optional[torch.cuda.Event] = None
        # The device-to-host copies are queued right behind sampling; result() only waits for them.
        src = packed_logprobs if packed_logprobs is not None else sampled
        self._host: Optional[torch.Tensor] = None
        if src is not None:
            self._host, self._event = copy_to_host(src)
        self._has_logprobs = packed_logprobs is not None
        # A verification step's emitted tokens [N, w] and accepted-draft counts [N] on the device, for
        # a draft proposal queued behind it (spec/continuation.py); None for other steps.
        self.verified: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def result(self) -> StepResult:
        """Waits for this step's sampled ids (and logprobs); the one host sync of a step."""
        if self._result is not None:
            return self._result
        if self._event is not None:
            self._event.synchronize()
        host = self._host
        if host is None:
            self._result = StepResult(sampled=[])
        elif not self._has_logprobs:
            self._result = StepResult(sampled=_split(host.tolist(), self.row_counts))
        else:
            w, counts = self._width, self.row_counts
            self._result = StepResult(
                sampled=_split(host[:, 0].long().tolist(), counts), ranks=_split(host[:, 1].long().tolist(), counts),
                logprob_ids=_split(host[:, 2:2 + w].long().tolist(), counts),
                logprobs=_split(host[:, 2 + w:].tolist(), counts))
        if self.padded:
            self._result = _truncate_padded(self._result)
        self._host = None
        return self._result
