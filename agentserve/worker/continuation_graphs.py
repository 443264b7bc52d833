"""CUDA graphs for the draft's continuation (spec/continuation.py): a whole proposal queued behind a
verification, as one replay, for greedy rows at small batch sizes.

Eagerly, a continuation is four graph replays (the catch-up and k - 1 decode steps) among ~80 small
kernels: the positions, slots and context lengths derived from the verification's output, each graph's
input copies, the catch-up's logits, the logits' casts and the argmaxes between the steps. On the H200 at
batch 1 (FP8 1B draft, k = 4) that measured 3.06 ms of device time against 4 x 0.69 ms for the draft's
forwards, and ~1.4-2 ms of host launches (benchmarks/NOTES.md, fifteenth session). Here the same work is
captured once per (padded batch size, context bucket, k <= num_speculative_tokens: dynamic speculation and
benchmarks change k from step to step): a continuation is then one packed host-to-device copy, two index
selects of the verification's output (and a copy into the static buffer's first columns), one replay and
one clone.

Inside the graph everything continue_proposal computes eagerly is recomputed from static buffers: per row
its verification row, P (the position the verification started from), the token before it, its page
count and block table (one int64 row each, copied in), and the verification's emitted tokens and accepted
counts (index-selected in). Padded rows get no pages, so they write no KV (slot -1) and read one key.
Greedy drafts only (the argmax of the draft's logits, as DraftModel.sample gives them); random rows or a
batch above MAX_BATCH keep the eager continuation.
"""

from __future__ import annotations

import itertools
import logging
from typing import TYPE_CHECKING, Optional

import torch

from agentserve.kernels.argmax import argmax_rows
from agentserve.model.attention import ForwardMetadata
from agentserve.model.llama import CausalLM
from agentserve.spec.continuation import CATCH_UP_TOKENS, continuation_inputs
from agentserve.worker.cuda_graph import capture_sizes, context_buckets

if TYPE_CHECKING:
    from agentserve.worker.cuda_graph import GraphPool

logger = logging.getLogger(__name__)

MAX_BATCH = 8  # dynamic speculation keeps k > 0 at small batches; larger ones continue eagerly
_META = 4      # columns before the block table in the static input rows: row, P, last token, pages


