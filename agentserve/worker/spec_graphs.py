"""The CUDA graphs speculation adds beside the decode graphs: the target's verification graphs (q = 1 + k
tokens per row), and for a draft model its decode graphs, its catch-up graphs (the 2..4 tokens it has
not seen yet after a verification step: the bonus token, the last accepted draft) and its continuation
graphs (a whole greedy proposal queued behind a verification: worker/continuation_graphs.py;
AGENTSERVE_CONTINUATION_GRAPHS=0 leaves them out, for A/B runs)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

import torch

from agentserve.config import EngineConfig
from agentserve.model.llama import CausalLM
from agentserve.spec.draft import MAX_DECODE_CATCH_UP, DraftModel
from agentserve.worker.continuation_graphs import ContinuationGraphs
from agentserve.worker.cuda_graph import DecodeGraphs
from agentserve.worker.verify_graphs import VerifyGraphs

if TYPE_CHECKING:
    from agentserve.worker.cuda_graph import GraphPool


def capture_spec_graphs(config: EngineConfig, model: CausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]],
                        draft: Optional[DraftModel], max_blocks_per_seq: int, max_model_len: int,
                        device: torch.device, pool: Optional[GraphPool]) -> Optional[VerifyGraphs]:
    """Captures them (sharing `pool`, the decode graphs' memory pool, for the target's) and hands the
    draft its own; returns the target's verification graphs (None when speculation is off)."""
    if config.spec.method is None:
        return None
    max_num_seqs = config.scheduler.max_num_seqs
    verify = VerifyGraphs(model, kv_layers, max_num_seqs, max_blocks_per_seq, 1 + config.spec.num_speculative_tokens,
                          max_model_len, device)
    verify.capture(pool)
    if draft is not None and draft.cache is not None:
        decode = DecodeGraphs(draft.model, draft.cache.layers, max_num_seqs, max_blocks_per_seq, max_model_len, device)
        decode.capture()
        draft.graphs = decode
        catch_up = VerifyGraphs(draft.model, draft.cache.layers, max_num_seqs, max_blocks_per_seq, MAX_DECODE_CATCH_UP,
                                max_model_len, device)
        catch_up.capture(decode.pool)
        draft.catch_up_graphs = catch_up
        if config.spec.spec_device_continuation and os.environ.get("AGENTSERVE_CONTINUATION_GRAPHS", "1") != "0":
            continuation = ContinuationGraphs(draft.model, draft.cache.layers, max_num_seqs, max_blocks_per_seq,
                                              config.spec.num_speculative_tokens, draft.block_size, max_model_len,
                                              device)
            continuation.capture(decode.pool)
            draft.continuation_graphs = continuation
    return verify
