"""Tensor parallelism on the CPU: two ranks over gloo (the engine's process and one spawned worker).

Greedy outputs at tensor_parallel_size=2 are the one-rank outputs on every tiny architecture, with
prefix caching, preemption, copy-on-write forks, sessions swapped out and back in, and speculation
(the draft replicated on rank 0); LoRA and FP8 are in test_tensor_parallel_lora_fp8.py. A model whose
heads do not divide is refused before any process starts; close(), a killed rank and a SIGTERM of
rank 0 leave no process behind."""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from agentserve import SamplingParams
from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.llm import LLM
from agentserve.cache.kv_cache import bytes_per_block
from agentserve.cli import add_engine_args, engine_config_from_args
from agentserve.model.arch_config import ArchConfig, ModelLoadError
from agentserve.parallel.shard import check_divisible
from agentserve.parallel import driver as driver_module
from agentserve.parallel.driver import TensorParallelDriver
from agentserve.parallel.rank import TensorParallelError
from agentserve.sessions.store import SessionStore
from agentserve.testing import ARCHS, tiny_model_cached
from conftest_grpc import SYSTEM, make_config, run, swap_gb_for

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PROMPTS: list[list[int]] = [[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11] * 6, [300, 301, 5] * 9 + [7]]
ENGINE: dict[str, Any] = dict(device="cpu", dtype="float32", num_blocks=64)


def greedy_tokens(path: str, prompts: list[list[int]], params: SamplingParams = GREEDY, **kw: Any
                  ) -> list[list[list[int]]]:
    with LLM(path, **{**ENGINE, **kw}) as llm:
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]


def driver_of(llm: LLM) -> TensorParallelDriver:
    parallel = llm.engine.runner.parallel
    assert isinstance(parallel, TensorParallelDriver)
    return parallel


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by a living parent) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


@pytest.mark.parametrize("arch", ARCHS)
def test_two_ranks_give_the_one_rank_greedy_tokens(arch: str) -> None:
    path = str(tiny_model_cached(arch))
    one = greedy_tokens(path, PROMPTS)
    with LLM(path, **ENGINE, tensor_parallel_size=2) as llm:
        two = [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY)]
        runner = llm.engine.runner
        # This rank holds half the KV heads and half of each projection.
        attn = runner.model.layers[0].self_attn
        assert runner.kv_heads_per_rank == attn.num_kv_heads == llm.engine.arch.num_kv_heads // 2
        assert attn.num_heads == llm.engine.arch.num_heads // 2
        workers = driver_of(llm).processes
        assert [p.is_alive() for p in workers] == [True]
    assert two == one
    assert [p.exitcode for p in workers] == [0]  # left on the shutdown message, not killed


def test_one_kv_head_is_replicated_on_both_ranks() -> None:
    """Fewer KV heads than ranks (MQA): each rank holds the one KV head and half the query heads."""
    path = str(tiny_model_cached("llama", num_heads=4, num_kv_heads=1))
    one = greedy_tokens(path, PROMPTS)
    with LLM(path, **ENGINE, tensor_parallel_size=2) as llm:
        two = [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY)]
        qkv = llm.engine.runner.model.layers[0].self_attn.qkv_proj
        assert (qkv.num_heads, qkv.num_kv_heads, qkv.num_kv_head_replicas) == (2, 1, 2)
    assert two == one


