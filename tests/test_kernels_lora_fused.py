"""The fused shrink+expand LoRA kernel (kernels/lora_fused.py) against the gather + bmm reference, in
Triton's interpreter on CPU (tiny shapes; cases built as tests/test_kernels_lora.py builds them), the
AGENTSERVE_LORA_FUSED switch and its dispatch rule. Real Llama-3.1-8B shapes and CUDA-graph replay
through `add_lora` run at the end of this file under `-m gpu`."""

from __future__ import annotations

import os
from typing import Iterator

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from test_kernels_lora import TOL, make_lora_case, run_reference  # noqa: E402

from agentserve.kernels import lora, lora_fused  # noqa: E402
from helpers.interpreter import interpreter_only, is_interpreted  # noqa: E402
from helpers.lora import assert_graph_replays_match  # noqa: E402

_INTERPRETED = is_interpreted(lora_fused._lora_fused_kernel)
interpreted = interpreter_only(lora_fused._lora_fused_kernel)
MAX_M = lora_fused.FUSED_MAX_TOKENS


def run_fused(case: dict, config: lora_fused.LoRAFusedConfig | None = None) -> torch.Tensor:
    meta = lora.build_lora_batch_meta(case["token_slots"], case["lora_a"].shape[0])
    y = case["y"].clone()
    starts = lora.slice_starts_for(case["slice_sizes"], y.device)
    lora_fused.add_lora_fused(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"],
                              meta, starts, config)
    return y


def mixed_ranks(max_loras: int, num_slices: int) -> list[list[int]]:
    """Ranks 4..64 cycling over the slots (padded to max_lora_rank 64 in one stack)."""
    return [[(4, 8, 16, 64, 12, 32, 6, 24)[i % 8]] * num_slices for i in range(max_loras)]


