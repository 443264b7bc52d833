"""CUDA graphs for speculative verification steps: every row scores q = 1 + k tokens.

A verification step of a few rows is a small forward (the weights read once for B * q tokens), so
its cost on the host (an eager forward launches hundreds of kernels from Python) would exceed the
device's; replaying a graph removes it. A graph is captured per (padded batch size, q) for
q = 2 .. 1 + num_speculative_tokens and batch sizes up to MAX_VERIFY_BATCH (dynamic speculation
proposes nothing at large batch, so larger graphs would never run).

Rows with fewer than q - 1 drafts are padded at their end: the padding tokens write no KV (slot -1),
sit at positions after the row's real tokens (so causal attention keeps them out of every real
query's context) and their hidden states are never read. Padded batch rows have context length q.
The graphs return hidden states; the caller computes logits for the real scored positions only.
The attention kernels read every length from device tensors, so one graph serves any context: the
graphs are captured with the longest context (`max_model_len`) as the bound that sizes the split-KV
count at small batches (kernels/paged_attention.num_kv_splits); at a short context the splits past
its keys exit at once, as in the decode graphs' largest bucket.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Optional

import torch

from agentserve.model.attention import ForwardMetadata
from agentserve.model.llama import CausalLM
from agentserve.spec.draft_inputs import PaddedInputs
from agentserve.worker.cuda_graph import capture_sizes

if TYPE_CHECKING:
    from agentserve.worker.cuda_graph import GraphPool

logger = logging.getLogger(__name__)

MAX_VERIFY_BATCH = 32


class VerifyGraphs:
    def __init__(self, model: CausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_blocks_per_seq: int, max_query_len: int, max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.max_model_len = max_model_len
        self.kv_layers = kv_layers
        self.sizes = capture_sizes(min(max_num_seqs, MAX_VERIFY_BATCH))
        self.query_lens = list(range(2, max_query_len + 1))
        n = self.sizes[-1]
        tokens = n * max_query_len
        self.input_ids = torch.zeros(tokens, dtype=torch.long, device=device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((tokens,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.seq_lens = torch.full((n,), max_query_len, dtype=torch.int32, device=device)
        self.query_start_loc = {q: torch.arange(n + 1, dtype=torch.int32, device=device) * q for q in self.query_lens}
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}

    def _forward(self, bs: int, q: int) -> torch.Tensor:
        meta = ForwardMetadata(slot_mapping=self.slot_mapping[:bs * q], block_tables=self.block_tables[:bs],
                               query_start_loc=self.query_start_loc[q][:bs + 1], seq_lens=self.seq_lens[:bs],
                               max_query_len=q, max_seq_len=self.max_model_len)
        return self.model(self.input_ids[:bs * q], self.positions[:bs * q], self.kv_layers, meta)

    @torch.inference_mode()
    def capture(self, pool: Optional[GraphPool] = None) -> None:
        """`pool`: the decode graphs' memory pool, shared (only one graph runs at a time)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for q in self.query_lens:  # warm-up: Triton compiles each tile shape outside the capture
                self._forward(self.sizes[-1], q)
                self._forward(1, q)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for q in self.query_lens:
            for bs in reversed(self.sizes):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.hidden[(bs, q)] = self._forward(bs, q)
                if pool is None:
                    pool = graph.pool()
                self.graphs[(bs, q)] = graph
        torch.cuda.synchronize()
        logger.info("captured %d verification CUDA graphs (batch sizes %s, query lengths %s)", len(self.graphs),
                    self.sizes, self.query_lens)

    def padded_size(self, bs: int, q: int) -> int | None:
        if q not in self.query_start_loc:
            return None
        return next((s for s in self.sizes if s >= bs), None)

    def run(self, inputs: PaddedInputs, q: int) -> torch.Tensor:
        """`inputs` laid out q tokens per row (spec/draft_inputs.py); returns hidden [bs * q, H] (a
        view into graph memory, valid until the next replay)."""
        bs = inputs.seq_lens.shape[0]
        size = self.padded_size(bs, q)
        assert size is not None
        n = bs * q
        self.input_ids[:n].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:n].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:n].copy_(inputs.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size * q].fill_(-1)
        self.seq_lens[:bs].copy_(inputs.seq_lens, non_blocking=True)
        self.seq_lens[bs:size].fill_(q)
        width = inputs.block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(inputs.block_tables, non_blocking=True)
        self.graphs[(size, q)].replay()
        return self.hidden[(size, q)][:n]
