"""Device KV pages (one pool; a K and a V view per layer), page copies, and CPU swap space.

The page dtype is the model's, or float8_e4m3fn with kv_cache_dtype="fp8" (the attention layers own
the per-layer K/V scales). Copies and swaps move fp8 pages through uint8 views: the exact bits, and
index_copy_ is not implemented for fp8 on every device."""

from __future__ import annotations

import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from agentserve.cache.swap_in_pacer import InCopy
from agentserve.cache.swap_slots import consecutive_runs
from agentserve.cache.swap_streams import SWAP_STREAMS, SwapStreams
from agentserve.kernels._triton_utils import triton_enabled_for
from agentserve.kernels.fp8_utils import FP8_DTYPE, raw_bytes
from agentserve.kernels.page_copy import gather_pages, page_rows_supported, scatter_pages

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# Whole-page gathers and scatters (swaps, page copies) through kernels/page_copy.py on CUDA; "torch" keeps
# index_select / index_copy_ over the page-major view (the A/B of the twentieth session's agent loop).
PAGE_COPY: str = os.environ.get("AGENTSERVE_PAGE_COPY", "triton")
# A piece of a swap in on its way: (positions in the swap's slot list, staged rows, the copy on the copy
# stream, or None when it is queued on the step's stream).
StagedPiece = tuple[range, torch.Tensor, Optional[InCopy]]
# Bytes of pages per gather or scatter of a swap or page copy: the transient device memory one piece
# holds. Each piece costs the host an index upload, a kernel launch and (swaps) events and stream
# waits, ~0.1-0.3 ms; 256 MiB is 128 pages of Llama-3.1-8B, an 8k-token conversation in ~4 pieces.
PIECE_BYTES = 256 << 20


