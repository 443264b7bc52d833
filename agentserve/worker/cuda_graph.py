"""CUDA graphs for decode-only steps (every scheduled request computes exactly one token).

Graphs are captured at padded batch sizes (1, 2, 4, 8, then steps of 8 up to max_num_seqs, at most
MAX_CAPTURE_SIZE: larger steps run eagerly) over persistent input buffers; a step copies its inputs
into the first rows, pads the rest (slot -1: no KV write; context length 1: a harmless read),
replays the graph for the next captured size and reads the logits of its rows. The attention kernels take every length from device tensors, so a
graph serves any context up to the max_seq_len it was captured with; that bound only sets the
split-KV partition count. Short contexts must not pay for a split count chosen for max_model_len
(empty partitions plus a reduce kernel per layer), so each batch size is captured once per
distinct split count over context buckets, and a step replays the graph of its bucket.

With LoRA (`lora=True`), every graph is captured twice: once as the base model (no LoRA kernels,
so base-only decode steps pay nothing) and once reading a persistent per-token slot-index buffer
(`lora_slots`), into which a step with adapters copies its rows' slots (-1 for base rows and
padding); the LoRA layers derive their tile map from it inside the graph (lora/layers.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Optional

import torch

from agentserve.kernels._triton_utils import num_sms
from agentserve.kernels.paged_attention import num_kv_splits
from agentserve.model.attention import ForwardMetadata
from agentserve.model.llama import CausalLM

if TYPE_CHECKING:
    # torch's type of a graph memory pool (what CUDAGraph.pool() returns), private in torch: named once here.
    from torch.cuda import _POOL_HANDLE as GraphPool

logger = logging.getLogger(__name__)


def context_buckets(max_model_len: int) -> list[int]:
    buckets = [b for b in (512, 2048, 8192, 32768) if b < max_model_len]
    return buckets + [max_model_len]


# The largest decode batch captured (vLLM's max_cudagraph_capture_size default): larger decode steps
# run eagerly. At > 512 rows a step's device time (~17 ms for an 8B at 512) dwarfs its launch cost,
# which async scheduling hides anyway, while every captured size costs capture time and graph memory
# once per context bucket (and twice with LoRA).
MAX_CAPTURE_SIZE = 512


def capture_sizes(max_num_seqs: int) -> list[int]:
    cap = min(max_num_seqs, MAX_CAPTURE_SIZE)
    sizes = [s for s in (1, 2, 4) if s < cap] + list(range(8, cap + 1, 8))
    if not sizes or sizes[-1] < cap:
        sizes.append(cap)
    return sizes


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_layers: list[tuple[torch.Tensor, torch.Tensor]], max_num_seqs: int,
                 max_blocks_per_seq: int, max_model_len: int, device: torch.device, lora: bool = False) -> None:
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
        self.lora_slots: Optional[torch.Tensor] = torch.full((n,), -1, dtype=torch.int32, device=device) if lora else None
        self.lora_modes = (False, True) if lora else (False,)
        self.buckets = context_buckets(max_model_len)
        # This rank's KV heads (all of them at tensor-parallel size 1): the attention kernels pick their
        # split count from the cache's heads, and a graph's key must be the split count it runs.
        self.num_kv_heads = model.decoder_layer(0).self_attn.num_kv_heads
        self.num_sms = num_sms(device)
        # (batch size, split count, with LoRA) -> graph and its output.
        self.graphs: dict[tuple[int, int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, int, bool], torch.Tensor] = {}
        self.pool: Optional[GraphPool] = None

    def _splits(self, bs: int, max_seq_len: int) -> int:
        return num_kv_splits(bs, max_seq_len, self.num_kv_heads, self.num_sms)

    def _meta(self, bs: int, max_seq_len: int, with_lora: bool = False) -> ForwardMetadata:
        lora_slots = self.lora_slots[:bs] if with_lora and self.lora_slots is not None else None
        return ForwardMetadata(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                               query_start_loc=self.query_start_loc[:bs + 1], seq_lens=self.seq_lens[:bs],
                               max_query_len=1, max_seq_len=max_seq_len, lora_slot_indices=lora_slots)

    def _forward(self, bs: int, max_seq_len: int, with_lora: bool = False) -> torch.Tensor:
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_layers,
                            self._meta(bs, max_seq_len, with_lora))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                for bucket in self.buckets:
                    for with_lora in self.lora_modes:
                        self._forward(self.sizes[-1], bucket, with_lora)
                        self._forward(1, bucket, with_lora)
                if self.lora_slots is not None:
                    # The LoRA kernels' split-K (a constexpr) follows the batch size: compile every
                    # size's variant here, not inside a capture.
                    for bs in self.sizes:
                        self._forward(bs, self.buckets[0], True)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        # Largest first, so the smaller graphs reuse its memory pool.
        for bs in reversed(self.sizes):
            for bucket, with_lora in itertools.product(self.buckets, self.lora_modes):
                key = (bs, self._splits(bs, bucket), with_lora)
                if key in self.graphs:
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[key] = self._forward(bs, bucket, with_lora)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[key] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs for batch sizes %s in %.1f s", len(self.graphs), self.sizes,
                    time.perf_counter() - start)

    def padded_size(self, bs: int) -> Optional[int]:
        for size in self.sizes:
            if size >= bs:
                return size
        return None

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
            block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
            lora_slot_indices: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inputs already on the device; returns logits [bs, vocab] (a view into graph memory).
        `lora_slot_indices` ([bs] int32, or None for a base-only step) picks the LoRA graph."""
        bs = input_ids.shape[0]
        size = self.padded_size(bs)
        assert size is not None
        bucket = next(b for b in self.buckets if b >= max_seq_len)
        with_lora = lora_slot_indices is not None
        key = (size, self._splits(size, bucket), with_lora)
        if lora_slot_indices is not None:
            assert self.lora_slots is not None, "graphs captured without LoRA"
            self.lora_slots[:bs].copy_(lora_slot_indices, non_blocking=True)
            self.lora_slots[bs:size].fill_(-1)
        self.input_ids[:bs].copy_(input_ids, non_blocking=True)
        self.positions[:bs].copy_(positions, non_blocking=True)
        self.slot_mapping[:bs].copy_(slot_mapping, non_blocking=True)
        self.slot_mapping[bs:size].fill_(-1)
        self.seq_lens[:bs].copy_(seq_lens, non_blocking=True)
        self.seq_lens[bs:size].fill_(1)
        width = block_tables.shape[1]
        self.block_tables[:bs, :width].copy_(block_tables, non_blocking=True)
        self.graphs[key].replay()
        return self.logits[key][:bs]
