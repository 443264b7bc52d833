"""MultiLoRAManager on the CPU: slots hold exactly an adapter's weights in the kernels' layout, are
reused least-recently-used (never one the step uses), the CPU tier drops its oldest adapters past
max_cpu_loras and reads them again from disk, reload gives a new generation; plus the CLI flags."""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the layout test runs the Triton kernels too

import pytest  # noqa: E402

from agentserve.cli import build_parser, engine_config_from_args
from agentserve.config import LoRAConfig
from agentserve.kernels import lora as lora_kernels
from agentserve.lora.adapter import LoRAAdapterError, load_lora_adapter
from agentserve.lora.key import LoRAKey
from agentserve.lora.manager import FUSED_PROJECTIONS, LoRASlotsExhaustedError, MultiLoRAManager
from agentserve.model.arch_config import ArchConfig
from agentserve.testing import tiny_model_cached
from helpers.interpreter import is_interpreted
from helpers.lora import ALL_MODULES, build_peft_adapter

ARCH = "llama"
_INTERPRETED = is_interpreted(lora_kernels._lora_shrink_kernel)


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    base = tiny_model_cached(ARCH)
    root = tmp_path_factory.mktemp("peft")
    targets = [list(ALL_MODULES), ["q_proj", "v_proj"], ["down_proj"], ["o_proj", "gate_proj"]]
    return [build_peft_adapter(base, root / f"a{i}", seed=i, r=4 * (i + 1), lora_alpha=8, target_modules=t)
            for i, t in enumerate(targets)]


def manager(max_loras: int = 2, max_cpu_loras: int = 2) -> MultiLoRAManager:
    arch = ArchConfig.from_dir(tiny_model_cached(ARCH))
    config = LoRAConfig(enable_lora=True, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=16)
    return MultiLoRAManager(arch, config, torch.float32, torch.device("cpu"))


def assert_slot_holds(m: MultiLoRAManager, slot: int, path: Path) -> None:
    adapter = load_lora_adapter(path, m.arch, max_lora_rank=m.max_rank, adapter_id=0)
    for layer in range(m.arch.num_layers):
        for fused in FUSED_PROJECTIONS:
            want = adapter.slot_weights(layer, fused, m.max_rank, torch.float32)
            stack = m.stack(layer, fused)
            assert torch.equal(stack.ranks[slot], want.ranks)
            if int(want.ranks.sum()):
                assert torch.equal(stack.lora_a[slot], want.lora_a) and torch.equal(stack.lora_b[slot], want.lora_b)
                assert torch.equal(stack.scaling[slot], want.scaling)


def test_slots_hold_the_adapter_and_are_reused_lru(peft_dirs: list[Path]) -> None:
    m = manager(max_loras=2, max_cpu_loras=4)
    for i, path in enumerate(peft_dirs):
        m.load(f"a{i}", str(path))
    keys = [m.key_of(f"a{i}") for i in range(4)]
    assert m.names() == ["a0", "a1", "a2", "a3"] and len(set(keys)) == 4
    assert m.activate([keys[0], None, keys[1], keys[0]]) == [0, -1, 1, 0]
    assert_slot_holds(m, 0, peft_dirs[0])
    assert_slot_holds(m, 1, peft_dirs[1])
    m.activate([keys[1]])                        # a1 most recent: a0's slot is the LRU one
    assert m.activate([keys[2], keys[1]]) == [0, 1]
    assert_slot_holds(m, 0, peft_dirs[2])        # an MLP-only adapter over an all-module one: no stale ranks
    assert m.resident_keys() == [keys[2], keys[1]]
    assert m.activate([keys[3], keys[2]]) == [1, 0]  # the slot this step uses (a2's) is never the victim
    with pytest.raises(LoRASlotsExhaustedError, match="3 adapters but there are only 2 LoRA slots"):
        m.activate(keys[:3])
    assert m.num_slot_loads == 4 and m.num_disk_reads == 4


