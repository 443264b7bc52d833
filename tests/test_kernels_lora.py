"""Multi-LoRA shrink/expand kernels against the gather + bmm reference, in Triton's interpreter on
CPU (tiny shapes, fresh random inputs), and the reference against a per-token loop of the LoRA
formula. Real shapes (Llama-3.1-8B projections, 1-64 active adapters, ranks 8-64, ragged
segments, CUDA-graph replay) run at the end of this file under `-m gpu`."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from agentserve.kernels import lora  # noqa: E402
from helpers.interpreter import interpreter_only, is_interpreted  # noqa: E402
from helpers.lora import assert_graph_replays_match  # noqa: E402

_INTERPRETED = is_interpreted(lora._lora_shrink_kernel)
interpreted = interpreter_only(lora._lora_shrink_kernel)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
       torch.bfloat16: dict(atol=6e-2, rtol=4e-2)}


def make_lora_case(*, num_tokens: int, max_loras: int, ranks: list[list[int]], max_rank: int,
                   in_features: int, slice_sizes: list[int], dtype: torch.dtype, seed: int,
                   slots: list[int] | None = None, device: str = "cpu") -> dict:
    """Random stacked weights (rank rows past each slot's rank zeroed, as the manager pads them),
    per-slot scaling, and a random slot per token (-1 = base) unless `slots` is given."""
    g = torch.Generator(device=device).manual_seed(seed)
    num_slices, n = len(slice_sizes), sum(slice_sizes)
    rank_t = torch.tensor(ranks, dtype=torch.int32)
    assert rank_t.shape == (max_loras, num_slices)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device)

    a = randn(max_loras, num_slices, max_rank, in_features) / in_features ** 0.5
    b = randn(max_loras, max_rank, n) / max_rank ** 0.5
    starts = [0]
    for size in slice_sizes:
        starts.append(starts[-1] + size)
    for slot in range(max_loras):
        for s in range(num_slices):
            a[slot, s, ranks[slot][s]:] = 0
            b[slot, ranks[slot][s]:, starts[s]:starts[s + 1]] = 0
    if slots is None:
        token_slots = torch.randint(-1, max_loras, (num_tokens,), generator=g, device=device,
                                    dtype=torch.int32)
    else:
        token_slots = torch.tensor(slots, dtype=torch.int32, device=device)
    return dict(
        x=randn(num_tokens, in_features).to(dtype), y=randn(num_tokens, n).to(dtype),
        lora_a=a.to(dtype), lora_b=b.to(dtype), ranks=rank_t.to(device),
        scaling=0.25 + torch.rand(max_loras, num_slices, generator=g, device=device),
        token_slots=token_slots, slice_sizes=slice_sizes)


def run_kernels(case: dict, config: lora.LoRAKernelConfig | None = None,
                block_m: int | None = None) -> torch.Tensor:
    meta = lora.build_lora_batch_meta(case["token_slots"], case["lora_a"].shape[0], block_m)
    y = case["y"].clone()
    h = lora.lora_shrink(case["x"], case["lora_a"], case["ranks"], meta, config)
    starts = lora.slice_starts_for(case["slice_sizes"], y.device)
    lora.lora_expand(y, h, case["lora_b"], case["ranks"], case["scaling"], meta, starts, config)
    return y


def run_reference(case: dict) -> torch.Tensor:
    y = case["y"].clone()
    lora.add_lora_ref(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"],
                      case["token_slots"], case["slice_sizes"])
    return y


def naive_lora(case: dict) -> torch.Tensor:
    """The LoRA formula token by token: y_t[slice s] += scale * B_s (A_s x_t), fp32."""
    y = case["y"].float().clone()
    starts = [0]
    for size in case["slice_sizes"]:
        starts.append(starts[-1] + size)
    for t, slot in enumerate(case["token_slots"].tolist()):
        if slot < 0:
            continue
        for s in range(len(case["slice_sizes"])):
            r = int(case["ranks"][slot, s])
            a = case["lora_a"][slot, s, :r].float()                          # [r, K]
            b = case["lora_b"][slot, :r, starts[s]:starts[s + 1]].float().T  # [n_s, r]
            y[t, starts[s]:starts[s + 1]] += case["scaling"][slot, s] * (b @ (a @ case["x"][t].float()))
    return y


def _uniform_ranks(max_loras: int, num_slices: int, rank: int) -> list[list[int]]:
    return [[rank] * num_slices for _ in range(max_loras)]


# ---------------------------------------------------------------------------------------------
# Batch meta and reference (plain torch)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block_m", [16, 64])
def test_tile_map_covers_each_adapter_token_once(seed: int, block_m: int) -> None:
    g = torch.Generator().manual_seed(seed)
    max_loras, m = 5, 70
    slots = torch.randint(-1, max_loras, (m,), generator=g, dtype=torch.int32)
    meta = lora.build_lora_batch_meta(slots, max_loras, block_m)
    assert meta.max_blocks == lora.max_lora_blocks(m, max_loras, block_m)
    assert sorted(meta.sorted_token_ids.tolist()) == list(range(m))
    seen: list[int] = []
    for b in range(meta.max_blocks):
        slot = int(meta.block_slot[b])
        if slot < 0:
            continue
        lo, end = int(meta.block_row_start[b]), int(meta.block_row_end[b])
        rows = meta.sorted_token_ids[lo:min(lo + block_m, end)].tolist()
        assert rows and all(int(slots[r]) == slot for r in rows)
        seen += rows
    assert sorted(seen) == [t for t in range(m) if int(slots[t]) >= 0]
    used = int((meta.block_slot >= 0).sum())
    counts = torch.bincount(slots[slots >= 0].long(), minlength=max_loras)
    assert used == int(((counts + block_m - 1) // block_m).sum())  # no tile for base rows


def test_out_of_range_slots_are_base_rows() -> None:
    meta = lora.build_lora_batch_meta(torch.tensor([7, -3, 1, 2], dtype=torch.int32), 3, 16)
    assert sorted(meta.block_slot[meta.block_slot >= 0].tolist()) == [1, 2]


@pytest.mark.parametrize("slot", [-1, 0, 3, 7, 8, 1000])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_one_token_tile_map_is_the_general_one(slot: int, block_m: int, dtype: torch.dtype) -> None:
    """Batch-1 steps build their tile map in closed form (one_token_lora_batch_meta): the same tiles
    as the general device-ops path, for a valid slot, a base row and slots out of range (max_loras 8)."""
    slots = torch.tensor([slot], dtype=dtype)
    one = lora.build_lora_batch_meta(slots, 8, block_m)
    general = lora.general_lora_batch_meta(slots, 8, block_m)
    for name in ("sorted_token_ids", "block_slot", "block_row_start", "block_row_end"):
        ours, ref = getattr(one, name), getattr(general, name)
        assert ours.dtype == ref.dtype == torch.int32 and torch.equal(ours, ref), name
    assert (one.block_m, one.max_loras, one.max_blocks) == (general.block_m, general.max_loras, general.max_blocks)


def test_empty_step() -> None:
    case = make_lora_case(num_tokens=0, max_loras=2, ranks=_uniform_ranks(2, 1, 4), max_rank=4,
                          in_features=16, slice_sizes=[8], dtype=torch.float32, seed=0, slots=[])
    assert lora.build_lora_batch_meta(case["token_slots"], 2).max_blocks == 0
    assert run_kernels(case).shape == (0, 8)


def test_base_only_batch_has_no_tiles() -> None:
    meta = lora.build_lora_batch_meta(torch.full((9,), -1, dtype=torch.int32), 4, 16)
    assert (meta.block_slot == -1).all()


@pytest.mark.parametrize("slice_sizes", [[24], [16, 8, 8], [12, 12]])
def test_reference_matches_per_token_formula(slice_sizes: list[int]) -> None:
    ranks = [[4] * len(slice_sizes), [8] * len(slice_sizes), [2] + [0] * (len(slice_sizes) - 1)]
    case = make_lora_case(num_tokens=11, max_loras=3, ranks=ranks, max_rank=8, in_features=20,
                          slice_sizes=slice_sizes, dtype=torch.float32, seed=len(slice_sizes))
    torch.testing.assert_close(run_reference(case), naive_lora(case), atol=1e-5, rtol=1e-5)


def test_add_lora_on_cpu_is_the_reference() -> None:
    case = make_lora_case(num_tokens=9, max_loras=2, ranks=[[4, 4], [2, 3]], max_rank=4, in_features=16,
                          slice_sizes=[8, 8], dtype=torch.float32, seed=1)
    y = case["y"].clone()
    meta = lora.build_lora_batch_meta(case["token_slots"], 2)
    starts = lora.slice_starts_for(case["slice_sizes"], y.device)
    lora.add_lora(y, case["x"], case["lora_a"], case["lora_b"], case["ranks"], case["scaling"], meta,
                  case["slice_sizes"], starts)
    assert torch.equal(y, run_reference(case))
    assert not torch.equal(y, case["y"])


# ---------------------------------------------------------------------------------------------
# Triton kernels through the interpreter
# ---------------------------------------------------------------------------------------------


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [4, 8, 16, 64])
def test_kernels_match_reference_qkv(dtype: torch.dtype, rank: int) -> None:
    """Three slices of different sizes (q|k|v with GQA), several adapters and base rows mixed."""
    case = make_lora_case(num_tokens=23, max_loras=4, ranks=_uniform_ranks(4, 3, rank), max_rank=rank,
                          in_features=32, slice_sizes=[32, 16, 16], dtype=dtype, seed=rank)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=1, block_k=32, block_n=32))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[dtype])
    torch.testing.assert_close(y.float(), naive_lora(case), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("num_slices", [1, 2, 3, 4])
def test_slices_and_straddling_column_tiles(num_slices: int) -> None:
    """Slice sizes that are not multiples of BLOCK_N: column tiles straddle slice boundaries."""
    sizes = [24, 8, 40, 12][:num_slices]
    ranks = [[8] * num_slices, [3] * num_slices, [16] * num_slices]
    case = make_lora_case(num_tokens=19, max_loras=3, ranks=ranks, max_rank=16, in_features=24,
                          slice_sizes=sizes, dtype=torch.float32, seed=num_slices)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=1, block_k=16, block_n=16))
    torch.testing.assert_close(y, run_reference(case), **TOL[torch.float32])


@interpreted
@pytest.mark.parametrize("split_k,block_k,in_features", [(2, 16, 64), (4, 16, 72), (2, 32, 40), (1, 16, 30)])
def test_split_k_and_ragged_k(split_k: int, block_k: int, in_features: int) -> None:
    """Split-K partials summed by expand; K not a multiple of SPLIT_K * BLOCK_K (masked tail), and
    splits with no K chunk at all (they must write zeros, not leave garbage)."""
    case = make_lora_case(num_tokens=13, max_loras=3, ranks=[[8, 8], [4, 2], [8, 1]], max_rank=8,
                          in_features=in_features, slice_sizes=[16, 16], dtype=torch.float16, seed=split_k)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=split_k, block_k=block_k, block_n=16))
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.float16])


@interpreted
def test_mixed_ranks_under_max_rank_64() -> None:
    """Adapters of ranks 4/8/16/64 in the same slots tensor (padded to max_lora_rank 64), ragged
    segments including a long one that spans several BLOCK_M tiles."""
    slots = [0] * 37 + [-1] * 3 + [1, 2, 3, -1, 2, 1, 0, 3] + [2] * 5
    ranks = [[4, 4, 4], [8, 8, 8], [16, 16, 16], [64, 64, 64], [8, 8, 8]]
    case = make_lora_case(num_tokens=len(slots), max_loras=5, ranks=ranks, max_rank=64, in_features=32,
                          slice_sizes=[16, 8, 8], dtype=torch.bfloat16, seed=7, slots=slots)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=2, block_k=16, block_n=16))
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.bfloat16])


@interpreted
@pytest.mark.parametrize("split_k", [1, 2])
def test_rows_past_the_rank_are_never_used(split_k: int) -> None:
    """Stale rows past a slot's rank (an earlier adapter's) are masked: B's tile loads whole, early."""
    ranks, starts = [[4, 8, 2], [8, 8, 8], [2, 4, 8]], [0, 16, 24, 32]
    case = make_lora_case(num_tokens=9, max_loras=3, ranks=ranks, max_rank=8, in_features=32, slice_sizes=[16, 8, 8],
                          dtype=torch.float32, seed=11, slots=[0, 1, 2, -1, 2, 0, 1, 1, 2])
    stale = dict(case, lora_a=case["lora_a"].clone(), lora_b=case["lora_b"].clone())
    for slot, sl in [(slot, sl) for slot in range(3) for sl in range(3)]:
        stale["lora_a"][slot, sl, ranks[slot][sl]:] = stale["lora_b"][slot, ranks[slot][sl]:, starts[sl]:starts[sl + 1]] = 1e3
    y = run_kernels(stale, lora.LoRAKernelConfig(split_k=split_k, block_k=16, block_n=16))
    torch.testing.assert_close(y, naive_lora(case), **TOL[torch.float32])


