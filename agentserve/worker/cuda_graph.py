"""CUDA graphs for decode-only steps (every scheduled request computes exactly one token).

Graphs are captured at padded batch sizes (1, 2, 4, 8, then steps of 8 up to the cap) over
persistent input buffers; a step copies its inputs into the first rows, pads the rest (slot -1:
no KV write; context length 1: a harmless read), replays the graph for the next captured size and
reads the logits of its rows. The attention kernels take every length from device tensors, and
max_seq_len is fixed at max_model_len when capturing, so one graph serves any context length.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from agentserve.model.attention import AttentionMetadata
from agentserve.model.llama import CausalLM

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs] + list(range(8, max_num_seqs + 1, 8))
    if not sizes or sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, device: torch.device) -> None:
        self.model = model
        self.kv_layers = kv_layers
        self.max_model_len = max_model_len
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Optional[tuple] = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                                 query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
                                 max_query_len=1, max_seq_len=self.max_model_len)

    def _forward(self, bs: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_layers, self._meta(bs))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self._forward(self.sizes[-1])
                self._forward(1)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # Largest first, so the smaller graphs reuse its memory pool.
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def padded_size(self, bs: int) -> Optional[int]:
        for size in self.sizes:
            if size >= bs:
                return size
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
        """Inputs already on the device; returns logits [bs, vocab] (a view into graph memory)."""
        bs = input_ids.shape[0]
        size = self.padded_size(bs)
        assert size is not None
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.slot_mapping[:bs].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[bs:size].fill_(-1)
        self.seq_lens[:bs].copy_(seq_lens, non_blocking=True)
        self.seq_lens[bs:size].fill_(1)
        width = block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:bs]
