"""The fast-path limits: the least time the model's work can take at the machine's ceilings
(benchmarks/ceilings.py), counted from the model's shape.

  one stream   each decode step reads every weight once (the lm_head in full; of the embedding table
               only the token's row, unless it is tied to the lm_head) plus the KV of its context:
               bytes / copy rate per token
  TTFT         a T-token prefill: every token through the layers' matmuls, causal attention over
               T (T + 1) / 2 (query, key) pairs, the lm_head for the one sampled position: FLOPs /
               matmul rate
  throughput   every request's prompt and generated tokens (but the last) through the layers, the
               lm_head for each sampled token, causal attention over each token's context: FLOPs /
               matmul rate (the workload is compute bound at the batch sizes it runs at)
  throughput, with the decode KV reads
               the same FLOPs, plus the time each decode token's attention takes to read the K and V of
               its whole context (one query per sequence per step: nothing reuses those bytes, so they
               are memory bound at any batch size, and they run in kernels of their own, after the
               projections that make their queries): FLOPs / matmul rate + KV bytes / copy rate

Counts are the least work, not what a kernel happens to do (the engine itself runs the lm_head only on
sampled positions, as counted here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch

from agentserve.model.arch_config import ArchConfig


@dataclass(frozen=True)
class ModelWork:
    layer_matmul_params: int  # weights of the layers' projections (2-D weights outside embedding/lm_head)
    lm_head_params: int       # vocab x hidden
    weight_bytes: int         # all parameters, in bytes
    embed_bytes: int          # the input embedding table, in bytes
    embed_row_bytes: int      # one row of it
    tied_embeddings: bool     # the lm_head is the embedding table (read in full every step)
    kv_bytes_per_token: int   # K and V of one token, all layers
    attn_flop_per_pair: int   # scores and weighted values, all layers and heads, per (query, key) pair

    @classmethod
    def from_model(cls, model: torch.nn.Module, arch: ArchConfig, dtype: torch.dtype) -> "ModelWork":
        itemsize = torch.finfo(dtype).bits // 8
        embed = model.get_submodule("embed_tokens").weight
        lm_head = model.get_submodule("lm_head").weight
        tied = lm_head is embed  # the same Parameter (CausalLM ties by assignment)
        params = {id(p): p for p in model.parameters()}  # a tied table is one parameter
        matrices = sum(p.numel() for p in params.values() if p.dim() == 2)
        layer_matmul = matrices - embed.numel() - (0 if tied else lm_head.numel())
        return cls(layer_matmul_params=layer_matmul, lm_head_params=lm_head.numel(),
                   weight_bytes=sum(p.numel() for p in params.values()) * itemsize,
                   embed_bytes=embed.numel() * itemsize, embed_row_bytes=embed.shape[1] * itemsize,
                   tied_embeddings=tied,
                   kv_bytes_per_token=2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * itemsize,
                   attn_flop_per_pair=4 * arch.num_layers * arch.num_heads * arch.head_dim)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def decode_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: all but the embedding table, of which one row."""
        if self.tied_embeddings:
            return self.weight_bytes  # the table is the lm_head: read in full
        return self.weight_bytes - self.embed_bytes + self.embed_row_bytes

    def single_stream_tok_s(self, copy_bytes_s: float, prompt_len: int, new_tokens: int) -> float:
        """Decode rate after the first token: steps 1..new_tokens-1 attend over prompt_len + k tokens."""
        steps = new_tokens - 1
        context = sum(prompt_len + k for k in range(1, steps + 1))
        seconds = (steps * self.decode_weight_bytes + context * self.kv_bytes_per_token) / copy_bytes_s
        return steps / seconds

    def prefill_flop(self, prompt_len: int) -> float:
        """FLOPs of one prompt's prefill up to its first sampled token."""
        return (2.0 * self.layer_matmul_params * prompt_len + 2.0 * self.lm_head_params
                + self.attn_flop_per_pair * prompt_len * (prompt_len + 1) / 2)

    def ttft_ms(self, matmul_flop_s: float, prompt_len: int) -> float:
        return self.prefill_flop(prompt_len) / matmul_flop_s * 1e3

    def request_flop(self, prompt_len: int, output_len: int) -> float:
        """FLOPs of one request: its prefill, then output_len - 1 decode tokens (the last sampled
        token is never run through the model), each sampling once and attending over its context."""
        decode = output_len - 1
        # The decode token at position p + j (j = 0..decode-1) attends over p + j + 1 keys.
        decode_pairs = decode * (prompt_len + 1) + decode * (decode - 1) / 2
        return (self.prefill_flop(prompt_len) + 2.0 * (self.layer_matmul_params + self.lm_head_params) * decode
                + self.attn_flop_per_pair * decode_pairs)

    def throughput_tok_s(self, matmul_flop_s: float, prompt_lens: Sequence[int], output_len: int) -> float:
        flop = sum(self.request_flop(p, output_len) for p in prompt_lens)
        return len(prompt_lens) * output_len / (flop / matmul_flop_s)

    def decode_kv_bytes(self, prompt_len: int, output_len: int) -> float:
        """K and V bytes the decode steps of one request read: token j (j = 0..output_len-2) attends
        over prompt_len + j + 1 keys."""
        decode = output_len - 1
        return self.kv_bytes_per_token * (decode * (prompt_len + 1) + decode * (decode - 1) / 2)

    def throughput_kv_tok_s(self, matmul_flop_s: float, copy_bytes_s: float, prompt_lens: Sequence[int],
                            output_len: int) -> float:
        """throughput_tok_s with the decode attention's KV reads added as memory time."""
        flop = sum(self.request_flop(p, output_len) for p in prompt_lens)
        kv = sum(self.decode_kv_bytes(p, output_len) for p in prompt_lens)
        return len(prompt_lens) * output_len / (flop / matmul_flop_s + kv / copy_bytes_s)