@interpreted
def test_many_slots_few_active_and_every_slot_active() -> None:
    """max_loras 64: three adapters used in a ragged step (most tiles unused), then one token on
    each of the 64 slots (64 single-row tiles)."""
    ranks = [[(4, 8, 16, 64)[i % 4]] * 3 for i in range(64)]
    ragged = [9] * 20 + [-1] * 5 + [40] * 3 + [63] * 17 + [9, -1, 40]
    for slots in (ragged, list(range(64))):
        case = make_lora_case(num_tokens=len(slots), max_loras=64, ranks=ranks, max_rank=64, in_features=16,
                              slice_sizes=[16, 8, 8], dtype=torch.float16, seed=len(slots), slots=slots)
        y = run_kernels(case, lora.LoRAKernelConfig(split_k=1, block_k=16, block_n=32))
        torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.float16])


@interpreted
def test_base_rows_and_untargeted_slices_are_untouched() -> None:
    """Base rows keep the base output bit for bit; so do the columns of a slice the adapter does not
    target (rank 0), e.g. an adapter on q and v only."""
    slots = [0, -1, 1, 1, -1, 0, 1, -1]
    case = make_lora_case(num_tokens=len(slots), max_loras=2, ranks=[[4, 0, 4], [0, 0, 8]], max_rank=8,
                          in_features=16, slice_sizes=[16, 8, 8], dtype=torch.float16, seed=3, slots=slots)
    y = run_kernels(case, lora.LoRAKernelConfig(split_k=2, block_k=16, block_n=16))
    base = [i for i, s in enumerate(slots) if s < 0]
    assert torch.equal(y[base], case["y"][base])
    slot0 = [i for i, s in enumerate(slots) if s == 0]
    slot1 = [i for i, s in enumerate(slots) if s == 1]
    assert torch.equal(y[slot0, 16:24], case["y"][slot0, 16:24])  # k slice of adapter 0
    assert torch.equal(y[slot1, :24], case["y"][slot1, :24])      # q and k slices of adapter 1
    assert not torch.equal(y[slot1, 24:], case["y"][slot1, 24:])
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL[torch.float16])