def kv_cache_torch_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The page dtype for CacheConfig.kv_cache_dtype ('fp8' and vLLM's 'fp8_e4m3' are e4m3)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected one of {KV_CACHE_DTYPES}")
    return model_dtype if kv_cache_dtype == "auto" else FP8_DTYPE


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, num_swap_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        # One allocation [L, 2, num_blocks, ...] whose per-layer K and V views the model reads: a page
        # copy or swap moves a page of every layer with one gather or scatter over `by_page` (page-major
        # view, [num_blocks, L, 2, ...]) instead of one per layer and tensor (on the H200's agent loop,
        # ~100 small kernels and their Python launches per 64 MiB piece of a swap, on the step's stream).
        self.pool = zeroed_pool((num_layers, 2, *shape), dtype, device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [(self.pool[i, 0], self.pool[i, 1])
                                                                for i in range(num_layers)]
        # CPU swap space, slot-major ([num_swap_blocks, num_layers, 2, block_size, Hkv, D]) so that a run
        # of consecutive slots is one contiguous host range: a swap is a few large DMA copies.
        # Pinned on CUDA, so the copies are asynchronous on the stream (the step loop never waits).
        self.num_swap_blocks = num_swap_blocks
        self.swap = torch.empty((num_swap_blocks, num_layers, 2, *shape[1:]), dtype=dtype,
                                pin_memory=device.type == "cuda" and num_swap_blocks > 0)
        # Pages per gather or scatter (PIECE_BYTES of them).
        block_bytes = bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype)
        self.pages_per_copy = max(1, PIECE_BYTES // block_bytes)
        # Started swap ins waiting for their finish: ticket -> (positions, staged rows, copy's event).
        self._staged_in: dict[int, list[StagedPiece]] = {}
        # PCIe copies off the step's stream (cache/swap_streams.py); None: on it (CPU, or the A/B flag).
        self.swap_streams = (SwapStreams(device) if device.type == "cuda" and num_swap_blocks > 0 and SWAP_STREAMS
                             else None)

    def release(self) -> None:
        """Drops the pages and the swap space (the engine is closing); nothing can be copied after."""
        if self.swap_streams is not None:
            self.swap_streams.synchronize()  # no copy may still use the pinned swap space
            self.swap_streams = None
        self._staged_in.clear()
        self.layers = []
        self.pool = torch.empty(0)
        self.swap = torch.empty(0)
        self.num_blocks = self.num_swap_blocks = 0

    def by_page(self) -> torch.Tensor:
        """The pool's exact bits (uint8 for fp8 pages) as [num_blocks, L, 2, block_size, Hkv, D]: page-major,
        the swap space's layout, so one index op on dim 0 gathers or scatters whole pages."""
        return raw_bytes(self.pool).permute(2, 0, 1, 3, 4, 5)

    def _page_kernels(self) -> bool:
        return PAGE_COPY == "triton" and triton_enabled_for(self.pool) and page_rows_supported(raw_bytes(self.pool))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Pages `index` (device int64) as a new [n, L, 2, block_size, Hkv, D] tensor of the pool's bits."""
        if self._page_kernels():
            return gather_pages(raw_bytes(self.pool), index)
        return self.by_page().index_select(0, index)

    def scatter(self, index: torch.Tensor, pages: torch.Tensor) -> None:
        """Writes `pages` ([n, L, 2, ...], the pool's bits) into the pool's pages `index`."""
        if self._page_kernels():
            scatter_pages(raw_bytes(self.pool), index, pages)
        else:
            self.by_page().index_copy_(0, index, pages)

    def _index(self, ids: Sequence[int]) -> torch.Tensor:
        """Page ids on the device without a host sync (a pageable copy would wait for the stream)."""
        device = self.layers[0][0].device
        host = torch.tensor(list(ids), dtype=torch.int64)
        if device.type != "cuda":
            return host
        return host.pin_memory().to(device, non_blocking=True)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: page dst gets page src's contents in every layer."""
        if not pairs:
            return
        # In pieces of pages_per_copy, as swaps are: the gather holds every layer of each page it copies.
        # Pairs that chain (a destination another pair reads) take one gather, so every source is read
        # before any page is written (copy-on-write destinations are fresh pages: not in practice).
        sources = {p[0] for p in pairs}
        step = len(pairs) if any(d in sources for _, d in pairs) else self.pages_per_copy
        for i in range(0, len(pairs), step):
            piece = pairs[i:i + step]
            index = self._index([p[0] for p in piece] + [p[1] for p in piece])  # one copy: sources, destinations
            self.scatter(index[len(piece):], self.gather(index[:len(piece)]))

    def _pieces(self, swap_slots: Sequence[int]) -> Iterator[tuple[range, list[tuple[int, int, int]]]]:
        """Splits a swap into pieces of at most pages_per_copy positions (in swap_slots' order), each with
        its runs of consecutive slots: (positions, [(offset in the piece, first slot, slot count)]). A
        piece is one gather or scatter on the device whatever its slots; a run is one host copy."""
        for start in range(0, len(swap_slots), self.pages_per_copy):
            positions = range(start, min(len(swap_slots), start + self.pages_per_copy))
            piece = swap_slots[positions.start:positions.stop]
            yield positions, [(offset, piece[offset], count) for offset, count in consecutive_runs(piece)]

    def swap_out(self, device_blocks: Sequence[int], swap_slots: Sequence[int]) -> None:
        """Copies pages to CPU swap slots: per piece, one gather on the device and one device-to-host copy
        per run of consecutive slots in it. The gather is queued on the step's stream: pages freed after
        this call are rewritten only by later work on that stream, after it has read them. The copies to
        the pinned host memory follow on a copy stream (swap_streams) or on the same one."""
        device = self.layers[0][0].device
        non_blocking = device.type == "cuda"
        swap = raw_bytes(self.swap)
        for positions, runs in self._pieces(swap_slots):
            staged = self.gather(self._index(device_blocks[positions.start:positions.stop]))  # [n, L, 2, bs, Hkv, D]
            copies = [(staged[offset:offset + count], swap[first:first + count], range(first, first + count))
                      for offset, first, count in runs]
            if self.swap_streams is not None:
                self.swap_streams.copy_out(staged, copies)
            else:
                for rows, host, _ in copies:
                    host.copy_(rows, non_blocking=non_blocking)

    def swap_in(self, swap_slots: Sequence[int], device_blocks: Sequence[int]) -> None:
        """Copies swap slots back into device pages (the reverse of swap_out, equally asynchronous: a
        slot freed after this call is rewritten only by a later swap_out, which waits for this copy).
        With swap_streams the host-to-device copies start now on the copy stream and the step's stream
        waits for them only at the scatter into the pages. Piece by piece: one staged piece at a time."""
        for piece in self._copy_in(swap_slots):
            self._place(piece, device_blocks)

    def _copy_in(self, swap_slots: Sequence[int]) -> Iterator[StagedPiece]:
        """Starts the host-to-device copies of each piece, lazily: (its positions in swap_slots, the staged
        rows [n, L, 2, bs, Hkv, D], its copy on the copy stream, or None when queued on the step's stream).
        The rows never share memory with the swap slots (a staged swap in outlives its slots, which are
        freed when it starts: a view of them, as `.to(device)` gives on the CPU, would hand the session
        the pages of whichever session's swap out reused the slots before the finish)."""
        device = self.layers[0][0].device
        swap = raw_bytes(self.swap)
        for positions, runs in self._pieces(swap_slots):
            hosts = [(swap[first:first + count], range(first, first + count)) for _, first, count in runs]
            if self.swap_streams is not None:
                copy = self.swap_streams.start_in(hosts)
                yield positions, copy.staged, copy
                continue
            rows = torch.empty((len(positions), *swap.shape[1:]), dtype=swap.dtype, device=device)
            for (offset, _, count), (host, _) in zip(runs, hosts):
                rows[offset:offset + count].copy_(host, non_blocking=device.type == "cuda")
            yield positions, rows, None

    def _place(self, piece: StagedPiece, device_blocks: Sequence[int]) -> None:
        """A staged piece into its pages (device_blocks[i] gets position i), on the current stream."""
        positions, rows, copy = piece
        if copy is not None:
            assert self.swap_streams is not None
            self.swap_streams.finish_in(copy)
        self.scatter(self._index(device_blocks[positions.start:positions.stop]), rows)

    def swap_in_start(self, swap_slots: Sequence[int], ticket: int) -> None:
        """swap_in's copy alone, into staging buffers kept under `ticket` until swap_in_finish. With
        swap_streams it runs on the copy stream and nothing waits for it yet (sessions start a
        returning session's copy and admit its turn once swap_in_ready says it has arrived);
        otherwise it is queued on the step's stream like any swap."""
        self._staged_in[ticket] = list(self._copy_in(swap_slots))

    def swap_in_ready(self, ticket: int) -> bool:
        staged = self._staged_in.get(ticket)
        if staged is None:
            # Not started yet (its op runs with the next step): with copy streams the copy is still
            # to come; without, it will be queued on the step's stream ahead of the finish anyway.
            return self.swap_streams is None
        return all(copy is None or copy.arrived() for _, _, copy in staged)

    def step_launched(self, inputs_uploaded: Optional[torch.cuda.Event] = None) -> None:
        """A step's uploads are queued: paced swap-in copies due now follow them (swap_in_pacer.py)."""
        if self.swap_streams is not None:
            self.swap_streams.step_launched(inputs_uploaded)

    def no_step_launched(self) -> None:
        """The engine had nothing to launch: queued swap-in copies need not wait for a step's uploads."""
        if self.swap_streams is not None:
            self.swap_streams.no_step_launched()

    def swap_in_finish(self, device_blocks: Sequence[int], ticket: int) -> None:
        """The staged copy `ticket` into device pages (device_blocks[i] gets position i of the start)."""
        for piece in self._staged_in.pop(ticket):
            self._place(piece, device_blocks)


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for the page pool: pages never written must read as zeros (attention weighs a padded
    position by 0, and 0 * NaN from stale memory would be NaN). On CPU the memory comes from numpy's
    calloc, whose large blocks the OS maps as zero pages on first touch: a 1 GiB pool costs nothing
    until its pages are used (torch.zeros writes every byte, ~0.4 s per GiB here, for each engine)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = np.zeros(math.prod(shape) * dtype.itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)
