"""Random ragged paged-attention batches for the kernel tests and benchmarks/kernel_suite.py: scattered
pages, NaN poison wherever a kernel must not read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class PagedBatch:
    """Inputs of one paged_attention call. `k_cache`/`v_cache` may hold NaN "poison" in memory the
    kernels must never read (see random_paged_batch); `clean_caches()` gives the reference a
    NaN-free copy (the vectorised reference multiplies masked slots by 0, and 0 * NaN = NaN)."""
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    max_query_len: int
    max_seq_len: int

    def args(self, k_cache: Optional[torch.Tensor] = None, v_cache: Optional[torch.Tensor] = None) -> tuple:
        return (self.q, self.k_cache if k_cache is None else k_cache, self.v_cache if v_cache is None else v_cache,
                self.block_tables, self.query_start_loc, self.seq_lens)

    def clean_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.nan_to_num(self.k_cache, nan=0.0), torch.nan_to_num(self.v_cache, nan=0.0)


def random_paged_batch(q_lens: list[int], ctx_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                       page_size: int, dtype: torch.dtype, device: torch.device | str = "cpu", *,
                       poison: bool = True, spare_blocks: int = 3, seed: Optional[int] = None) -> PagedBatch:
    """A ragged batch: request i has ctx_lens[i] cached tokens and q_lens[i] new queries. Its pages
    are a random permutation of the pool (scattered), unused block-table columns point at a
    finite spare block, and with poison=True every block no table references and every slot past
    a request's seq_len in its last page hold NaN, so a kernel that reads outside the context fails."""
    # Small index tensors come from a CPU generator; the large random tensors are drawn directly
    # on `device` (seconds instead of minutes for multi-GB benchmark caches).
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    dev_gen = torch.Generator(device=device).manual_seed(seed + 1) if seed is not None else None
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    pages = [-(-s // page_size) for s in seq_lens]
    width = max(pages) + 1
    num_blocks = sum(pages) + spare_blocks + 1
    perm = torch.randperm(num_blocks, generator=gen)
    spare = int(perm[-1])
    tables = torch.full((len(q_lens), width), spare, dtype=torch.int32)
    cache_shape = (num_blocks, page_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=dev_gen, device=device, dtype=dtype)
    v_cache = torch.randn(cache_shape, generator=dev_gen, device=device, dtype=dtype)
    used = torch.zeros(num_blocks, dtype=torch.bool)
    used[spare] = True
    cursor = 0
    for i, (n, s) in enumerate(zip(pages, seq_lens)):
        ids = perm[cursor:cursor + n]
        cursor += n
        tables[i, :n] = ids.to(torch.int32)
        used[ids] = True
        if poison and n and s % page_size:
            k_cache[int(ids[-1]), s % page_size:] = float("nan")
            v_cache[int(ids[-1]), s % page_size:] = float("nan")
    if poison:
        unused = (~used).nonzero().flatten().to(k_cache.device)
        k_cache[unused] = float("nan")
        v_cache[unused] = float("nan")
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=dev_gen, device=device, dtype=dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=tables.to(device),
        query_start_loc=qsl.to(device), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens))
