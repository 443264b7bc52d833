"""FP8 against bf16 on one GPU, in one run (issue #15):

- part "weights": the same dummy model built twice, bf16 weights then FP8 weights (quantized at
  load, per output channel): one stream (128-token prompt, 256 new tokens), TTFT of an 8,192-token
  prompt, and the 1,024-request throughput (prompts uniform 64-512, 256 output tokens, ignore_eos),
  as benchmarks/fastpath.py measures them; ratios FP8 / bf16 (targets: one stream >= 1.7x,
  throughput >= 1.3x) and the KV pool each engine gets at the same gpu_memory_utilization;
- part "gemv": the batch-1 projections of Llama-3.1-8B alone, bf16 GEMV vs FP8 GEMV (and the
  W8A8 path at M = 1 for reference): microseconds and weight bandwidth per shape (CUDA only);
- part "agent-loop": the sessions agent loop (benchmarks/agent_loop.py) with a bf16 KV cache and
  with an FP8 one in the same bytes (twice the pages): resident KV tokens, swaps, p50/p95 loop
  latency.

  python benchmarks/fp8.py                                   (both parts, dummy Llama-3.1-8B, bf16)
  python benchmarks/fp8.py --parts weights [--num-requests 1024]
  python benchmarks/fp8.py --smoke                           (CPU: tiny model, tiny workloads)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import agent_loop  # noqa: E402
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from graph_timer import GEMV_WORKING_SET, time_us  # noqa: E402
from latency import single_stream, ttft  # noqa: E402
from throughput import add_dummy_model_args, add_workload_args, make_prompts, run_ours  # noqa: E402

from agentserve.cache.kv_cache import bytes_per_block, kv_cache_torch_dtype  # noqa: E402
from agentserve.llm import LLM  # noqa: E402

TARGET_ONE_STREAM = 1.7   # the byte limit is 2x (half the weight bytes per decode step)
TARGET_THROUGHPUT = 1.3
PARTS = ("weights", "gemv", "agent-loop")
# Llama-3.1-8B: K -> N (qkv, o, gate_up, down, lm_head)
GEMV_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
# FP8 GEMV tiles tried besides the heuristic (fp8_gemv_config): rows x K / warps.
FP8_GEMV_SWEEP = [(4, 4096, 8), (8, 2048, 8), (4, 2048, 4), (16, 512, 8), (8, 1024, 4), (16, 1024, 8),
                  (32, 512, 8), (8, 512, 4), (16, 256, 4)]
# bf16 GEMV tiles tried besides its heuristic (gemv_config, tuned on the H100 with eager timing).
BF16_GEMV_SWEEP = [(4, 2048, 8), (2, 2048, 4), (8, 1024, 8), (8, 1024, 4), (4, 1024, 4), (16, 512, 8),
                   (8, 512, 4), (2, 4096, 8)]


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dummy_model_args(ap)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    add_workload_args(ap)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--stream-new-tokens", type=int, default=256)
    ap.add_argument("--ttft-prompt-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--agents", type=int, default=48)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--pool-pages", type=int, default=None,
                    help="bf16 KV pages of the agent loop (FP8 gets the same bytes: twice the pages); default: a "
                         "quarter of the agents' final conversations")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: a tiny float32 model, small workloads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.model, args.load_format, args.dtype = str(tiny_model_cached("qwen2", max_position_embeddings=32768)), \
            "auto", "float32"
        args.num_requests, args.min_prompt, args.max_prompt, args.output_len = 6, 16, 40, 6
        args.max_num_seqs, args.stream_prompt_len, args.stream_new_tokens = 8, 16, 8
        args.ttft_prompt_len, args.repeats, args.agents, args.turns = 96, 1, 3, 3
    return args


def _release(llm: LLM) -> None:
    llm.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_weights(args: argparse.Namespace, quantization: Optional[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format, quantization=quantization,
              max_model_len=max(args.ttft_prompt_len, args.max_prompt + args.output_len,
                                args.stream_prompt_len + args.stream_new_tokens) + 16,
              max_num_batched_tokens=max(args.ttft_prompt_len, 2048), max_num_seqs=args.max_num_seqs)
    load_s = time.perf_counter() - t0
    try:
        engine = llm.engine
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
        prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, engine.arch.vocab_size, 0)
        result = {"quantization": quantization or "none", "load_s": load_s, "weight_bytes": weight_bytes,
                  "kv_pool_tokens": engine.pool.num_blocks * engine.pool.block_size,
                  "throughput": run_ours(llm, prompts, args.output_len),
                  "single_stream": single_stream(llm, args.stream_prompt_len, args.stream_new_tokens, args.repeats),
                  "ttft": ttft(llm, args.ttft_prompt_len, args.repeats)}
    finally:
        _release(llm)
    print(f"  {result['quantization']}: one stream {result['single_stream']['decode_tok_s']:.1f} tok/s, TTFT "
          f"{result['ttft']['ttft_ms']:.1f} ms, throughput {result['throughput']['output_tok_s']:.0f} tok/s "
          f"(built in {load_s:.0f} s)", flush=True)
    return result


def part_weights(args: argparse.Namespace) -> dict[str, Any]:
    bf16, fp8 = measure_weights(args, None), measure_weights(args, "fp8")
    ratios = {"single_stream": fp8["single_stream"]["decode_tok_s"] / bf16["single_stream"]["decode_tok_s"],
              "ttft": bf16["ttft"]["ttft_ms"] / fp8["ttft"]["ttft_ms"],
              "throughput": fp8["throughput"]["output_tok_s"] / bf16["throughput"]["output_tok_s"],
              "kv_pool_tokens": fp8["kv_pool_tokens"] / bf16["kv_pool_tokens"],
              "weight_bytes": bf16["weight_bytes"] / fp8["weight_bytes"]}
    return {"bf16": bf16, "fp8": fp8, "ratios": ratios,
            "targets_met": {"single_stream": ratios["single_stream"] >= TARGET_ONE_STREAM,
                            "throughput": ratios["throughput"] >= TARGET_THROUGHPUT}}


def _sweep(fn: Any, arg_sets: list[tuple[Any, ...]], tiles: list[tuple[int, int, int]], k: int) -> dict[str, float]:
    """Device us per call of fn with each fma tile (rows x K / warps) whose K divides the input's."""
    from agentserve.kernels import gemv

    timed = {}
    for rows_n, block_k, warps in tiles:
        if k % block_k == 0:
            cfg = gemv.GemvConfig("fma", rows_n, block_k, num_warps=warps, num_stages=1)
            timed[f"{rows_n}x{block_k}/{warps}w"] = time_us(fn, arg_sets, config=cfg)
    return timed