def test_cpu_tier_evicts_lru_and_reads_again(peft_dirs: list[Path]) -> None:
    m = manager(max_loras=1, max_cpu_loras=2)
    for i, path in enumerate(peft_dirs[:3]):
        m.load(f"a{i}", str(path))
    assert m.num_disk_reads == 3  # a0 was dropped from the tier when a2 came in
    slot = m.activate([m.key_of("a0")])[0]
    assert m.num_disk_reads == 4
    assert_slot_holds(m, slot, peft_dirs[0])
    m.activate([m.key_of("a2")])  # still in the tier: no read
    assert m.num_disk_reads == 4


def test_replaced_weights_leave_the_cpu_tier(peft_dirs: list[Path]) -> None:
    """Replacing a name's weights (load again under it, nobody using the old ones) drops the old
    weights from the CPU tier, as an unload does: stale generations must not push adapters that are
    still served out of the tier (they would be read from disk again, and fail if their directory has
    changed since their load)."""
    m = manager(max_loras=1, max_cpu_loras=2)
    m.load("x", str(peft_dirs[0]))
    m.load("y", str(peft_dirs[1]))
    for path in peft_dirs[2:]:
        m.load("x", str(path))  # two replacements
    assert m.num_disk_reads == 4
    m.activate([m.key_of("y")])
    m.activate([m.key_of("x")])
    assert m.num_disk_reads == 4  # both still in the tier


def test_reload_unload_and_refusals(peft_dirs: list[Path], tmp_path: Path) -> None:
    m = manager()
    m.load("x", str(peft_dirs[0]))
    first = m.key_of("x")
    m.activate([first])
    m.load("x", str(peft_dirs[1]))
    second = m.key_of("x")
    assert first is not None and second == LoRAKey(first.adapter_id, first.generation + 1)
    assert m.activate([second]) == [1]  # a new key: loaded into another slot, the old one stays until reused
    assert_slot_holds(m, 1, peft_dirs[1])
    assert m.activate([first]) == [0]  # a request that started on the old weights still gets them
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        m.load("y", str(tmp_path / "nothing"))
    with pytest.raises(LoRAAdapterError, match="non-empty name"):
        m.load("", str(peft_dirs[0]))
    assert m.names() == ["x"]
    m.unload("x")
    assert m.names() == [] and m.key_of("x") is None
    with pytest.raises(KeyError):
        m.unload("x")
    # Loaded again: a fresh id (the counter never repeats), so no page of the earlier weights can match; and
    # names unloaded leave no record behind (one per name ever loaded grew without bound).
    m.load("x", str(peft_dirs[0]))
    third = m.key_of("x")
    assert third is not None and third.adapter_id not in (first.adapter_id,)
    for i in range(20):
        m.load(f"job-{i}", str(peft_dirs[1]))
        m.unload(f"job-{i}")
    assert len(m.keys._keys) == 1  # "x" alone


