"""Tensor parallelism (issue #17) on a machine with two GPUs:
  - dummy Llama-3.1-8B (bf16) at tensor_parallel_size 1 and 2: one stream (128-token prompt, 256 new
    tokens, decode tok/s) and throughput (256 requests, prompts uniform 64-512, 256 output tokens);
  - dummy Llama-3.1-70B (bf16) at tensor_parallel_size 2: one stream, throughput, and the time to
    the first token of an 8k-token prompt.
Targets: 8B one stream at TP 2 >= 1.5x TP 1; 70B at TP 2 >= 50 tok/s one stream (its byte limit,
140 GB of weights over two H200s' ~4.8 TB/s each, is ~61 tok/s). Steps under TP run eagerly (no
CUDA graphs yet), so TP 1 is measured both with graphs (the default) and eager.

  python benchmarks/tp.py                        (2 GPUs)
  python benchmarks/tp.py --smoke --out x.json   (CPU: a tiny model, 2 ranks over gloo)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, write_json  # noqa: E402
from latency import single_stream, sync_device  # noqa: E402
from throughput import add_workload_args, make_prompts  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402

TARGET_8B_SPEEDUP = 1.5
TARGET_70B_TOK_S = 50.0


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small-model", default="llama-3.1-8b")
    ap.add_argument("--large-model", default="llama-3.1-70b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    add_workload_args(ap, num_requests=256)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--stream-new-tokens", type=int, default=256)
    ap.add_argument("--ttft-prompt-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="only the 8B comparison")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: a tiny float32 model, 2 ranks over gloo")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.small_model = args.large_model = str(tiny_model_cached("qwen2"))
        args.load_format, args.dtype, args.device = "auto", "float32", "cpu"
        args.num_requests, args.min_prompt, args.max_prompt, args.output_len = 6, 8, 24, 4
        args.stream_prompt_len, args.stream_new_tokens, args.ttft_prompt_len, args.repeats = 8, 6, 64, 1
    return args


def open_engine(args: argparse.Namespace, model: str, tp: int, enforce_eager: bool = False) -> LLM:
    max_len = max(args.max_prompt + args.output_len, args.stream_prompt_len + args.stream_new_tokens,
                  args.ttft_prompt_len + 8) + 16
    return LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format, max_model_len=max_len,
               max_num_batched_tokens=2048 if args.smoke else 8192, tensor_parallel_size=tp,
               enforce_eager=enforce_eager, **({"num_blocks": 256} if args.smoke else {}))


def throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:4], params.clone(max_tokens=2))  # warm-up
    sync_device()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    sync_device()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_s": out_tokens / elapsed,
            "requests": len(prompts)}


def ttft(llm: LLM, prompt_len: int, repeats: int) -> dict[str, Any]:
    """Seconds from submitting one prompt of `prompt_len` tokens to its first token (median)."""
    rng = np.random.default_rng(2)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        prompt = rng.integers(10, min(llm.engine.arch.vocab_size, 32000) - 10, size=prompt_len).tolist()
        sync_device()
        start = time.perf_counter()
        llm.generate([prompt], params)
        sync_device()
        if r > 0:
            times.append(time.perf_counter() - start)
    return {"ttft_s": statistics.median(times), "runs": times, "prompt_tokens": prompt_len}


def measure(args: argparse.Namespace, model: str, tp: int, with_ttft: bool, enforce_eager: bool = False
            ) -> dict[str, Any]:
    llm = open_engine(args, model, tp, enforce_eager)
    # The same prompts (seed 0) for every run of a model.
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.arch.vocab_size, 0)
    try:
        result = {"model": model, "tensor_parallel_size": tp, "enforce_eager": enforce_eager or tp > 1,
                  "single_stream": single_stream(llm, args.stream_prompt_len, args.stream_new_tokens, args.repeats),
                  "throughput": throughput(llm, prompts, args.output_len)}
        if with_ttft:
            result["ttft"] = ttft(llm, args.ttft_prompt_len, args.repeats)
        return result
    finally:
        llm.close()
        gc.collect()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    runs = [measure(args, args.small_model, 1, False),
            measure(args, args.small_model, 1, False, enforce_eager=True),
            measure(args, args.small_model, 2, False)]
    if not args.skip_large:
        runs.append(measure(args, args.large_model, 2, True))
    tp1, tp1_eager, tp2 = runs[0], runs[1], runs[2]
    speedup = tp2["single_stream"]["decode_tok_s"] / tp1["single_stream"]["decode_tok_s"]
    result: dict[str, Any] = {"runs": runs, "small_single_stream_speedup_tp2_over_tp1": speedup,
                              "small_single_stream_speedup_tp2_over_tp1_eager":
                                  tp2["single_stream"]["decode_tok_s"] / tp1_eager["single_stream"]["decode_tok_s"],
                              "target_small_speedup": TARGET_8B_SPEEDUP, "smoke": args.smoke}
    lines = [f"{r['model'].split('/')[-1]} tp={r['tensor_parallel_size']}{' eager' if r['enforce_eager'] else ''}: "
             f"1 stream {r['single_stream']['decode_tok_s']:.1f} tok/s, "
             f"throughput {r['throughput']['output_tok_s']:.0f} tok/s"
             + (f", TTFT {r['ttft']['prompt_tokens']} {r['ttft']['ttft_s'] * 1e3:.0f} ms" if "ttft" in r else "")
             for r in runs]
    lines.append(f"single stream TP2/TP1 {speedup:.2f}x (target >= {TARGET_8B_SPEEDUP}x)")
    if not args.skip_large:
        large = runs[3]["single_stream"]["decode_tok_s"]
        result["large_single_stream_tok_s"] = large
        lines.append(f"70B TP2 one stream {large:.1f} tok/s (target >= {TARGET_70B_TOK_S})")
    print("\n".join(lines))
    write_json(result, args.out, "tp")
    if not args.no_record and not args.smoke:
        append_result("tp", command_line("tp.py", argv), "; ".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