def part_gemv(args: argparse.Namespace) -> dict[str, Any]:
    """Per 8B projection at M = 1: bf16 GEMV (kernels.gemv) vs FP8 GEMV vs W8A8 _scaled_mm."""
    from agentserve.kernels import fp8_linear, gemv

    if not torch.cuda.is_available():
        return {"skipped": "needs CUDA"}
    rows = []
    for k, n in GEMV_SHAPES:
        copies = max(2, -(-GEMV_WORKING_SET // (n * k)))  # fp8 bytes; the bf16 copies are twice that
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
        quantized = [fp8_linear.quantize_weight_per_channel(w) for w in weights]
        bf16_sets = [(x, w) for w in weights]
        bf16_us = time_us(gemv.gemv_triton, bf16_sets)
        bf16_sweep = _sweep(gemv.gemv_triton, bf16_sets, BF16_GEMV_SWEEP, k)
        del weights, bf16_sets
        fp8_sets = [(x, wq, ws) for wq, ws in quantized]
        fp8_us = time_us(fp8_linear.fp8_gemv_triton, fp8_sets)
        mm_us = time_us(fp8_linear.fp8_scaled_mm, fp8_sets)
        sweep = _sweep(fp8_linear.fp8_gemv_triton, fp8_sets, FP8_GEMV_SWEEP, k)
        best = min(sweep, key=sweep.__getitem__) if sweep else None
        bf16_best = min(bf16_sweep, key=bf16_sweep.__getitem__) if bf16_sweep else None
        rows.append({"k": k, "n": n, "bf16_us": bf16_us, "fp8_us": fp8_us, "scaled_mm_us": mm_us,
                     "bf16_tb_s": 2 * n * k / bf16_us / 1e6, "fp8_tb_s": n * k / fp8_us / 1e6,
                     "speedup": bf16_us / fp8_us, "fp8_sweep_us": sweep, "fp8_best": best,
                     "bf16_sweep_us": bf16_sweep, "bf16_best": bf16_best})
        print(f"  {k}x{n}: bf16 {bf16_us:.1f} us ({2 * n * k / bf16_us / 1e6:.2f} TB/s), fp8 {fp8_us:.1f} us "
              f"({n * k / fp8_us / 1e6:.2f} TB/s, {bf16_us / fp8_us:.2f}x), scaled_mm {mm_us:.1f} us; "
              f"best fp8 tile {best} {sweep.get(best, float('nan')):.1f} us; "
              f"best bf16 tile {bf16_best} {bf16_sweep.get(bf16_best, float('nan')):.1f} us", flush=True)
    return {"rows": rows}


def part_agent_loop(args: argparse.Namespace) -> dict[str, Any]:
    """The sessions loop with bf16 pages, then with fp8 pages in the same bytes."""
    common = ["--model", args.model, "--load-format", args.load_format, "--dtype", args.dtype, "--agents",
              str(args.agents), "--turns", str(args.turns), "--modes", "sessions"]
    if args.device:
        common += ["--device", args.device]
    if args.smoke:
        common += ["--preamble-tokens", "64", "--tool-tokens", "16,48", "--decision-tokens", "4,8",
                   "--tool-latency-ms", "20", "--max-num-batched-tokens", "512"]
    probe = agent_loop.build_args(common)
    w = agent_loop.Workload(probe, 1 << 15)
    total = sum(w.final_tokens(a) for a in range(args.agents))
    bf16_pages = args.pool_pages or max(-(-agent_loop.max_final_tokens(probe) // 16) + 8, total // 4 // 16)
    model_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype, torch.float32)
    ratio = bytes_per_block(1, 16, 1, 128, model_dtype) // bytes_per_block(1, 16, 1, 128, kv_cache_torch_dtype(
        "fp8", model_dtype))
    runs = {}
    for kv, pages in (("auto", bf16_pages), ("fp8", bf16_pages * ratio)):
        run_args = agent_loop.build_args(common + ["--num-blocks", str(pages), "--kv-cache-dtype", kv])
        report = asyncio.run(agent_loop.main_async(run_args))
        s = report["modes"]["sessions"]
        runs["bf16" if kv == "auto" else "fp8"] = {
            "kv_pool_tokens": report["kv_pool_tokens"], "final_conversation_tokens": report["final_conversation_tokens"],
            "loop_latency_ms": s["loop_latency_ms"], "swap_outs": s["swap_outs"], "swap_ins": s["swap_ins"],
            "drops": s["drops"], "prefilled_per_loop": s["prefilled_per_loop"], "gen_tok_s": s["gen_tok_s"]}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"kv_bytes_ratio": ratio, **runs,
            "p95_ratio_bf16_over_fp8": runs["bf16"]["loop_latency_ms"]["p95"] / max(
                runs["fp8"]["loop_latency_ms"]["p95"], 1e-9)}