@interpreted
def test_base_only_batch_leaves_output_unchanged() -> None:
    case = make_lora_case(num_tokens=6, max_loras=2, ranks=_uniform_ranks(2, 1, 4), max_rank=4,
                          in_features=16, slice_sizes=[16], dtype=torch.float32, seed=5, slots=[-1] * 6)
    assert torch.equal(run_kernels(case), case["y"])


@interpreted
def test_prefill_block_m_and_heuristic_config() -> None:
    """BLOCK_M 64 (the prefill tile) with the heuristic split-K / tiles."""
    case = make_lora_case(num_tokens=90, max_loras=3, ranks=[[8, 8], [16, 16], [4, 4]], max_rank=16,
                          in_features=64, slice_sizes=[32, 32], dtype=torch.float32, seed=11)
    y = run_kernels(case, block_m=64)
    torch.testing.assert_close(y, run_reference(case), **TOL[torch.float32])


def test_shape_errors_name_the_mismatch() -> None:
    case = make_lora_case(num_tokens=4, max_loras=2, ranks=_uniform_ranks(2, 1, 4), max_rank=4,
                          in_features=16, slice_sizes=[8], dtype=torch.float32, seed=0)
    meta = lora.build_lora_batch_meta(case["token_slots"], 2)
    with pytest.raises(ValueError, match="in_features"):
        lora.lora_shrink(case["x"][:, :8], case["lora_a"], case["ranks"], meta)
    with pytest.raises(ValueError, match="batch meta"):
        lora.lora_shrink(case["x"][:3], case["lora_a"], case["ranks"], meta)
    with pytest.raises(ValueError, match="ranks"):
        lora.lora_shrink(case["x"], case["lora_a"], case["ranks"][:, :0], meta)


