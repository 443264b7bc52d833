"""LoRA kernel tiles for steps of many adapters with few rows each (kernels/lora.py: the shrink's
split-K target and expand_block_n), and the kernels' results with those tiles (interpreter)."""

from __future__ import annotations

# test_kernels_lora sets TRITON_INTERPRET=1 on the CPU before the kernels are imported: first.
from test_kernels_lora import TOL, interpreted, make_lora_case, run_kernels, run_reference  # isort: skip

import torch  # noqa: E402

from agentserve.kernels import lora  # noqa: E402


def test_many_adapters_in_a_decode_step_get_more_splits_and_wider_expand_tiles() -> None:
    """128 rows over 64 adapters (the 512-adapter workload's step): the shrink grid reaches
    SHRINK_PROGRAMS_PER_SM per SM through split-K (4 for qkv, 8 for o: the sweep's best) and the
    expand takes 256-column tiles; one stream keeps the tiles it was tuned with (split-K 16, 64
    columns); prefill keeps 64 columns."""
    one = lora.build_lora_batch_meta(torch.zeros(1, dtype=torch.int32), 64)
    many = lora.build_lora_batch_meta(torch.arange(128, dtype=torch.int32) % 64, 64)
    prefill = lora.build_lora_batch_meta(torch.zeros(4096, dtype=torch.int32), 64)
    assert lora.lora_kernel_config(one, 4096, 3, sms=132).split_k == 16
    assert lora.expand_block_n(one, 6144, sms=132) == 64
    cfg = lora.lora_kernel_config(many, 4096, 3, sms=132)
    assert many.max_blocks * 3 * cfg.split_k >= lora.SHRINK_PROGRAMS_PER_SM * 132 and cfg.split_k == 4
    assert lora.lora_kernel_config(many, 4096, 1, sms=132).split_k == 8
    assert lora.expand_block_n(many, 6144, sms=132) == 256 and lora.expand_block_n(many, 4096, sms=132) == 256
    assert lora.expand_block_n(prefill, 6144, sms=132) == 64
    assert lora.lora_kernel_config(prefill, 4096, 3, sms=132).split_k <= 2


@interpreted
def test_two_rows_per_adapter_with_deep_split_k_and_wide_expand_tiles() -> None:
    """The tiles expand_block_n / lora_kernel_config give a step of many adapters with 2 rows each:
    split-K 8 (one K chunk per program) and a 256-column expand tile straddling all three slices."""
    slots = [i % 16 for i in range(32)]
    ranks = [[(4, 8, 16)[i % 3]] * 3 for i in range(16)]
    case = make_lora_case(num_tokens=32, max_loras=16, ranks=ranks, max_rank=16, in_features=256,
                          slice_sizes=[192, 32, 32], dtype=torch.float16, seed=7, slots=slots)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=8, block_k=32, block_n=256))
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.float16])