def test_kv_pool_is_sized_from_each_ranks_share_of_the_heads() -> None:
    """cpu_kv_cache_gb is per rank (like gpu_memory_utilization per GPU): a rank holding half the KV
    heads fits twice the pages of a one-rank engine."""
    path = str(tiny_model_cached("llama"))
    with LLM(path, device="cpu", dtype="float32", cpu_kv_cache_gb=0.002, tensor_parallel_size=2) as llm:
        a = llm.engine.arch
        per_rank = bytes_per_block(a.num_layers, 16, a.num_kv_heads // 2, a.head_dim, torch.float32)
        assert llm.engine.runner.num_blocks == llm.engine.pool.num_blocks == int(0.002 * 2**30 // per_rank)
        assert llm.engine.runner.kv_cache.layers[0][0].shape[2] == a.num_kv_heads // 2


@pytest.mark.parametrize("heads, kv_heads, size, ok", [(4, 2, 2, True), (4, 1, 2, True), (8, 2, 4, True),
                                                       (3, 3, 2, False), (4, 3, 2, False), (8, 3, 4, False)])
def test_divisibility_check(heads: int, kv_heads: int, size: int, ok: bool) -> None:
    arch = ArchConfig.from_dir(tiny_model_cached("llama"))
    arch.num_heads, arch.num_kv_heads = heads, kv_heads
    if ok:
        check_divisible(arch, size)
    else:
        with pytest.raises(ModelLoadError, match=f"tensor_parallel_size={size} does not divide"):
            check_divisible(arch, size)


def test_cli_flag_sets_the_tensor_parallel_size() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from_args(parser.parse_args(["--model", "m", "--tensor-parallel-size", "2"]))
    assert config.tensor_parallel_size == 2


def test_prefix_caching_preemption_and_forks_match_one_rank() -> None:
    """Few pages: requests are preempted and recomputed; shared prefixes hit the prefix cache; n=2
    forks copy their partial page (a CopyBlocks op that every rank runs)."""
    path = str(tiny_model_cached("llama"))
    shared = [11, 12, 13, 14, 15, 16, 17, 18] * 4
    prompts = [shared + [i, i + 1] for i in range(40, 46)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, n=2)
    kw: dict[str, Any] = dict(num_blocks=24, block_size=4, max_num_seqs=6, decode_reserve_tokens=0)
    one = greedy_tokens(path, prompts, params, **kw)
    with LLM(path, **{**ENGINE, **kw}, tensor_parallel_size=2) as llm:
        two = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
        metrics = llm.engine.metrics
        assert metrics.num_preemptions_total > 0
        assert metrics.prefix_cache_hits > 0
    assert two == one


def _session_tokens(**kw: Any) -> tuple[list[int], int]:
    """A session's tokens after a turn, an eviction (swap out) and a second turn (swap in)."""
    aeng = AsyncEngine(Engine(make_config("qwen2", num_blocks=64, swap_space_gb=swap_gb_for("qwen2", 16), **kw)))

    async def body() -> tuple[list[int], int]:
        store = SessionStore(aeng)
        try:
            sid = (await store.create([SYSTEM])).session_id
            params = SamplingParams(temperature=0.0, max_tokens=6)
            async for _ in store.turn(sid, [{"role": "user", "content": "Say something short."}], params):
                pass

            def evict() -> int:
                s = store.sessions[sid]
                store.residency.evict(s)
                return len(s.swap_slots)

            swapped = await aeng.run(evict)
            async for _ in store.turn(sid, [{"role": "user", "content": "And again."}], params):
                pass
            return list(store.sessions[sid].token_ids), swapped
        finally:
            await store.close_all()
            store.detach()

    try:
        return run(body())
    finally:
        aeng.shutdown()


def test_sessions_swapped_out_and_in_match_one_rank() -> None:
    one, swapped_one = _session_tokens()
    two, swapped_two = _session_tokens(tensor_parallel_size=2)
    assert swapped_one > 0 and swapped_two > 0
    assert two == one


@pytest.mark.parametrize("method", ["draft_model", "ngram"])
def test_speculation_with_the_draft_on_rank_zero_matches_one_rank(method: str) -> None:
    path = str(tiny_model_cached("llama"))
    kw: dict[str, Any] = (dict(draft_model=str(tiny_model_cached("llama", num_layers=1)))
                          if method == "draft_model" else dict(speculative_method="ngram"))
    one = greedy_tokens(path, PROMPTS)
    with LLM(path, **ENGINE, **kw, spec_dynamic=False, tensor_parallel_size=2) as llm:
        two = [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.engine.spec_proposer is not None
    assert two == one


def test_heads_that_do_not_divide_are_refused_before_any_process_starts() -> None:
    path = str(tiny_model_cached("llama", num_heads=3, num_kv_heads=3, hidden_size=48))
    before = set(multiprocessing.active_children())
    with pytest.raises(ModelLoadError, match=r"tensor_parallel_size=2 .*num_attention_heads=3.*num_key_value_heads=3"):
        LLM(path, **ENGINE, tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) == before


def test_a_killed_rank_fails_the_step_naming_it_and_close_leaves_no_process(caplog: pytest.LogCaptureFixture) -> None:
    llm = LLM(str(tiny_model_cached("llama")), **ENGINE, tensor_parallel_size=2)
    driver = driver_of(llm)
    worker = driver.processes[0]
    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    with caplog.at_level(logging.ERROR):
        out = llm.generate(PROMPTS[:1], GREEDY)[0]
    assert out.outputs[0].finish_reason == "error"
    assert "tensor-parallel rank 1 exited with status -9" in caplog.text
    with pytest.raises(TensorParallelError, match="rank 1"):
        driver.check_ranks()
    llm.close()
    assert wait_gone([worker.pid]) == []


_SIGTERM_SCRIPT = """
import os, signal, sys
from agentserve import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", dtype="float32", num_blocks=64, tensor_parallel_size=2)
llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
print(" ".join(str(p.pid) for p in llm.engine.runner.parallel.processes), flush=True)
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_of_rank_zero_leaves_no_worker_behind() -> None:
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_SCRIPT, str(tiny_model_cached("llama"))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 1
    assert wait_gone(pids) == []


def test_rank_zero_failing_mid_step_stops_the_ranks_and_close_terminates_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's forward fails after the step went out: the worker waits in a collective rank 0 will
    not reach, so the driver fails for good (no later step may run out of step) and close() ends it."""
    llm = LLM(str(tiny_model_cached("llama")), **ENGINE, tensor_parallel_size=2)
    driver = driver_of(llm)
    worker = driver.processes[0]

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("rank 0 layer failure")

    monkeypatch.setattr(llm.engine.runner.model.layers[1], "forward", broken)
    out = llm.generate(PROMPTS[:1], GREEDY)[0]
    assert out.outputs[0].finish_reason == "error"
    assert driver.failure is not None and "out of step" in str(driver.failure)
    start = time.monotonic()
    llm.close()
    assert time.monotonic() - start < 8.0
    assert worker.exitcode is not None and wait_gone([worker.pid or 0]) == []


def test_a_rank_failing_to_load_is_named_and_no_process_is_left(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """Rank 1 gets a directory without weights (rank 0 loads the real one): the engine does not
    start, and its error names rank 1 and the load error it reported."""
    real_args = driver_module.WorkerArgs

    def broken_dir(*args: Any) -> driver_module.WorkerArgs:
        worker_args = real_args(*args)
        worker_args.model_path = tmp_path
        return worker_args

    monkeypatch.setattr(driver_module, "WorkerArgs", broken_dir)
    before = set(multiprocessing.active_children())
    with pytest.raises(TensorParallelError, match=r"tensor-parallel rank 1 exited with status 1: ModelLoadError"):
        LLM(str(tiny_model_cached("llama")), **ENGINE, tensor_parallel_size=2)
    assert set(multiprocessing.active_children()) == before