def test_config_heuristic_splits_k_at_decode_only() -> None:
    """Pure Python: a decode step (few tiles) splits K to fill the SMs; a big prefill does not."""
    decode = lora.build_lora_batch_meta(torch.zeros(1, dtype=torch.int32), 64)
    prefill = lora.build_lora_batch_meta(torch.zeros(4096, dtype=torch.int32), 64)
    assert lora.lora_kernel_config(decode, 4096, 3, sms=132).split_k > 1
    assert lora.lora_kernel_config(prefill, 4096, 3, sms=132).split_k == 1
    cfg = lora.lora_kernel_config(decode, 4096, 1, sms=132)
    assert cfg.split_k <= lora.MAX_SPLIT_K and 4096 >= cfg.split_k * cfg.block_k


# ---------------------------------------------------------------------------------------------
# GPU, real shapes (`pytest -m gpu`, compiled Triton)
# ---------------------------------------------------------------------------------------------

compiled_on_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or _INTERPRETED,
    reason="needs a CUDA device and compiled Triton (unset TRITON_INTERPRET)")
TOL_GPU = dict(atol=3e-2, rtol=2e-2)
# Llama-3.1-8B: (in_features, output slices) of qkv, o, gate_up, down.
MODULES_8B = {"qkv": (4096, [4096, 1024, 1024]), "o": (4096, [4096]),
              "gate_up": (4096, [14336, 14336]), "down": (14336, [4096])}


