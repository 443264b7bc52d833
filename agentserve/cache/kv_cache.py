"""Device KV tensors (one K and one V tensor per layer), page copies, and CPU swap space."""

from __future__ import annotations

from typing import Sequence

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, num_swap_blocks: int = 0) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        # CPU swap space: [num_layers, 2, num_swap_blocks, block_size, Hkv, D], pinned when on CUDA.
        self.num_swap_blocks = num_swap_blocks
        self.swap = torch.empty((num_layers, 2, num_swap_blocks, *shape[1:]), dtype=dtype,
                                pin_memory=device.type == "cuda" and num_swap_blocks > 0)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: page dst gets page src's contents in every layer."""
        if not pairs:
            return
        device = self.layers[0][0].device
        index = torch.tensor(pairs, dtype=torch.long).t().contiguous()  # [2, n]: sources, destinations
        if device.type == "cuda":
            # Pinned and non-blocking: a pageable copy would wait for the step still running.
            index = index.pin_memory().to(device, non_blocking=True)
        src, dst = index[0], index[1]
        for k, v in self.layers:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))

    def swap_out(self, device_blocks: Sequence[int], swap_slots: Sequence[int]) -> None:
        """Copies pages to CPU swap slots: one gather on the device and one device-to-host copy for
        all layers (not one synchronous copy per layer and tensor)."""
        dev = torch.tensor(list(device_blocks), device=self.layers[0][0].device)
        staged = torch.stack([torch.stack([k.index_select(0, dev), v.index_select(0, dev)]) for k, v in self.layers])
        self.swap[:, :, torch.tensor(list(swap_slots))] = staged.cpu()

    def swap_in(self, swap_slots: Sequence[int], device_blocks: Sequence[int]) -> None:
        device = self.layers[0][0].device
        dev = torch.tensor(list(device_blocks), device=device)
        host = self.swap[:, :, torch.tensor(list(swap_slots))]
        if device.type == "cuda":
            host = host.pin_memory()
        staged = host.to(device, non_blocking=True)  # one host-to-device copy, queued on the stream
        for i, (k, v) in enumerate(self.layers):
            k.index_copy_(0, dev, staged[i, 0])
            v.index_copy_(0, dev, staged[i, 1])