def decode_slots(num_tokens: int, num_active: int, max_loras: int, seed: int) -> list[int]:
    """A decode step in a shuffled order: each of `num_active` adapters on one token, the rest of the
    tokens on the first adapter (a longer segment: ragged) or the base (-1, every third)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.randperm(max_loras, generator=g)[:num_active].tolist()
    slots = [active[i] if i < num_active else (-1 if i % 3 == 0 else active[0]) for i in range(num_tokens)]
    return [slots[p] for p in torch.randperm(num_tokens, generator=g).tolist()]


# ---------------------------------------------------------------------------------------------
# Switch and dispatch rule (plain Python)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value,expected", [(None, False), ("", False), ("0", False), ("off", False),
                                            ("1", True), ("on", True), ("TRUE", True)])
def test_switch_values(value: str | None, expected: bool) -> None:
    assert lora_fused.parse_lora_fused_switch(value) is expected


def test_switch_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="AGENTSERVE_LORA_FUSED='yes please'"):
        lora_fused.parse_lora_fused_switch("yes please")


def test_fused_only_for_decode_sized_steps_when_on() -> None:
    before = lora_fused.lora_fused_enabled()
    try:
        lora_fused.set_lora_fused(True)
        assert lora_fused.use_fused_lora(1) and lora_fused.use_fused_lora(MAX_M)
        assert not lora_fused.use_fused_lora(MAX_M + 1)
        lora_fused.set_lora_fused(False)
        assert not lora_fused.use_fused_lora(1)
    finally:
        lora_fused.set_lora_fused(before)


def test_config_from_static_shapes() -> None:
    qkv = lora_fused.lora_fused_config(4096, 6144)
    assert (qkv.block_n, qkv.block_k) == (128, 256)
    tiny = lora_fused.lora_fused_config(20, 8)
    assert (tiny.block_n, tiny.block_k) == (16, 32)  # tl.dot's 16 minimum, K padded to a power of 2


def test_add_lora_on_cpu_stays_the_reference_with_the_switch_on() -> None:
    case = make_lora_case(num_tokens=5, max_loras=2, ranks=[[4, 4], [2, 3]], max_rank=4, in_features=16,
                          slice_sizes=[8, 8], dtype=torch.float32, seed=2)
    before = lora_fused.lora_fused_enabled()
    try:
        lora_fused.set_lora_fused(True)
        y = case["y"].clone()
        meta = lora.build_lora_batch_meta(case["token_slots"], 2)
        lora.add_lora(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"], meta,
                      case["slice_sizes"], lora.slice_starts_for(case["slice_sizes"], y.device))
    finally:
        lora_fused.set_lora_fused(before)
    assert torch.equal(y, run_reference(case))


def test_shape_errors_name_the_mismatch() -> None:
    case = make_lora_case(num_tokens=4, max_loras=2, ranks=[[4], [4]], max_rank=4, in_features=16,
                          slice_sizes=[8], dtype=torch.float32, seed=0)
    meta = lora.build_lora_batch_meta(case["token_slots"], 2)
    starts = lora.slice_starts_for([8], torch.device("cpu"))
    args = (case["lora_a"], case["lora_b"], case["ranks"], case["scaling"])
    with pytest.raises(ValueError, match="do not fit together"):
        lora_fused.add_lora_fused(case["y"], case["x"][:, :8], *args, meta, starts)
    with pytest.raises(ValueError, match="batch meta"):
        lora_fused.add_lora_fused(case["y"][:3], case["x"][:3], *args, meta, starts)
    with pytest.raises(ValueError, match="slice_starts"):
        lora_fused.add_lora_fused(case["y"], case["x"], *args, meta, starts[:1])


# ---------------------------------------------------------------------------------------------
# The kernel through the interpreter
# ---------------------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_active", [(1, 1), (5, 3), (MAX_M, 1), (MAX_M, MAX_M)])
def test_fused_matches_reference_gqa_qkv(dtype: torch.dtype, num_tokens: int, num_active: int) -> None:
    """q bigger than k/v, ranks 4..64 mixed across slots (padded to 64), 1..8 active adapters, base
    rows, K not a multiple of BLOCK_K (masked tail), column tiles straddling the q|k|v boundaries."""
    max_loras = 8
    case = make_lora_case(num_tokens=num_tokens, max_loras=max_loras, ranks=mixed_ranks(max_loras, 3),
                          max_rank=64, in_features=40, slice_sizes=[24, 8, 8], dtype=dtype,
                          seed=num_tokens * 10 + num_active,
                          slots=decode_slots(num_tokens, num_active, max_loras, seed=num_active))
    y = run_fused(case, lora_fused.LoRAFusedConfig(block_n=16, block_k=16))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[dtype])
    assert not torch.equal(y, case["y"])


@interpreted
@pytest.mark.parametrize("sizes,block_n", [([24, 24], 16), ([32, 32], 32), ([16], 16), ([12, 20, 8, 24], 16)])
def test_fused_slice_layouts(sizes: list[int], block_n: int) -> None:
    """gate|up (two equal slices, tiles straddling or aligned), one slice (o/down), four slices of
    uneven sizes; K a multiple of BLOCK_K (the unmasked loop)."""
    slots = [2, 0, -1, 2, 1, 2, 0, -1][:MAX_M]
    case = make_lora_case(num_tokens=len(slots), max_loras=3, ranks=[[8] * len(sizes), [16] * len(sizes),
                          [4] * len(sizes)], max_rank=16, in_features=32, slice_sizes=sizes, dtype=torch.float32,
                          seed=len(sizes) + block_n, slots=slots)
    y = run_fused(case, lora_fused.LoRAFusedConfig(block_n=block_n, block_k=16))
    torch.testing.assert_close(y, run_reference(case), **TOL[torch.float32])


@interpreted
def test_base_rows_and_untargeted_slices_are_untouched() -> None:
    """Base rows keep the base output bit for bit; so do the columns of a slice the adapter does not
    target (rank 0): adapter 0 on q and v only, adapter 1 on v only."""
    slots = [0, -1, 1, 1, -1, 0, 1, -1]
    case = make_lora_case(num_tokens=len(slots), max_loras=2, ranks=[[4, 0, 4], [0, 0, 8]], max_rank=8,
                          in_features=16, slice_sizes=[16, 8, 8], dtype=torch.float16, seed=3, slots=slots)
    y = run_fused(case, lora_fused.LoRAFusedConfig(block_n=16, block_k=16))
    base = [i for i, s in enumerate(slots) if s < 0]
    slot0 = [i for i, s in enumerate(slots) if s == 0]
    slot1 = [i for i, s in enumerate(slots) if s == 1]
    assert torch.equal(y[base], case["y"][base])
    assert torch.equal(y[slot0, 16:24], case["y"][slot0, 16:24])  # k slice of adapter 0
    assert torch.equal(y[slot1, :24], case["y"][slot1, :24])      # q and k slices of adapter 1
    assert not torch.equal(y[slot1, 24:], case["y"][slot1, 24:])
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.float16])


@interpreted
def test_base_only_step_leaves_output_unchanged() -> None:
    case = make_lora_case(num_tokens=4, max_loras=2, ranks=[[4], [4]], max_rank=4, in_features=16,
                          slice_sizes=[16], dtype=torch.float32, seed=5, slots=[-1] * 4)
    assert torch.equal(run_fused(case), case["y"])


@interpreted
def test_fused_equals_two_kernel_path() -> None:
    """Same operands, same rounding points (h rounded to B's dtype before the expand dot): the two
    paths agree to fp32 accumulation order."""
    case = make_lora_case(num_tokens=6, max_loras=4, ranks=mixed_ranks(4, 3), max_rank=64, in_features=32,
                          slice_sizes=[16, 8, 8], dtype=torch.float32, seed=9, slots=[3, 1, -1, 3, 0, 2])
    meta = lora.build_lora_batch_meta(case["token_slots"], 4)
    starts = lora.slice_starts_for(case["slice_sizes"], torch.device("cpu"))
    two = case["y"].clone()
    config = lora.LoRAKernelConfig(split_k=1, block_k=16, block_n=16)
    lora.lora_expand(two, lora.lora_shrink(case["x"], case["lora_a"], case["ranks"], meta, config),
                     case["lora_b"], case["ranks"], case["scaling"], meta, starts, config)
    fused = run_fused(case, lora_fused.LoRAFusedConfig(block_n=16, block_k=16))
    torch.testing.assert_close(fused, two, atol=1e-5, rtol=1e-5)


@interpreted
@pytest.mark.parametrize("switch", [True, False])
def test_add_lora_dispatch(monkeypatch: pytest.MonkeyPatch, switch: bool) -> None:
    """`add_lora` on the Triton path (forced for the interpreter's CPU tensors): the fused kernel for
    steps of <= FUSED_MAX_TOKENS tokens when the switch is on, shrink + expand otherwise; both right."""
    calls: list[int] = []
    real = lora.add_lora_fused
    monkeypatch.setattr(lora, "triton_enabled_for", lambda t: True)
    monkeypatch.setattr(lora, "add_lora_fused", lambda y, *a: (calls.append(y.shape[0]), real(y, *a))[1])
    monkeypatch.setattr(lora_fused, "_fused_enabled", switch)
    for num_tokens in (1, MAX_M, MAX_M + 1):
        case = make_lora_case(num_tokens=num_tokens, max_loras=3, ranks=[[4, 4], [8, 8], [16, 0]], max_rank=16,
                              in_features=32, slice_sizes=[16, 16], dtype=torch.float32, seed=num_tokens)
        y = case["y"].clone()
        meta = lora.build_lora_batch_meta(case["token_slots"], 3)
        lora.add_lora(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"], meta,
                      case["slice_sizes"], lora.slice_starts_for(case["slice_sizes"], y.device))
        torch.testing.assert_close(y, run_reference(case), **TOL[torch.float32])
    assert calls == ([1, MAX_M] if switch else [])


# ---------------------------------------------------------------------------------------------
# GPU, real shapes (`pytest -m gpu`, compiled Triton)
# ---------------------------------------------------------------------------------------------

compiled_on_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _INTERPRETED,
    reason="needs a CUDA device and compiled Triton (unset TRITON_INTERPRET)")
TOL_GPU = dict(atol=3e-2, rtol=2e-2)
# Llama-3.1-8B: (in_features, output slices) of qkv (GQA: 32 q heads, 8 k/v heads) and o.
MODULES_8B = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096])}


@pytest.fixture
def fused_on() -> Iterator[None]:
    before = lora_fused.lora_fused_enabled()
    lora_fused.set_lora_fused(True)
    yield
    lora_fused.set_lora_fused(before)


@pytest.mark.gpu
@compiled_on_gpu
@pytest.mark.parametrize("module", list(MODULES_8B))
@pytest.mark.parametrize("num_tokens,num_active", [(1, 1), (4, 2), (MAX_M, 1), (MAX_M, MAX_M)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(module: str, num_tokens: int, num_active: int, dtype: torch.dtype, fused_on: None) -> None:
    """Through `add_lora` (the dispatcher takes the fused kernel at these sizes), 64 slots of ranks
    8..64 padded to 64, one adapter on q and v only."""
    in_features, sizes = MODULES_8B[module]
    ranks = [[(8, 16, 32, 64)[i % 4]] * len(sizes) for i in range(64)]
    slots = decode_slots(num_tokens, num_active, 64, seed=num_tokens + num_active)
    if len(sizes) == 3:
        ranks[slots[0] if slots[0] >= 0 else 0] = [16, 0, 16]
    case = make_lora_case(num_tokens=num_tokens, max_loras=64, ranks=ranks, max_rank=64, in_features=in_features,
                          slice_sizes=sizes, dtype=dtype, seed=num_tokens, slots=slots, device="cuda")
    assert lora_fused.use_fused_lora(num_tokens)
    y = case["y"].clone()
    meta = lora.build_lora_batch_meta(case["token_slots"], 64)
    lora.add_lora(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"], meta, sizes,
                  lora.slice_starts_for(sizes, y.device))
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL_GPU)
    torch.testing.assert_close(y.float(), run_fused(case).float(), atol=0, rtol=0)  # deterministic


@pytest.mark.gpu
@compiled_on_gpu
def test_gpu_cuda_graph_replay_with_new_slots(fused_on: None) -> None:
    """Meta build + the fused kernel captured once through `add_lora`; replays after rewriting the
    persistent slot buffer (adapters, base only, one adapter) match the reference."""
    m, max_loras = MAX_M, 16
    sizes = [4096, 1024, 1024]
    case = make_lora_case(num_tokens=m, max_loras=max_loras, ranks=mixed_ranks(max_loras, 3), max_rank=64,
                          in_features=4096, slice_sizes=sizes, dtype=torch.bfloat16, seed=0, device="cuda")
    slot_buf = case["token_slots"].clone()
    y_base = case["y"].clone()
    y = torch.empty_like(y_base)
    starts = lora.slice_starts_for(sizes, torch.device("cuda"))

    def step() -> None:
        y.copy_(y_base)
        meta = lora.build_lora_batch_meta(slot_buf, max_loras)
        lora.add_lora(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"], meta, sizes,
                      starts)

    assert_graph_replays_match(step, slot_buf, max_loras, y,
                               lambda slots: run_reference(dict(case, token_slots=slots)), **TOL_GPU)
