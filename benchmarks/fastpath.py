"""The GPU fast-path figures in one command, on one loaded model, as a table of result, limit, ratio
and target:
  - one stream: 128-token prompt, 256 new tokens (limit: weight bytes / copy bandwidth);
  - time to first token of one 8,192-token prompt (limit: its FLOPs / matmul rate);
  - throughput: 1,024 requests, prompts uniform 64-512 (seed 0), 256 output tokens, ignore_eos
    (limit: the workload's FLOPs / matmul rate), and with --peer hf the ratio to transformers'
    generate_batch on the same weights (on a --peer-requests slice if given).
The per-kernel table is benchmarks/kernels.py.

  python benchmarks/fastpath.py --model llama-3.1-8b --load-format dummy --dtype bfloat16 [--peer hf]
  agentserve bench                (the same, with those defaults)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from latency import single_stream, ttft  # noqa: E402
from throughput import hf_model_from_engine, make_prompts, release_kv_for_peer, run_hf_peer, run_ours  # noqa: E402

from agentserve.llm import LLM  # noqa: E402

# H100 80GB ceilings (../shared/gpu/README.md): copy 3.0 TB/s, bf16 matmul 781 TFLOP/s.
COPY_BYTES_S = 3.0e12
MATMUL_FLOP_S = 781e12


def model_numbers(llm: LLM) -> tuple[float, float, float]:
    """(weight bytes read per decode step, matmul FLOPs per token, attention FLOPs per token pair)."""
    a = llm.engine.arch
    m = llm.engine.runner.model
    itemsize = torch.finfo(llm.engine.dtype).bits // 8
    params = sum(p.numel() for p in m.parameters())
    embed = m.embed_tokens.weight.numel()
    read = (params - (embed if not a.tie_word_embeddings else 0)) * itemsize  # one embedding row is read, not all
    matmul_params = params - embed + (embed if a.tie_word_embeddings else 0)
    # Scores and weighted values: 2 matmuls x 2 FLOPs x head_dim x heads, per layer, per (query, key).
    attn = 4 * a.num_layers * a.num_heads * a.head_dim
    return float(read), 2.0 * matmul_params, float(attn)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--num-requests", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--ttft-prompt-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peer", choices=["hf"], default=None)
    ap.add_argument("--peer-requests", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              max_model_len=max(args.ttft_prompt_len, 512 + 256) + 16, max_num_batched_tokens=max(args.ttft_prompt_len, 2048),
              max_num_seqs=args.max_num_seqs)
    read_bytes, flop_per_token, attn_flop = model_numbers(llm)

    # Throughput first, on the fresh engine (as benchmarks/throughput.py measures it), then latency.
    prompts = make_prompts(args.num_requests, 64, 512, llm.engine.arch.vocab_size, 0)
    ours = run_ours(llm, prompts, 256)
    stream = single_stream(llm, 128, 256, args.repeats)
    stream_limit = COPY_BYTES_S / read_bytes
    first = ttft(llm, args.ttft_prompt_len, args.repeats)
    t = args.ttft_prompt_len
    ttft_limit_ms = (flop_per_token * t + attn_flop * t * (t + 1) / 2) / MATMUL_FLOP_S * 1e3
    n_in = sum(len(p) for p in prompts)
    n_out = len(prompts) * 256
    # Every prompt and output token goes through the matmuls once; attention over its context.
    ctx_pairs = sum(len(p) * (len(p) + 1) / 2 + 256 * len(p) + 256 * 257 / 2 for p in prompts)
    workload_s = (flop_per_token * (n_in + n_out) + attn_flop * ctx_pairs) / MATMUL_FLOP_S
    tput_limit = n_out / workload_s

    result: dict[str, Any] = {
        "benchmark": "fastpath", "model": args.model, "device": device_name(),
        "single_stream": stream, "single_stream_limit_tok_s": stream_limit,
        "ttft": first, "ttft_limit_ms": ttft_limit_ms, "throughput": ours, "throughput_limit_tok_s": tput_limit}
    if args.peer == "hf":
        release_kv_for_peer(llm)
        hf = hf_model_from_engine(llm)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n = args.peer_requests or args.num_requests
        result["peer_hf"] = run_hf_peer(hf, prompts[:n], 256)
        result["ratio_vs_hf"] = ours["output_tok_s"] / result["peer_hf"]["output_tok_s"]

    rows = [("figure", "result", "limit", "ratio", "target"),
            ("one stream (128 prompt, 256 new), tok/s", f"{stream['decode_tok_s']:.1f}", f"{stream_limit:.0f}",
             f"{stream['decode_tok_s'] / stream_limit:.2f}", ">= 160"),
            (f"TTFT, {t}-token prompt, ms", f"{first['ttft_ms']:.1f}", f"{ttft_limit_ms:.0f}",
             f"{ttft_limit_ms / first['ttft_ms']:.2f}", "<= 250"),
            (f"throughput ({args.num_requests} req), output tok/s", f"{ours['output_tok_s']:.0f}",
             f"{tput_limit:.0f}", f"{ours['output_tok_s'] / tput_limit:.2f}", ">= 12000"),
            ("KV memory efficiency", f"{ours['kv_memory_efficiency'] * 100:.1f}%", "100%",
             f"{ours['kv_memory_efficiency']:.2f}", "")]
    if "peer_hf" in result:
        p = result["peer_hf"]
        rows.append((f"transformers generate_batch ({p['requests']} req), tok/s", f"{p['output_tok_s']:.0f}", "",
                     f"ours {result['ratio_vs_hf']:.1f}x", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"GPU fast path on {result['device']} ({args.model}, {args.dtype}); ratios are result/limit "
          "(limit/result for TTFT)")
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    write_json(result, args.out, "fastpath")
    if args.record:
        summary = (f"one stream {stream['decode_tok_s']:.1f} tok/s (limit {stream_limit:.0f}); TTFT {t} "
                   f"{first['ttft_ms']:.1f} ms (limit {ttft_limit_ms:.0f}); throughput {ours['output_tok_s']:.0f} "
                   f"out tok/s (limit {tput_limit:.0f}), KV eff {ours['kv_memory_efficiency'] * 100:.1f}%")
        if "ratio_vs_hf" in result:
            summary += (f"; transformers generate_batch ({result['peer_hf']['requests']} req) "
                        f"{result['peer_hf']['output_tok_s']:.0f} tok/s, ratio {result['ratio_vs_hf']:.1f}x")
        append_result("fastpath", command_line("fastpath.py", argv), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
