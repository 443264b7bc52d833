"""Turns a scheduled step into flat tensors, runs the model, samples on the device.

One host sync per step: the sampled ids (and logprobs, when asked) come back together.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from agentserve.cache.kv_cache import KVCache, bytes_per_block
from agentserve.config import EngineConfig
from agentserve.engine.request import Request
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.model.attention import AttentionMetadata
from agentserve.model.layers import rope_cos_sin_cache
from agentserve.model.loader import build_model
from agentserve.sampling.sampler import Sampler
from agentserve.worker.input_batch import build_sampling_metadata

logger = logging.getLogger(__name__)


@dataclass
class ScheduledChunk:
    request: Request
    num_tokens: int   # new tokens computed this step
    sample: bool      # the chunk reaches the end of the sequence: sample the next token


@dataclass
class StepResult:
    sampled: list[int]                              # one per sampling chunk, in order
    logprob_ids: Optional[list[list[int]]] = None   # per sampling chunk: sampled token then top-n
    logprobs: Optional[list[list[float]]] = None
    ranks: Optional[list[int]] = None


class ModelRunner:
    def __init__(self, config: EngineConfig, arch: ArchConfig, device: torch.device, dtype: torch.dtype,
                 model_path: Optional[Path], max_model_len: int) -> None:
        self.config = config
        self.arch = arch
        self.device = device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.max_model_len = max_model_len
        self.model = build_model(arch, dtype, device, model_path, config.model.load_format, config.model.seed)
        self.model.set_rope_cache(rope_cos_sin_cache(arch.head_dim, arch.rope_theta, arch.rope_scaling,
                                                     max_model_len, device))
        self.sampler = Sampler()
        self.num_blocks = self._decide_num_blocks()
        swap_blocks = int(config.cache.swap_space_gb * 2**30 // self._block_bytes())
        self.kv_cache = KVCache(arch.num_layers, self.num_blocks, self.block_size, arch.num_kv_heads,
                                arch.head_dim, dtype, device, num_swap_blocks=swap_blocks)
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)

    # --- sizing -------------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        a = self.arch
        return bytes_per_block(a.num_layers, self.block_size, a.num_kv_heads, a.head_dim, self.dtype)

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gb * 2**30 // self._block_bytes()))
        return self._profile_num_blocks()

    def _profile_num_blocks(self) -> int:
        """Runs one forward at the largest batch, then gives the KV cache what is left of
        gpu_memory_utilization of the device memory."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        dummy_cache = KVCache(self.arch.num_layers, 1, self.block_size, self.arch.num_kv_heads,
                              self.arch.head_dim, self.dtype, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=self.device),
            block_tables=torch.zeros((1, 1), dtype=torch.int32, device=self.device),
            query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([1], dtype=torch.int32, device=self.device), max_query_len=num_tokens,
            max_seq_len=1)
        # A single-request prefill with a 1-token context exercises the activations, not attention.
        meta.seq_lens.fill_(num_tokens)
        meta.max_seq_len = num_tokens
        meta.block_tables = torch.zeros((1, -(-num_tokens // self.block_size)), dtype=torch.int32,
                                        device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, positions, dummy_cache.layers, meta)
            logits = self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs:])
            del hidden, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        used_by_others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * self.config.cache.gpu_memory_utilization - used_by_others - peak
        num_blocks = int(budget // self._block_bytes())
        if num_blocks < 1 or num_blocks * self.block_size < self.max_model_len:
            raise ModelLoadError(
                f"the model does not fit: after weights and activations ({peak / 2**30:.1f} GiB) only "
                f"{max(budget, 0) / 2**30:.2f} GiB remain for the KV cache, fewer than max_model_len="
                f"{self.max_model_len} tokens; raise gpu_memory_utilization or lower max_model_len")
        logger.info("KV cache: %d pages of %d tokens (%.1f GiB)", num_blocks, self.block_size,
                    num_blocks * self._block_bytes() / 2**30)
        return num_blocks

    # --- one step ---------------------------------------------------------------------------------
    def prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        max_blocks = 1
        bs = self.block_size
        for chunk in chunks:
            req = chunk.request
            start, end = req.num_computed_tokens, req.num_computed_tokens + chunk.num_tokens
            input_ids.extend(req.all_token_ids[start:end])
            positions.extend(range(start, end))
            table = req.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + chunk.num_tokens)
            seq_lens.append(end)
            max_blocks = max(max_blocks, len(table))
            if chunk.sample:
                logits_indices.append(query_start[-1] - 1)
        tables = torch.zeros((len(chunks), max_blocks), dtype=torch.int32)
        for i, chunk in enumerate(chunks):
            table = chunk.request.block_table
            tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(dev, non_blocking=True),
            block_tables=tables.to(dev, non_blocking=True),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32).to(dev, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev, non_blocking=True),
            max_query_len=max(c.num_tokens for c in chunks), max_seq_len=max(seq_lens))
        return (torch.tensor(input_ids, dtype=torch.long).to(dev, non_blocking=True),
                torch.tensor(positions, dtype=torch.long).to(dev, non_blocking=True), meta,
                torch.tensor(logits_indices, dtype=torch.long).to(dev, non_blocking=True))

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk], block_copies: list[tuple[int, int]],
                token_bitmask: Optional[torch.Tensor] = None) -> StepResult:
        self.kv_cache.copy_blocks(block_copies)
        input_ids, positions, meta, logits_indices = self.prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache.layers, meta)
        sampling = [c.request for c in chunks if c.sample]
        if not sampling:
            return StepResult(sampled=[])
        logits = self.model.compute_logits(hidden[logits_indices])
        meta_s = build_sampling_metadata(sampling, logits.shape[-1], self.device, token_bitmask)
        out = self.sampler(logits, meta_s)
        if out.logprobs is None:
            return StepResult(sampled=out.sampled_token_ids.tolist())
        assert out.logprob_token_ids is not None and out.sampled_ranks is not None
        packed = torch.cat([out.sampled_token_ids[:, None].float(), out.sampled_ranks[:, None].float(),
                            out.logprob_token_ids.float(), out.logprobs], dim=1).cpu()
        width = out.logprobs.shape[1]
        return StepResult(
            sampled=packed[:, 0].long().tolist(), ranks=packed[:, 1].long().tolist(),
            logprob_ids=packed[:, 2:2 + width].long().tolist(), logprobs=packed[:, 2 + width:].tolist())
