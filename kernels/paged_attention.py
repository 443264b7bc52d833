"""Attention of a flat batch of variable-length query chunks over paged KV.

One entry point serves prefill chunks with a cached prefix, single-token decode and multi-token
verification: request b owns queries [query_start_loc[b], query_start_loc[b+1]) whose absolute
positions are the last q_len positions of its seq_lens[b] tokens; each query attends causally to
keys 0..its own position, read through block_tables[b].
"""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,             # [T, Hq, D]
    k_cache: torch.Tensor,       # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32 (unused entries: any valid block id)
    query_start_loc: torch.Tensor,  # [B + 1] int32
    seq_lens: torch.Tensor,      # [B] int32: context length including this step's queries
    scale: float,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Vectorised torch reference: pads queries to [B, max_query_len] and gathers each request's
    pages into [B, max_seq_len], then masks. Memory is O(B * max_seq_len); fine for the reference."""
    num_tokens, num_q_heads, head_dim = q.shape
    batch = seq_lens.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    device = q.device
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    seq_lens_l = seq_lens.long()

    # Queries -> padded [B, Lq]: token t of request b sits at column t - start[b].
    token_req = torch.repeat_interleave(torch.arange(batch, device=device), q_lens, output_size=num_tokens)
    token_col = torch.arange(num_tokens, device=device) - query_start_loc[:-1].long()[token_req]
    q_pad = q.new_zeros(batch, max_query_len, num_q_heads, head_dim)
    q_pad[token_req, token_col] = q

    # Keys/values gathered through the block table -> [B, Lk, Hkv, D].
    num_blocks_needed = (max_seq_len + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks_needed].long()
    k = k_cache[tables].reshape(batch, num_blocks_needed * block_size, num_kv_heads, head_dim)[:, :max_seq_len]
    v = v_cache[tables].reshape(batch, num_blocks_needed * block_size, num_kv_heads, head_dim)[:, :max_seq_len]

    # Query i of request b is at absolute position seq_len - q_len + i.
    q_pos = (seq_lens_l - q_lens)[:, None] + torch.arange(max_query_len, device=device)[None, :]
    k_pos = torch.arange(max_seq_len, device=device)
    mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens_l[:, None, None])

    group = num_q_heads // num_kv_heads
    qh = q_pad.transpose(1, 2).float()                              # [B, Hq, Lq, D]
    kh = k.transpose(1, 2).float().repeat_interleave(group, dim=1)  # [B, Hq, Lk, D]
    vh = v.transpose(1, 2).float().repeat_interleave(group, dim=1)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # padded query rows have no keys
    out = torch.matmul(probs, vh).transpose(1, 2)          # [B, Lq, Hq, D]
    return out[token_req, token_col].to(q.dtype)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                    max_seq_len: int) -> torch.Tensor:
    return paged_attention_ref(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                               max_query_len, max_seq_len)