def test_cli_lora_flags() -> None:
    args = build_parser().parse_args([
        "serve", "--model", "m", "--enable-lora", "--lora-modules", "a=/p/a", '{"name": "b", "path": "/p/b"}',
        "--max-loras", "8", "--max-lora-rank", "16", "--max-cpu-loras", "64"])
    lora = engine_config_from_args(args).lora
    assert lora.enable_lora and (lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras) == (8, 16, 64)
    assert lora.lora_modules == {"a": "/p/a", "b": "/p/b"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--lora-modules", "no-equals-sign"])
    with pytest.raises(ValueError, match="lora_modules needs enable_lora"):
        engine_config_from_args(build_parser().parse_args(["serve", "--model", "m", "--lora-modules", "a=/p"]))


def test_kernels_read_the_slot_major_stacks(peft_dirs: list[Path]) -> None:
    """A layer's stack is a strided view ([slot, layer, ...] storage): the reference and the Triton
    kernels (interpreted on the CPU) both give x A^T B^T scale per token's slot on it."""
    m = manager(max_loras=3, max_cpu_loras=4)
    for i, path in enumerate(peft_dirs[:3]):
        m.load(f"a{i}", str(path))
    slots = m.activate([m.key_of(f"a{i}") for i in range(3)])
    torch.manual_seed(0)
    for fused in m.projections:
        stack = m.stack(1, fused)
        assert not stack.lora_a.is_contiguous()  # the case under test
        token_slots = torch.tensor([slots[2], -1, slots[0], slots[1], slots[0], -1], dtype=torch.int32)
        x = torch.randn(len(token_slots), stack.lora_a.shape[-1])
        y = torch.randn(len(token_slots), stack.lora_b.shape[-1])
        expected = y.clone()
        for t, slot in enumerate(token_slots.tolist()):
            if slot < 0:
                continue
            col = 0
            for s, n in enumerate(stack.slice_sizes):
                r = int(stack.ranks[slot, s])
                if r:
                    h = x[t] @ stack.lora_a[slot, s, :r].T
                    expected[t, col:col + n] += float(stack.scaling[slot, s]) * (h @ stack.lora_b[slot, :r, col:col + n])
                col += n
        meta = lora_kernels.build_lora_batch_meta(token_slots, m.max_loras)
        y_ref = y.clone()
        lora_kernels.add_lora(y_ref, x, stack.lora_a, stack.lora_b, stack.ranks, stack.scaling, meta,
                              stack.slice_sizes, stack.slice_starts)
        torch.testing.assert_close(y_ref, expected, atol=1e-4, rtol=1e-4)
        if _INTERPRETED:
            y_kernel = y.clone()
            shrunk = lora_kernels.lora_shrink(x, stack.lora_a, stack.ranks, meta)
            lora_kernels.lora_expand(y_kernel, shrunk, stack.lora_b, stack.ranks, stack.scaling, meta, stack.slice_starts)
            torch.testing.assert_close(y_kernel, expected, atol=1e-4, rtol=1e-4)


def test_target_modules_limit_slots_and_adapters(peft_dirs: list[Path]) -> None:
    arch = ArchConfig.from_dir(tiny_model_cached(ARCH))
    config = LoRAConfig(enable_lora=True, max_loras=1, max_lora_rank=16, lora_target_modules=["q_proj", "v_proj"])
    m = MultiLoRAManager(arch, config, torch.float32, torch.device("cpu"))
    assert m.projections == ("qkv_proj",)  # o, gate_up and down hold no slots and run no LoRA kernels
    m.load("qv", str(peft_dirs[1]))
    with pytest.raises(LoRAAdapterError, match=r"targets .*down_proj.*outside the modules"):
        m.load("all", str(peft_dirs[0]))
    assert m.names() == ["qv"]
    with pytest.raises(ValueError, match="lora_target_modules"):
        LoRAConfig(enable_lora=True, lora_target_modules=["embed_tokens"])


def test_warmup_walks_each_kernel_variant_once() -> None:
    """The variants the warm-up launches are exactly the (BLOCK_M, SPLIT_K, expand BLOCK_N) triples the
    kernels pick over 1..budget tokens (8B shapes, one layer); on the CPU nothing is launched (no compile)."""
    from agentserve.lora import warmup
    from agentserve.testing.tiny import NAMED_SHAPES

    arch = ArchConfig.from_dict({**NAMED_SHAPES["llama-3.1-8b"], "num_hidden_layers": 1})
    config = LoRAConfig(enable_lora=True, max_loras=64, max_lora_rank=16, lora_target_modules=["q_proj", "v_proj"])
    m = MultiLoRAManager(arch, config, torch.bfloat16, torch.device("cpu"))
    variants = {warmup._variant(m, "qkv_proj", n, 132) for n in range(1, 8193)}
    for n in (1, 7, 100, 600, 8192):
        meta = lora_kernels.build_lora_batch_meta(torch.full((n,), -1, dtype=torch.int32), 64)
        picked = lora_kernels.lora_kernel_config(meta, 4096, 3, 132)
        assert (meta.block_m, picked.split_k, lora_kernels.expand_block_n(meta, 6144, 132)) in variants
    assert {bm for bm, _, _ in variants} == {16, 64} and len(variants) < 16
    assert warmup.warmup_lora_kernels(m, 64) == 0