class ContinuationGraphs:
    def __init__(self, model: CausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_blocks_per_seq: int, max_num_tokens: int, block_size: int, max_model_len: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.max_num_tokens = max_num_tokens
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self.sizes = capture_sizes(min(max_num_seqs, MAX_BATCH))
        self.buckets = context_buckets(max_model_len)
        n = self.sizes[-1]
        self.inputs = torch.zeros((n, _META + max_blocks_per_seq), dtype=torch.int64, device=device)
        self.emitted = torch.zeros((n, max_num_tokens + 1), dtype=torch.int64, device=device)
        self.accepted = torch.zeros(n, dtype=torch.int64, device=device)
        self.steps = torch.arange(max_num_tokens + 1, dtype=torch.int64, device=device)
        self.query_start_loc = {q: torch.arange(n + 1, dtype=torch.int32, device=device) * q
                                for q in (1, CATCH_UP_TOKENS)}
        self.last_index = torch.arange(n, dtype=torch.int64, device=device) * CATCH_UP_TOKENS + CATCH_UP_TOKENS - 1
        # (padded batch size, context bucket, k) -> graph and its drafts [bs, k]
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.drafts: dict[tuple[int, int, int], torch.Tensor] = {}

    def _propose(self, bs: int, bound: int, k: int) -> torch.Tensor:
        """The drafts [bs, k] of continue_proposal's greedy path, from the static buffers."""
        rows = self.inputs[:bs]
        tables = rows[:, _META:]
        # A padded row has no pages: no writes, one key read.
        ids, positions, slots, seq_lens = continuation_inputs(
            self.accepted[:bs], self.emitted[:bs], rows[:, 2], rows[:, 1], rows[:, 3], tables, self.steps[:k + 1],
            self.block_size, self.max_model_len)
        tables_i32 = tables.to(torch.int32)
        meta = ForwardMetadata(slot_mapping=slots[:CATCH_UP_TOKENS].t().reshape(-1), block_tables=tables_i32,
                               query_start_loc=self.query_start_loc[CATCH_UP_TOKENS][:bs + 1],
                               seq_lens=seq_lens[CATCH_UP_TOKENS - 1], max_query_len=CATCH_UP_TOKENS,
                               max_seq_len=bound)
        hidden = self.model(ids.reshape(-1), positions[:CATCH_UP_TOKENS].t().reshape(-1), self.kv_layers, meta)
        tokens = argmax_rows(self.model.compute_logits(hidden.index_select(0, self.last_index[:bs])))
        steps = [tokens]
        for step in range(1, k):
            at = CATCH_UP_TOKENS - 1 + step  # d_step at P + a + 1 + step
            meta = ForwardMetadata(slot_mapping=slots[at], block_tables=tables_i32,
                                   query_start_loc=self.query_start_loc[1][:bs + 1], seq_lens=seq_lens[at],
                                   max_query_len=1, max_seq_len=bound)
            hidden = self.model(tokens, positions[at], self.kv_layers, meta)
            tokens = argmax_rows(self.model.compute_logits(hidden))
            steps.append(tokens)
        return torch.stack(steps, dim=1)

    @torch.inference_mode()
    def capture(self, pool: Optional[GraphPool]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles outside the capture (no pages: nothing written)
                for bs, bucket in itertools.product(self.sizes, self.buckets):
                    self._propose(bs, bucket, self.max_num_tokens)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for bs in reversed(self.sizes):
            for bucket, k in itertools.product(self.buckets, range(1, self.max_num_tokens + 1)):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.drafts[(bs, bucket, k)] = self._propose(bs, bucket, k)
                if pool is None:
                    pool = graph.pool()
                self.graphs[(bs, bucket, k)] = graph
        torch.cuda.synchronize()
        logger.info("captured %d draft continuation CUDA graphs (k <= %d) for batch sizes %s", len(self.graphs),
                    self.max_num_tokens, self.sizes)

    def run(self, rows: list[int], bases: list[int], last_tokens: list[int], block_tables: list[list[int]],
            num_tokens: int, emitted: torch.Tensor, num_accepted: torch.Tensor, bound: int) -> Optional[torch.Tensor]:
        """The drafts [R, k] for the R rows (a fresh tensor, not graph memory), or None where no graph
        fits (too many rows, k above the captured ones). `emitted` [N, w <= k + 1] / `num_accepted` [N]:
        the verification's output. `bound`: the furthest position + 1 any row reaches (picks the bucket)."""
        count = len(rows)
        size = next((s for s in self.sizes if s >= count), None)
        bucket = next((b for b in self.buckets if b >= bound), None)
        width = max(1, max(len(t) for t in block_tables))
        if (size is None or bucket is None or not 1 <= num_tokens <= self.max_num_tokens
                or emitted.shape[1] > num_tokens + 1 or _META + width > self.inputs.shape[1]):
            return None
        # Padded rows stay zero: row 0 of the verification, no pages.
        host = torch.zeros((size, _META + width), dtype=torch.int64, pin_memory=self.device.type == "cuda")
        values = host.numpy()
        values[:count, 0] = rows
        values[:count, 1] = bases
        values[:count, 2] = last_tokens
        for i, table in enumerate(block_tables):
            values[i, 3] = len(table)
            values[i, _META:_META + len(table)] = table
        self.inputs[:size, :_META + width].copy_(host, non_blocking=True)
        index = self.inputs[:size, 0]
        # A row accepts at most the drafts it verified: the graph reads columns < w only.
        self.emitted[:size, :emitted.shape[1]].copy_(emitted.index_select(0, index))
        torch.index_select(num_accepted, 0, index, out=self.accepted[:size])
        return self._replay(size, bucket, num_tokens)[:count].clone()

    def _replay(self, size: int, bucket: int, k: int) -> torch.Tensor:
        self.graphs[(size, bucket, k)].replay()
        return self.drafts[(size, bucket, k)]
