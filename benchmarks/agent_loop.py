"""Agent loops over the gRPC API: A agents x T turns, the same server, three ways of keeping context.

Each agent shares a preamble (system prompt + tool schemas, ~2k tokens) with the others, adds its own
task, then loops: the model decides (30-100 generated tokens), a tool runs (simulated latency) and
returns a result (200-2,000 tokens), the model decides again. Modes:
  sessions           one session per agent; each turn sends only the tool result (its KV stays
                     resident between turns, or goes to CPU swap under memory pressure)
  stateless-prefix   each turn re-sends the whole conversation (Generate); the prefix cache reuses
                     whatever pages of it are still cached
  stateless-nocache  the same with prefix caching off: every turn prefills the whole conversation
  responses          the OpenAI Responses API (/v1/responses), each turn continuing the previous
                     response with previous_response_id (on the session behind it); with this mode
                     the workload is chat text (sessions mode too): agent_loop_responses.py
The KV pool is sized (by default) to hold only a fraction of all conversations, as on a busy server.
Token ids are synthesized (a dummy model has no tokenizer), so every mode sends identical tokens.

  python benchmarks/agent_loop.py                                  # tiny qwen2 on CPU
  python benchmarks/agent_loop.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 \\
      --agents 64 --turns 8                                        # the H100 run
  python benchmarks/agent_loop.py --modes sessions,responses       # Responses API vs gRPC sessions
  agentserve tiny-model /tmp/tok --arch llama3 && python benchmarks/agent_loop.py --model llama-3.1-8b \
      --load-format dummy --dtype bfloat16 --tokenizer /tmp/tok --modes sessions,responses   # on the GPU
  (to stay under a time limit, run --modes sessions,stateless-prefix and --modes stateless-nocache
  separately and pass the first run's JSON to the second with --merge)

Prints a table (per-loop latency p50/p95, prefilled tokens per loop, throughput) and writes JSON to
--out (default $OUT/agent_loop.json when OUT is set). A "loop" is a turn after a tool result (turn
1..T-1); the first turn (preamble + task) is reported separately.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from agent_loop_responses import TextWorkload, run_text_mode, text_workload  # noqa: E402
from agent_loop_tail import describe as describe_tail, tail_breakdown  # noqa: E402
from device_op_timer import DeviceOpTimer  # noqa: E402
from step_timeline import StepTimeline, describe  # noqa: E402

MODES = ("sessions", "stateless-prefix", "stateless-nocache", "responses")


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    return int(lo), int(hi or lo)


def build_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or named shape (default: a tiny qwen2 on CPU)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory with a chat template, for the responses "
                    "mode's text workload when the model has none (a dummy shape): e.g. `agentserve tiny-model DIR "
                    "--arch llama3`")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--preamble-tokens", type=int, default=2048)
    ap.add_argument("--task-tokens", type=int, default=40)
    ap.add_argument("--tool-tokens", type=parse_range, default=(200, 2000), help="tool result length range LO,HI")
    ap.add_argument("--decision-tokens", type=parse_range, default=(30, 100), help="generated tokens range LO,HI")
    ap.add_argument("--tool-latency-ms", type=float, default=300.0, help="mean simulated tool time (uniform 0.5x-1.5x)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--pool-fraction", type=float, default=0.25,
                    help="KV pool size as a fraction of all agents' final conversations (ignored with --num-blocks)")
    ap.add_argument("--num-blocks", type=int, default=None)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--swap-space-gb", type=float, default=None, help="CPU swap for session pages (default: 32 "
                    "on CUDA, 4 on CPU)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", help="'auto' or 'fp8' (benchmarks/fp8.py compares them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", default=None, help="a previous run's JSON (same workload, other modes) to report "
                    "together with this one, e.g. stateless-nocache run separately")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true", help="append a line to benchmarks/RESULTS.md")
    return ap.parse_args(argv)


# --- workload ---------------------------------------------------------------------------------------
class Workload:
    """Deterministic per seed: the same token ids for every mode."""

    def __init__(self, args: argparse.Namespace, vocab: int) -> None:
        rng = random.Random(args.seed)
        lo_id, hi_id = (10, vocab - 10) if vocab < 2000 else (1000, min(vocab, 120000) - 10)

        def ids(n: int) -> list[int]:
            return [rng.randrange(lo_id, hi_id) for _ in range(n)]

        self.preamble = ids(args.preamble_tokens)
        self.tasks = [ids(args.task_tokens) for _ in range(args.agents)]
        self.decisions = [[rng.randint(*args.decision_tokens) for _ in range(args.turns)] for _ in range(args.agents)]
        self.results = [[ids(rng.randint(*args.tool_tokens)) for _ in range(args.turns - 1)] for _ in range(args.agents)]
        self.latency = [[args.tool_latency_ms * rng.uniform(0.5, 1.5) / 1e3 for _ in range(args.turns - 1)]
                        for _ in range(args.agents)]

    def final_tokens(self, agent: int) -> int:
        return (len(self.preamble) + len(self.tasks[agent]) + sum(self.decisions[agent])
                + sum(len(r) for r in self.results[agent]))


def max_final_tokens(args: argparse.Namespace) -> int:
    return (args.preamble_tokens + args.task_tokens + args.turns * args.decision_tokens[1]
            + (args.turns - 1) * args.tool_tokens[1])


# --- the three modes --------------------------------------------------------------------------------
async def run_agent_session(client: Any, w: Workload, a: int, turns: int, hint_ms: float, rec: list) -> None:
    session = await client.create_session(
        [{"role": "system", "token_ids": w.preamble}, {"role": "user", "token_ids": w.tasks[a]}], raw_tokens=True)
    try:
        for t in range(turns):
            new = [] if t == 0 else [{"role": "tool", "token_ids": w.results[a][t - 1]}]
            start = time.perf_counter()
            r = await session.run_turn(new, max_tokens=w.decisions[a][t], temperature=0.0, ignore_eos=True,
                                       expected_next_turn_ms=hint_ms if t < turns - 1 else 0.0)
            rec.append(_record(a, t, start, r.done.usage, r.done.timing))
            if t < turns - 1:
                await asyncio.sleep(w.latency[a][t])
    finally:
        await session.close()


async def run_agent_stateless(client: Any, w: Workload, a: int, turns: int, rec: list) -> None:
    history = w.preamble + w.tasks[a]
    for t in range(turns):
        if t > 0:
            history = history + w.results[a][t - 1]
        start = time.perf_counter()
        done = await client.generate_done(prompt_token_ids=history, max_tokens=w.decisions[a][t], temperature=0.0,
                                          ignore_eos=True)
        rec.append(_record(a, t, start, done.usage, done.timing))
        history = history + list(done.token_ids)
        if t < turns - 1:
            await asyncio.sleep(w.latency[a][t])


def _record(agent: int, turn: int, start: float, usage: Any, timing: Any) -> dict[str, Any]:
    return {"agent": agent, "turn": turn, "latency_ms": (time.perf_counter() - start) * 1e3,
            "prompt": usage.prompt_tokens, "cached": usage.cached_tokens, "prefilled": usage.prefilled_tokens,
            "generated": usage.completion_tokens, "swapped_in": usage.swapped_in_tokens, "ttft_ms": timing.ttft_ms,
            "queue_ms": timing.queue_ms, "decode_ms": timing.decode_ms, "swap_wait_ms": timing.swap_wait_ms}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(rec: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    loops = [r for r in rec if r["turn"] > 0]
    first = [r for r in rec if r["turn"] == 0]
    lat = [r["latency_ms"] for r in loops]
    gen = sum(r["generated"] for r in rec)
    return {
        "loops": len(loops), "wall_s": wall,
        "loop_latency_ms": {"p50": pct(lat, 0.5), "p95": pct(lat, 0.95), "mean": statistics.fmean(lat) if lat else 0},
        "loop_ttft_ms": {"p50": pct([r["ttft_ms"] for r in loops], 0.5), "p95": pct([r["ttft_ms"] for r in loops], 0.95)},
        "prefilled_per_loop": statistics.fmean(r["prefilled"] for r in loops) if loops else 0,
        "cached_per_loop": statistics.fmean(r["cached"] for r in loops) if loops else 0,
        "prompt_per_loop": statistics.fmean(r["prompt"] for r in loops) if loops else 0,
        "swapped_in_per_loop": statistics.fmean(r["swapped_in"] for r in loops) if loops else 0,
        "first_turn_latency_ms": {"p50": pct([r["latency_ms"] for r in first], 0.5),
                                  "p95": pct([r["latency_ms"] for r in first], 0.95)},
        "prefilled_total": sum(r["prefilled"] for r in rec), "generated_total": gen,
        "gen_tok_s": gen / wall if wall else 0, "loops_per_s": len(loops) / wall if wall else 0,
        "tail": tail_breakdown(loops),
    }


async def run_mode(mode: str, handle: Any, w: Workload, args: argparse.Namespace, timer: DeviceOpTimer,
                   timeline: StepTimeline, text: Optional[TextWorkload] = None) -> dict[str, Any]:
    from agentserve.adapters.client import AgentClient

    engine = handle.engine
    pool = engine.pool
    await handle.async_engine.run(lambda: pool.check_all_free())
    pool.enable_prefix_caching = mode != "stateless-nocache"
    assert pool.reset_prefix_cache()
    m0 = (engine.metrics.num_preemptions_total, pool.query_tokens, pool.hit_tokens)
    st = handle.store.stats
    counted = ("swap_outs", "swap_ins", "drops", "swap_in_failures", "queued_evicted", "pages_swapped_out",
               "pages_swap_reused", "swap_copies_released", "swap_in_finishes_forced")
    s0 = dataclasses.asdict(st)
    rec: list[dict[str, Any]] = []
    hint = args.tool_latency_ms * 1.5
    timer.take()  # what the warm-up and earlier modes moved
    timeline.take()
    start = time.perf_counter()
    if text is not None:
        await run_text_mode(mode, handle, text, args.agents, args.turns, hint, rec)
    else:
        async with AgentClient(handle.address) as client:
            if mode == "sessions":
                jobs = [run_agent_session(client, w, a, args.turns, hint, rec) for a in range(args.agents)]
            else:
                jobs = [run_agent_stateless(client, w, a, args.turns, rec) for a in range(args.agents)]
            await asyncio.gather(*jobs)
    wall = time.perf_counter() - start
    out = summarize(rec, wall)
    q, h = pool.query_tokens - m0[1], pool.hit_tokens - m0[2]
    out.update(preemptions=engine.metrics.num_preemptions_total - m0[0], prefix_hit_rate=h / q if q else 0.0,
               **{name: value - s0[name] for name, value in dataclasses.asdict(st).items() if name in counted})
    ops = timer.take()
    out.update(ops, device_ops_share_of_wall=ops["device_ops_gpu_ms"] / (wall * 1e3))
    out["timeline"] = timeline.take()
    pool.enable_prefix_caching = True
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from agentserve.config import EngineConfig
    from agentserve.engine.async_engine import AsyncEngine
    from agentserve.engine.engine import Engine
    from agentserve.engine.loading import resolve_model
    from agentserve.service.serve import running_server

    model = args.model
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2", max_position_embeddings=32768))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_len = -(-(max_final_tokens(args) + 64) // args.block_size) * args.block_size
    base = dict(load_format=args.load_format, dtype=args.dtype, device=device, max_model_len=max_len,
                tokenizer=args.tokenizer,
                block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs, attention_backend=args.attention_backend,
                kv_cache_dtype=args.kv_cache_dtype,
                swap_space_gb=args.swap_space_gb if args.swap_space_gb is not None else (32.0 if device == "cuda" else 4.0))
    arch, _ = resolve_model(EngineConfig.from_kwargs(model, **base))
    w = Workload(args, arch.vocab_size)
    total_final = sum(w.final_tokens(a) for a in range(args.agents))
    num_blocks = args.num_blocks or max(-(-max_len // args.block_size) + 8,
                                        int(total_final * args.pool_fraction / args.block_size))
    config = EngineConfig.from_kwargs(model, num_blocks=num_blocks, **base)
    t0 = time.perf_counter()
    engine = Engine(config)
    aeng = AsyncEngine(engine)
    load_s = time.perf_counter() - t0
    pool_tokens = engine.pool.num_blocks * engine.pool.block_size
    print(f"model {model} on {device_name() if device == 'cuda' else 'CPU'} (loaded in {load_s:.1f} s); "
          f"KV pool {engine.pool.num_blocks} pages = {pool_tokens} tokens for {args.agents} agents whose final "
          f"conversations total {total_final} tokens ({pool_tokens / total_final:.0%}); "
          f"swap {engine.runner.kv_cache.num_swap_blocks} pages; max_model_len {max_len}", flush=True)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"unknown mode {m!r}; modes: {', '.join(MODES)}")
    text = text_workload(modes, w, args.seed, engine.tokenizer)
    results: dict[str, Any] = {}
    timer, timeline = DeviceOpTimer(), StepTimeline()
    with contextlib.ExitStack() as installed:  # undone last to first: the timers, then the engine
        installed.callback(aeng.shutdown)
        installed.callback(timer.install())
        installed.callback(timeline.install())
        async with running_server(config, async_engine=aeng, http_port=0 if text is not None else None) as handle:
            from agentserve.adapters.client import AgentClient

            async with AgentClient(handle.address) as client:  # warm-up (kernels, graphs, both paths)
                for n in (32, 600):
                    await client.generate_done(prompt_token_ids=w.preamble[:n], max_tokens=4, ignore_eos=True)
                warm = await client.create_session([{"role": "user", "token_ids": w.tasks[0]}], raw_tokens=True)
                for _ in range(2):
                    await warm.run_turn([{"role": "tool", "token_ids": w.preamble[:300]}], max_tokens=8,
                                        ignore_eos=True)
                await warm.close()
            for mode in modes:
                print(f"running {mode} ...", flush=True)
                results[mode] = await run_mode(mode, handle, w, args, timer, timeline, text)
                r = results[mode]
                print(f"  {mode}: {r['wall_s']:.1f} s, loop p50 {r['loop_latency_ms']['p50']:.0f} ms, "
                      f"p95 {r['loop_latency_ms']['p95']:.0f} ms, prefilled/loop {r['prefilled_per_loop']:.0f}",
                      flush=True)
                print(f"  {mode} steps: {describe(r['timeline'])}", flush=True)
                print(f"  {mode} {describe_tail(r['tail'])}", flush=True)
    if args.merge:
        prev = json.loads(Path(args.merge).read_text())
        same = ("agents", "turns", "preamble_tokens", "task_tokens", "tool_tokens", "decision_tokens", "seed",
                "tool_latency_ms")
        diff = [k for k in same if prev["config"].get(k) != (list(getattr(args, k)) if isinstance(getattr(args, k), tuple)
                                                             else getattr(args, k))]
        if diff:
            raise SystemExit(f"--merge {args.merge}: a different workload ({', '.join(diff)})")
        if prev.get("kv_pool_tokens") != pool_tokens:
            print(f"note: merged run had a KV pool of {prev.get('kv_pool_tokens')} tokens, this one {pool_tokens}")
        for mode, r in prev["modes"].items():
            results.setdefault(mode, r)
    report: dict[str, Any] = {
        "benchmark": "agent_loop", "model": args.model or "tiny-qwen2", "device": device_name() if device == "cuda"
        else "CPU", "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "kv_pool_tokens": pool_tokens, "final_conversation_tokens": total_final,
        "swap_pages": engine.runner.kv_cache.num_swap_blocks, "modes": results}
    if "sessions" in results:
        s = results["sessions"]
        if "stateless-nocache" in results:
            report["prefill_reduction_vs_nocache"] = results["stateless-nocache"]["prefilled_per_loop"] / max(
                s["prefilled_per_loop"], 1e-9)
            report["prompt_reduction_vs_nocache"] = results["stateless-nocache"]["prompt_per_loop"] / max(
                s["prefilled_per_loop"], 1e-9)
        if "stateless-prefix" in results:
            report["p95_loop_latency_ratio_prefix_over_sessions"] = (
                results["stateless-prefix"]["loop_latency_ms"]["p95"] / max(s["loop_latency_ms"]["p95"], 1e-9))
        if "responses" in results:
            report["prefill_ratio_responses_over_sessions"] = (
                results["responses"]["prefilled_per_loop"] / max(s["prefilled_per_loop"], 1e-9))
    return report


def print_table(report: dict[str, Any]) -> None:
    rows = [("mode", "loops", "p50 ms", "p95 ms", "ttft p50", "prompt/loop", "prefill/loop", "cached/loop", "gen tok/s",
             "loops/s", "wall s", "preempt", "swap out/in/drop")]
    for mode, r in report["modes"].items():
        rows.append((mode, str(r["loops"]), f"{r['loop_latency_ms']['p50']:.0f}", f"{r['loop_latency_ms']['p95']:.0f}",
                     f"{r['loop_ttft_ms']['p50']:.0f}", f"{r['prompt_per_loop']:.0f}", f"{r['prefilled_per_loop']:.0f}",
                     f"{r['cached_per_loop']:.0f}",
                     f"{r['gen_tok_s']:.1f}", f"{r['loops_per_s']:.2f}", f"{r['wall_s']:.1f}", str(r["preemptions"]),
                     f"{r['swap_outs']}/{r['swap_ins']}/{r['drops']}" if mode == "sessions" else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.rjust(wd) for c, wd in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * wd for wd in widths))
    for mode, r in report["modes"].items():
        if r.get("device_ops_gpu_ms"):
            print(f"{mode}: page copies and swaps held the step's stream for {r['device_ops_gpu_ms']:.0f} ms of GPU "
                  f"({r['device_ops_share_of_wall']:.0%} of the wall; the host spent {r['device_ops_host_ms']:.0f} ms "
                  f"issuing them; pages {r['device_op_pages']}; GPU ms by kind "
                  f"{ {k: round(v) for k, v in r['device_op_gpu_ms_by_kind'].items()} }, host ms by kind "
                  f"{ {k: round(v) for k, v in r['device_op_host_ms_by_kind'].items()} }; {r['page_kernels']} page "
                  f"kernels; {r['staging_bound_waits']} waits at the staging bound, {r['staging_bound_wait_ms']:.0f} ms; "
                  f"swap-in pacing {r['swap_in_pacing']})")
    if "prefill_reduction_vs_nocache" in report:
        print(f"sessions prefill {report['prefill_reduction_vs_nocache']:.1f}x fewer tokens per loop than "
              f"stateless without prefix caching (target >= 5x); {report['prompt_reduction_vs_nocache']:.1f}x fewer "
              "than its prompt tokens, i.e. not counting its preemption recomputes")
    if "p95_loop_latency_ratio_prefix_over_sessions" in report:
        print(f"stateless+prefix-cache p95 loop latency is {report['p95_loop_latency_ratio_prefix_over_sessions']:.2f}x "
              "the sessions' (issue #16 target: >= 3x)")
    if "prefill_ratio_responses_over_sessions" in report:
        print(f"responses prefill per loop is {report['prefill_ratio_responses_over_sessions']:.3f}x the gRPC "
              "sessions' (target within 5%)")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_args(argv)
    report = asyncio.run(main_async(args))
    print_table(report)
    written = write_json(report, args.out, "agent_loop")
    if written is not None:
        print(f"wrote {written}")
    if args.record:
        m = report["modes"]
        parts = [f"{k}: loop p50/p95 {v['loop_latency_ms']['p50']:.0f}/{v['loop_latency_ms']['p95']:.0f} ms, "
                 f"prefill/loop {v['prefilled_per_loop']:.0f}, {v['gen_tok_s']:.0f} gen tok/s" for k, v in m.items()]
        extra = []
        if "prefill_reduction_vs_nocache" in report:
            extra.append(f"sessions prefill {report['prefill_reduction_vs_nocache']:.1f}x less than nocache "
                         f"({report['prompt_reduction_vs_nocache']:.1f}x less than its prompts)")
        if "p95_loop_latency_ratio_prefix_over_sessions" in report:
            extra.append(f"p95 prefix/sessions {report['p95_loop_latency_ratio_prefix_over_sessions']:.2f}x")
        if "prefill_ratio_responses_over_sessions" in report:
            extra.append(f"prefill/loop responses/sessions {report['prefill_ratio_responses_over_sessions']:.3f}x")
        pool = f"pool {report['kv_pool_tokens']} of {report['final_conversation_tokens']} tokens"
        append_result("agent_loop", command_line("agent_loop.py", argv),
                      "; ".join(parts + extra + [pool]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