def ragged_slots(num_active: int, max_loras: int, seed: int) -> list[int]:
    """A step like the scheduler builds: prefill chunks (ragged, some over BLOCK_M) and decodes,
    requests contiguous in token order, each on one of `num_active` adapters or the base (-1)."""
    g = torch.Generator().manual_seed(seed)
    active = torch.randperm(max_loras, generator=g)[:num_active].tolist()
    lengths = [300, 17, 5, 64] + [1] * max(num_active, 24)
    slots: list[int] = []
    for i, length in enumerate(lengths):
        slot = active[i % num_active] if i % 5 != 4 else -1
        slots += [slot] * length
    return slots


@pytest.mark.gpu
@compiled_on_gpu
@pytest.mark.parametrize("module", list(MODULES_8B))
@pytest.mark.parametrize("rank", [8, 16, 32, 64])
@pytest.mark.parametrize("num_active", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shapes(module: str, rank: int, num_active: int, dtype: torch.dtype) -> None:
    in_features, sizes = MODULES_8B[module]
    slots = ragged_slots(num_active, 64, seed=rank + num_active)
    case = make_lora_case(num_tokens=len(slots), max_loras=64, ranks=_uniform_ranks(64, len(sizes), rank),
                          max_rank=rank, in_features=in_features, slice_sizes=sizes, dtype=dtype,
                          seed=rank, slots=slots, device="cuda")
    y = run_kernels(case)
    assert torch.isfinite(y.float()).all()
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL_GPU)


@pytest.mark.gpu
@compiled_on_gpu
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 256])
def test_gpu_decode_mixed_ranks_padded_to_64(num_tokens: int) -> None:
    """Decode batches (the split-K path) over adapters of ranks 8..64 padded to max_lora_rank 64,
    with an adapter that targets q and v only."""
    ranks = [[(8, 16, 32, 64)[i % 4]] * 3 for i in range(64)]
    ranks[5] = [16, 0, 16]
    g = torch.Generator().manual_seed(num_tokens)
    slots = torch.randint(-1, 64, (num_tokens,), generator=g).tolist()
    slots[0] = 5
    case = make_lora_case(num_tokens=num_tokens, max_loras=64, ranks=ranks, max_rank=64, in_features=4096,
                          slice_sizes=[4096, 1024, 1024], dtype=torch.bfloat16, seed=num_tokens,
                          slots=slots, device="cuda")
    y = run_kernels(case)
    torch.testing.assert_close(y.float(), run_reference(case).float(), **TOL_GPU)


@pytest.mark.gpu
@compiled_on_gpu
def test_gpu_cuda_graph_replay_with_new_slots() -> None:
    """Meta build + shrink + expand captured once; replays after rewriting the persistent slot
    buffer (adapters, base only, one adapter) match the reference: no host syncs, no stale shapes."""
    m, max_loras = 64, 16
    case = make_lora_case(num_tokens=m, max_loras=max_loras, ranks=_uniform_ranks(max_loras, 3, 16),
                          max_rank=16, in_features=4096, slice_sizes=[4096, 1024, 1024],
                          dtype=torch.bfloat16, seed=0, device="cuda")
    slot_buf = case["token_slots"].clone()
    y_base = case["y"].clone()
    y = torch.empty_like(y_base)
    starts = lora.slice_starts_for(case["slice_sizes"], torch.device("cuda"))

    def step() -> None:
        y.copy_(y_base)
        meta = lora.build_lora_batch_meta(slot_buf, max_loras)
        h = lora.lora_shrink(case["x"], case["lora_a"], case["ranks"], meta)
        lora.lora_expand(y, h, case["lora_b"], case["ranks"], case["scaling"], meta, starts)

    assert_graph_replays_match(step, slot_buf, max_loras, y,
                               lambda slots: run_reference(dict(case, token_slots=slots)), **TOL_GPU)
