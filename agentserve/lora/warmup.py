"""Compiling the LoRA kernels' variants before serving, so no request waits on a Triton compile.

The shrink / expand kernels take their tile shapes as constexprs chosen from the step's token count
(kernels/lora.py: BLOCK_M 16 or 64, split-K and the expand's BLOCK_N from the tile count), so a server would otherwise
compile a new variant (a second or more each) whenever a step first reaches a new one. The decode
CUDA graphs compile theirs at capture (worker/cuda_graph.py); this covers every eager step size up
to the token budget: it walks the token counts, keeps one per distinct variant, and launches each
variant once on a batch of base rows (every tile unused: the launch compiles and returns)."""

from __future__ import annotations

import torch

from agentserve.kernels.lora import (LoRABatchMeta, add_lora, build_lora_batch_meta, default_block_m,
                                     expand_block_n, lora_kernel_config, max_lora_blocks)
from agentserve.kernels._triton_utils import num_sms, triton_enabled_for
from agentserve.kernels.lora_fused import use_fused_lora
from agentserve.lora.manager import MultiLoRAManager


def _variant(manager: MultiLoRAManager, fused: str, num_tokens: int, sms: int) -> tuple[int, int, int]:
    """(BLOCK_M, SPLIT_K, the expand's BLOCK_N) the kernels use for `num_tokens` tokens on this projection."""
    block_m = default_block_m(num_tokens)
    blocks = max_lora_blocks(num_tokens, manager.max_loras, block_m)
    # lora_kernel_config reads the tile count from the meta's shape only: a shell of that shape.
    shell = torch.empty(blocks, dtype=torch.int32)
    meta = LoRABatchMeta(token_slots=shell, sorted_token_ids=shell, block_slot=shell, block_row_start=shell,
                         block_row_end=shell, block_m=block_m, max_loras=manager.max_loras)
    stack = manager.stack(0, fused)
    config = lora_kernel_config(meta, stack.lora_a.shape[-1], stack.lora_a.shape[1], sms)
    return block_m, config.split_k, expand_block_n(meta, stack.lora_b.shape[-1], sms)


@torch.inference_mode()
def warmup_lora_kernels(manager: MultiLoRAManager, max_num_tokens: int) -> int:
    """Launches every (projection, BLOCK_M, SPLIT_K, BLOCK_N) variant a step of 1..max_num_tokens tokens can
    use; returns how many were launched (0 off CUDA: the torch reference needs no compile)."""
    device = manager.device
    probe = torch.empty(1, device=device)
    if not triton_enabled_for(probe):
        return 0
    sms = num_sms(device)
    launched = 0
    for fused in manager.projections:
        stack = manager.stack(0, fused)
        seen: set[tuple[int, int, int] | str] = set()
        for m in range(1, max_num_tokens + 1):
            # With AGENTSERVE_LORA_FUSED on, small steps take kernels/lora_fused.py's one kernel, whose
            # tiles come from the weight shapes only: one variant, whatever (BLOCK_M, SPLIT_K) says.
            variant = "fused" if use_fused_lora(m) else _variant(manager, fused, m, sms)
            if variant in seen:
                continue
            seen.add(variant)
            x = torch.zeros(m, stack.lora_a.shape[-1], dtype=stack.lora_a.dtype, device=device)
            y = torch.zeros(m, stack.lora_b.shape[-1], dtype=stack.lora_b.dtype, device=device)
            meta = build_lora_batch_meta(torch.full((m,), -1, dtype=torch.int32, device=device), manager.max_loras)
            add_lora(y, x, stack.lora_a, stack.lora_b, stack.ranks, stack.scaling, meta, stack.slice_sizes,
                     stack.slice_starts)
            launched += 1
    torch.cuda.synchronize(device)
    return launched