def print_report(result: dict[str, Any]) -> None:
    if "weights" in result:
        wr = result["weights"]
        b, f, r = wr["bf16"], wr["fp8"], wr["ratios"]
        print(f"{'figure':42} {'bf16':>10} {'fp8':>10} {'fp8/bf16':>9}  target")
        rows = [("one stream, tok/s", b["single_stream"]["decode_tok_s"], f["single_stream"]["decode_tok_s"],
                 r["single_stream"], f">= {TARGET_ONE_STREAM}"),
                ("TTFT 8k, ms (ratio bf16/fp8)", b["ttft"]["ttft_ms"], f["ttft"]["ttft_ms"], r["ttft"], ""),
                ("throughput, output tok/s", b["throughput"]["output_tok_s"], f["throughput"]["output_tok_s"],
                 r["throughput"], f">= {TARGET_THROUGHPUT}"),
                ("KV pool tokens (same memory utilization)", b["kv_pool_tokens"], f["kv_pool_tokens"],
                 r["kv_pool_tokens"], ""),
                ("weight GB", b["weight_bytes"] / 1e9, f["weight_bytes"] / 1e9, 1 / r["weight_bytes"], "")]
        for name, x, y, ratio, target in rows:
            print(f"{name:42} {x:10.1f} {y:10.1f} {ratio:9.2f}  {target}")
    if "agent_loop" in result:
        a = result["agent_loop"]
        print(f"agent loop, same KV bytes (fp8: {a['kv_bytes_ratio']}x the pages):")
        for name in ("bf16", "fp8"):
            x = a[name]
            print(f"  {name:5} pool {x['kv_pool_tokens']:>8} tokens of {x['final_conversation_tokens']}; loop p50/p95 "
                  f"{x['loop_latency_ms']['p50']:.0f}/{x['loop_latency_ms']['p95']:.0f} ms; swaps out/in/drops "
                  f"{x['swap_outs']}/{x['swap_ins']}/{x['drops']}; prefilled/loop {x['prefilled_per_loop']:.0f}")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; parts: {', '.join(PARTS)}")
    result: dict[str, Any] = {"benchmark": "fp8", "model": args.model, "device": device_name()}
    if "weights" in parts:
        print("FP8 weights vs bf16 ...", flush=True)
        result["weights"] = part_weights(args)
    if "gemv" in parts:
        print("batch-1 projections, bf16 GEMV vs FP8 GEMV ...", flush=True)
        result["gemv"] = part_gemv(args)
    if "agent-loop" in parts:
        print("agent loop, FP8 KV vs bf16 at the same memory ...", flush=True)
        result["agent_loop"] = part_agent_loop(args)
    print_report(result)
    write_json(result, args.out, "fp8")
    if args.record:
        parts_text = []
        if "weights" in result:
            r = result["weights"]["ratios"]
            f = result["weights"]["fp8"]
            parts_text.append(
                f"fp8 weights: one stream {f['single_stream']['decode_tok_s']:.1f} tok/s ({r['single_stream']:.2f}x "
                f"bf16), TTFT 8k {f['ttft']['ttft_ms']:.1f} ms ({r['ttft']:.2f}x), throughput "
                f"{f['throughput']['output_tok_s']:.0f} tok/s ({r['throughput']:.2f}x), KV pool {r['kv_pool_tokens']:.2f}x")
        if "agent_loop" in result:
            a = result["agent_loop"]
            parts_text.append(f"agent loop same bytes: p95 bf16 {a['bf16']['loop_latency_ms']['p95']:.0f} ms vs fp8 "
                              f"{a['fp8']['loop_latency_ms']['p95']:.0f} ms, swaps out {a['bf16']['swap_outs']} vs "
                              f"{a['fp8']['swap_outs']}")
        append_result("fp8", command_line("fp8.py", argv), "; ".join(parts_text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
