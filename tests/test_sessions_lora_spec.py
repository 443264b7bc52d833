"""Sessions combined with LoRA adapters (issue 13), speculative decoding (issue 12) and fp8 KV pages
(issue 15), on the tiny qwen2 (CPU, fp32, greedy). Every turn's tokens must equal a stateless
generate over the turn's whole prompt on a separate engine of the same config (same adapter, same
speculation, same KV dtype) — across swap out / in, eviction and recompute, forks (copy-on-write),
stop strings inside accepted draft runs, grammars under speculation, and sessions on more adapters
than there are LoRA slots. Failures (bad parameters, bad schemas, an adapter whose weights are gone,
a close mid-turn) fail the turn alone with a clear error and leave the session's pages as they were.
After each scenario every page and swap slot is free and no adapter is left in use.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import grpc
import pytest

from agentserve.engine.async_engine import AsyncEngine
from agentserve.engine.engine import Engine
from agentserve.errors import InvalidRequestError
from agentserve.llm import LLM
from agentserve.sampling_params import SamplingParams
from agentserve.sessions.store import SessionStore
from agentserve.sessions.types import SessionState, TurnCancelledError
from agentserve.testing import tiny_model_cached
from conftest_grpc import TOOLS, make_config, model_path, rpc_status, run, run_and_shutdown, serving, swap_gb_for
from helpers.lora import ALL_MODULES, build_peft_adapter
from helpers.session_turns import Turn, assert_clean, assert_exact, evict, run_turn

SYSTEM = {"role": "system", "content": "You are a careful agent. Answer briefly."}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
SPEC: dict[str, dict[str, Any]] = {
    "ngram": dict(speculative_method="ngram", spec_dynamic=False, num_speculative_tokens=4, prompt_lookup_min=1,
                  prompt_lookup_max=3),
    # The target as its own draft: every proposal must be accepted.
    "self_draft": dict(draft_model=model_path(), spec_dynamic=False, num_speculative_tokens=4),
}
SCHEMA = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "required": ["x", "y"]}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tiny_model_cached("qwen2")
    root = tmp_path_factory.mktemp("session-adapters")
    # scale: adapters whose effect on greedy tokens is certain (a mix-up of adapters shows in the tokens)
    return {name: str(build_peft_adapter(base, root / name, seed=20 + i, r=8, lora_alpha=16,
                                         target_modules=list(ALL_MODULES), scale=4.0))
            for i, name in enumerate("abc")}


def engine_pair(num_blocks: int, swap_slots: float, **config: Any) -> tuple[AsyncEngine, LLM]:
    """The engine under test (a small pool, so pages move) and a stateless reference of the same config."""
    aeng = AsyncEngine(Engine(make_config(num_blocks=num_blocks, swap_space_gb=swap_gb_for("qwen2", swap_slots),
                                          **config)))
    reference = LLM(model_path(), device="cpu", dtype="float32", num_blocks=2048, **config)
    return aeng, reference


async def evict_resident(store: SessionStore, session_id: str) -> SessionState:
    """Evicts the session if it is resident (pressure may have moved it out already)."""
    info = await store.get(session_id)
    if info.state is not SessionState.RESIDENT:
        return info.state
    return await evict(store, session_id)


def no_adapter_in_use(aeng: AsyncEngine) -> None:
    assert aeng.engine.lora.adapters_in_use() == ([], [])
    assert not aeng.engine.scheduler.running and not aeng.engine.scheduler.waiting


# --- LoRA -------------------------------------------------------------------------------------------
def test_adapter_sessions_interleaved_swapped_evicted_and_forked_stay_exact(adapters: dict[str, str]) -> None:
    # Four adapters' worth of sessions (a twice, b, c and the base) on one LoRA slot, a pool of 40
    # pages and swap for 6: turns interleave and run concurrently, pages swap out and back, are
    # dropped and recomputed, and a fork keeps its parent's adapter.
    aeng, reference = engine_pair(40, 6, max_model_len=512, enable_lora=True, max_loras=1, max_lora_rank=8,
                                   lora_modules=adapters)

    async def body() -> None:
        store = SessionStore(aeng)
        names: list[Optional[str]] = ["a", "b", None, "c", "a"]
        sids = [(await store.create([SYSTEM], adapter=n)).session_id for n in names]
        turns: list[Turn] = []
        for r in range(3):
            for i, sid in enumerate(sids):
                turns.append(await run_turn(store, sid, f"Agent {i}, round {r}: what next?" + " more" * 8 * r, GREEDY))
            for sid in sids[r % 2::2]:
                await evict_resident(store, sid)
        # All at once: the scheduler keeps one adapter per step and reclaims queued sessions' pages.
        aeng.call_soon(lambda: time.sleep(0.3))  # every turn reserves its session before the first is admitted
        turns += await asyncio.gather(*(run_turn(store, sid, f"Agent {i}: all together now.", GREEDY)
                                        for i, sid in enumerate(sids)))
        assert await evict_resident(store, sids[0]) in (SessionState.SWAPPED, SessionState.EVICTED)
        child = (await store.fork(sids[0])).session_id
        assert (await store.get(child)).adapter == "a"
        turns.append(await run_turn(store, child, "The fork goes on.", GREEDY))
        turns.append(await run_turn(store, sids[0], "The parent goes on.", GREEDY))
        assert [t.adapter for t in turns[-2:]] == ["a", "a"]
        st = store.stats
        assert st.swap_outs >= 1 and st.swap_ins >= 1 and st.drops >= 1, st
        assert_exact(reference, turns)
        await assert_clean(store)
        no_adapter_in_use(aeng)

    run_and_shutdown(aeng, body(), timeout=120)


def test_drained_and_reloaded_adapter_keeps_sessions_on_their_own_weights(adapters: dict[str, str],
                                                                          tmp_path: Path) -> None:
    # A session bound to "d"; "d" is unloaded with drain and loaded again with other weights: the
    # session and its fork keep the old weights (and their KV), a new session gets the new ones and
    # never a page of the old. Then the old weights' directory goes away while no slot holds them:
    # the session's turn fails alone with a clear error and the session is left as it was.
    moved = tmp_path / "d"
    shutil.copytree(adapters["a"], moved)
    aeng, reference = engine_pair(64, 8, max_model_len=512, enable_lora=True, max_loras=1, max_lora_rank=8,
                                   lora_modules={"d": str(moved), "b": adapters["b"]}, **SPEC["ngram"])
    reference.load_adapter("a", adapters["a"])
    reference.load_adapter("c", adapters["c"])

    async def body() -> None:
        store = SessionStore(aeng)
        lora = aeng.engine.lora
        old = (await store.create([SYSTEM], adapter="d", tools=TOOLS)).session_id
        turns = [await run_turn(store, old, "Hello.", GREEDY)]
        await aeng.run(lambda: lora.unload("d", drain=True))
        await aeng.run(lambda: lora.load("d", adapters["c"], replace=False))
        fork = (await store.fork(old)).session_id
        turns.append(await run_turn(store, fork, "Forked after the reload.", GREEDY))
        turns.append(await run_turn(store, old, "Still here.", GREEDY))
        new = (await store.create([SYSTEM], adapter="d", tools=TOOLS)).session_id
        fresh = await run_turn(store, new, "Hello.", GREEDY)
        assert fresh.prompt == turns[0].prompt and fresh.result.usage.cached_tokens == 0  # no page of the old weights
        for t in turns:
            t.adapter = "a"  # the old "d" holds a's weights; the new one c's
        fresh.adapter = "c"
        assert_exact(reference, turns + [fresh])

        shutil.rmtree(moved)
        turns_b = [await run_turn(store, (await store.create([SYSTEM], adapter="b")).session_id, "Take the slot.",
                                  GREEDY)]
        before = await store.get(old)
        with pytest.raises(InvalidRequestError, match=r"failed reading LoRA adapter 'd' again .* does not exist"):
            await run_turn(store, old, "My weights are gone.", GREEDY)
        after = await store.get(old)
        assert (after.state, after.num_kv_tokens, after.num_pages, after.num_turns, after.busy) == (
            before.state, before.num_kv_tokens, before.num_pages, before.num_turns, False)
        assert_exact(reference, turns_b)
        await assert_clean(store)
        no_adapter_in_use(aeng)

    run_and_shutdown(aeng, body(), timeout=120)


# --- speculation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPEC)
def test_speculative_sessions_swap_fork_evict_stop_and_grammar_stay_exact(spec: str) -> None:
    aeng, reference = engine_pair(40, 12, max_model_len=512, **SPEC[spec])

    async def body() -> None:
        store = SessionStore(aeng)
        tools = (await store.create([SYSTEM], tools=TOOLS)).session_id
        plain = (await store.create([SYSTEM])).session_id
        turns = [await run_turn(store, tools, "Hello, weather in Paris?", GREEDY),
                 await run_turn(store, plain, "Say hello hello hello hello", GREEDY)]
        states = {await evict_resident(store, sid) for sid in (tools, plain)}
        assert states <= {SessionState.SWAPPED, SessionState.EVICTED}
        turns += [await run_turn(store, tools, "And in Rome?", GREEDY),  # the first turns after a swap in
                  await run_turn(store, plain, "Again", GREEDY)]
        child = (await store.fork(plain)).session_id
        full = await run_turn(store, child, "Forked child.", GREEDY)
        # The same turn on a second fork, stopped by a string inside the run the first one generated
        # (drafts proposed past it are dropped, and their KV with them).
        stop = store.tokenizer.decode(full.token_ids[3:5])
        stopper = (await store.fork(plain)).session_id
        stopped = await run_turn(store, stopper, "Forked child.", SamplingParams(temperature=0.0, max_tokens=8,
                                                                                  stop=[stop]))
        assert stopped.result.finish_reason == "stop" and len(stopped.token_ids) < len(full.token_ids)
        turns += [full, stopped, await run_turn(store, stopper, "After the stop.", GREEDY)]
        turns.append(await run_turn(store, plain, "Give JSON.", SamplingParams(temperature=0.0, max_tokens=20,
                                                                               json_schema=SCHEMA)))
        assert turns[-1].result.message["content"].startswith('{"x":')
        turns.append(await run_turn(store, tools, "Call a tool.", SamplingParams(
            temperature=0.0, max_tokens=30, tools=TOOLS, tool_choice="required")))
        assert turns[-1].result.message["tool_calls"][0]["function"]["name"] in ("get_weather", "read_file")
        await evict_resident(store, tools)
        turns.append(await run_turn(store, tools, "After the tool call.", GREEDY))
        assert store.stats.swap_ins >= 1
        assert_exact(reference, turns)
        await assert_clean(store)
        no_adapter_in_use(aeng)

    try:
        run(body())
        m = aeng.engine.metrics
        assert m.spec_num_draft_tokens > 0
        if spec == "self_draft":
            assert m.spec_num_accepted_tokens == m.spec_num_draft_tokens
    finally:
        aeng.shutdown()


# --- fp8 KV ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["plain", "self_draft"])
def test_fp8_session_swap_and_fork_match_fp8_stateless(spec: str) -> None:
    aeng, reference = engine_pair(40, 16, max_model_len=1024, kv_cache_dtype="fp8", **SPEC.get(spec, {}))
    pool = aeng.engine.pool

    async def body() -> None:
        store = SessionStore(aeng)
        sid = (await store.create([SYSTEM])).session_id
        turns = [await run_turn(store, sid, "First: " + "plan the step; " * 6, GREEDY)]
        assert await evict(store, sid) is SessionState.SWAPPED
        # A stateless request over every page: the session's freed pages are overwritten, so the
        # swap-in must bring its fp8 bits back from CPU.
        filler = [(7 * i) % 500 + 3 for i in range((pool.num_blocks - 1) * pool.block_size - 8)]
        async for _ in aeng.generate("filler", filler, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)):
            pass
        turns.append(await run_turn(store, sid, "Second.", GREEDY))
        assert store.stats.pages_swapped_in > 0 and turns[-1].result.usage.swapped_in_tokens > 0
        child = (await store.fork(sid)).session_id  # the shared partial last page is copied on write
        turns += [await run_turn(store, child, "Child.", GREEDY), await run_turn(store, sid, "Parent.", GREEDY)]
        assert_exact(reference, turns)
        await assert_clean(store)

    run_and_shutdown(aeng, body(), timeout=120)


# --- failures --------------------------------------------------------------------------------------
def test_bad_turns_fail_alone_and_close_mid_turn_over_grpc(adapters: dict[str, str]) -> None:
    # Over a real grpcio client: a session on adapter "a" with n-gram speculation. Turns with bad
    # parameters fail with INVALID_ARGUMENT and a readable message, leaving the session's pages as
    # they were; an unknown adapter is NOT_FOUND; closing the session mid-turn cancels the turn.
    aeng, reference = engine_pair(64, 8, max_model_len=512, enable_lora=True, max_loras=1, max_lora_rank=8,
                                   lora_modules={"a": adapters["a"]}, **SPEC["ngram"])

    async def body() -> None:
        async with serving(aeng) as (handle, client):
            code, msg = await rpc_status(client.create_session([SYSTEM], adapter="zzz"))
            assert code == grpc.StatusCode.NOT_FOUND and "'zzz' is not loaded" in msg
            session = await client.create_session([SYSTEM], adapter="a")
            user = [{"role": "user", "content": "Hello."}]
            first = await session.run_turn(user, temperature=0.0, max_tokens=8, return_token_ids=True)
            before = await session.refresh()
            bad: list[tuple[dict[str, Any], str]] = [
                (dict(max_tokens=600), "exceeds max_model_len (512)"),
                (dict(max_tokens=-3), "max_tokens"),
                (dict(max_tokens=8, response_format={"type": "json_schema", "json_schema": {
                    "type": "object", "properties": {"x": {"type": "nonsense"}}}}), "nonsense"),
                (dict(max_tokens=8, response_format={"type": "json_schema", "json_schema": "{not json"}),
                 "not valid JSON"),
            ]
            for kw, words in bad:
                code, msg = await rpc_status(session.run_turn(user, temperature=0.0, **kw))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and words in msg, (kw, code, msg)
                after = await session.refresh()
                assert (after.state, after.num_kv_tokens, after.num_pages, after.num_turns, after.busy) == (
                    before.state, before.num_kv_tokens, before.num_pages, before.num_turns, False)
            second = await session.run_turn([{"role": "user", "content": "Go on."}], temperature=0.0, max_tokens=8,
                                            return_token_ids=True)
            u = second.done.usage
            assert u.cached_tokens == before.num_kv_tokens  # the failed turns took no page
            child = await session.fork()
            assert child.info.adapter == "a"
            third = await child.run_turn([{"role": "user", "content": "Fork."}], temperature=0.0,
                                         response_format={"type": "json_schema", "json_schema": SCHEMA},
                                         max_tokens=20, return_token_ids=True)

            async def long_turn() -> None:
                await child.run_turn([{"role": "user", "content": "Long."}], temperature=0.0, max_tokens=150,
                                     ignore_eos=True)

            task = asyncio.ensure_future(long_turn())
            while not (await child.refresh()).busy:
                await asyncio.sleep(0.01)
            await child.close()
            code, msg = await rpc_status(task)
            assert code == grpc.StatusCode.CANCELLED and "closed" in msg
            await session.close()
            await aeng.run(lambda: aeng.engine.pool.check_all_free())
            no_adapter_in_use(aeng)
            for turn, params in ((first, GREEDY), (second, GREEDY),
                                 (third, SamplingParams(temperature=0.0, max_tokens=20, json_schema=SCHEMA))):
                out = reference.generate([list(turn.done.prompt_token_ids)], params, adapter="a")
                assert turn.token_ids == list(out[0].outputs[0].token_ids)

    run_and_shutdown(aeng, body(), timeout=120)


def test_close_mid_turn_on_the_store_rolls_back_and_frees_everything(adapters: dict[str, str]) -> None:
    aeng, _ = engine_pair(40, 8, max_model_len=512, enable_lora=True, max_loras=1, max_lora_rank=8,
                           lora_modules={"b": adapters["b"]}, **SPEC["self_draft"])

    async def body() -> None:
        store = SessionStore(aeng)
        sid = (await store.create([SYSTEM], adapter="b")).session_id
        await run_turn(store, sid, "Hello.", GREEDY)
        task = asyncio.ensure_future(run_turn(store, sid, "Long.", SamplingParams(temperature=0.0, max_tokens=150,
                                                                                  ignore_eos=True)))
        while not (await store.get(sid)).busy:
            await asyncio.sleep(0.01)
        await store.close(sid)
        with pytest.raises(TurnCancelledError, match="closed during the turn"):
            await task
        await assert_clean(store)
        no_adapter_in_use(aeng)

    run_and_shutdown(aeng, body(), timeout=120)
