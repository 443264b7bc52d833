"""Single-stream latency: decode tokens/s for one request (128-token prompt, 256 new tokens) and
time to first token for one long prompt (8,192 tokens).

  python benchmarks/latency.py --model llama-3.1-8b --load-format dummy --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from ceilings import add_ceilings_arg, device_ceilings  # noqa: E402
from limits import ModelWork  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402


def sync_device() -> None:
    """Waits for the GPU's queued work (timings end there); nothing on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _vocab(llm: LLM) -> int:
    return min(llm.engine.arch.vocab_size - 10, 30000)


def single_stream(llm: LLM, prompt_len: int, new_tokens: int, repeats: int,
                  lora_name: Optional[str] = None) -> dict[str, Any]:
    """Decode tok/s of one request (optionally with a LoRA adapter), from its first token to its last:
    the median of `repeats` runs after one warm-up run."""
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine = llm.engine
    engine.emit_unfinished = True  # per-step outputs: the first token's arrival time is needed
    rates = []
    try:
        for r in range(repeats + 1):
            prompt = rng.integers(10, _vocab(llm), size=prompt_len).tolist()
            engine.add_request(f"stream-{lora_name}-{r}", prompt, params, lora_name=lora_name)
            first, n = None, 0
            while engine.has_unfinished():
                for out in engine.step():
                    if out.error:  # a failed step must stop the benchmark, not read as a slow stream
                        raise RuntimeError(f"benchmark request {out.request_id} failed: {out.error}")
                    n = len(out.outputs[0].token_ids)
                    if first is None and n:
                        sync_device()
                        first = time.perf_counter()
            sync_device()
            if r > 0:  # the first run warms up
                assert first is not None
                rates.append((n - 1) / (time.perf_counter() - first))  # decode rate after the first token
    finally:
        engine.emit_unfinished = False
    return {"decode_tok_s": statistics.median(rates), "runs": rates}


def ttft(llm: LLM, prompt_len: int, repeats: int, seed: int = 1) -> dict[str, Any]:
    """Median time to first token over `repeats` prompts (after one warm-up). A caller measuring twice on
    one engine passes another seed: the same prompts would hit the prefix cache."""
    rng = np.random.default_rng(seed)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for r in range(repeats + 1):
        prompt = rng.integers(10, _vocab(llm), size=prompt_len).tolist()  # fresh: no prefix-cache hit
        sync_device()
        start = time.perf_counter()
        out = llm.generate([prompt], params)[0]
        sync_device()
        if out.num_cached_tokens:  # a TTFT that prefilled less than its prompt is not a TTFT figure
            raise RuntimeError(f"TTFT prompt {r} hit the prefix cache ({out.num_cached_tokens} tokens)")
        if r > 0:
            times.append((time.perf_counter() - start) * 1000)
    return {"ttft_ms": statistics.median(times), "runs_ms": times}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--ttft-prompt-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--quantization", default=None, choices=["fp8"], help="FP8 weights (online, from the dummy bf16)")
    ap.add_argument("--bandwidth-limit-tok-s", type=float, default=None,
                    help="one-stream limit; default: bytes read per decode step / the copy rate measured at start")
    add_ceilings_arg(ap)
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    model = args.model
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2", max_position_embeddings=16384))
    llm = LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              max_model_len=max(args.ttft_prompt_len, args.prompt_len + args.new_tokens) + 16,
              max_num_batched_tokens=max(args.ttft_prompt_len, 2048), max_num_seqs=64,
              attention_backend=args.attention_backend, quantization=args.quantization)
    limit = args.bandwidth_limit_tok_s
    ceilings = None
    if limit is None:
        engine = llm.engine
        # On CPU (the tiny default model) a smoke-sized measurement is enough: its ratio means little.
        ceilings = device_ceilings(engine.device, engine.dtype, smoke=engine.device.type != "cuda", source=args.ceilings)
        work = ModelWork.from_model(engine.runner.model, engine.arch, engine.dtype)
        limit = work.single_stream_tok_s(ceilings.copy_bytes_s, args.prompt_len, args.new_tokens)
    stream = single_stream(llm, args.prompt_len, args.new_tokens, args.repeats)
    first = ttft(llm, args.ttft_prompt_len, args.repeats)
    result = {"benchmark": "latency", "model": model, "device": device_name(), "single_stream": stream,
              "ttft": first, "single_stream_limit_tok_s": limit,
              "ratio_to_bandwidth_limit": stream["decode_tok_s"] / limit,
              "ceilings": ceilings.as_dict() if ceilings is not None else None}
    print(f"latency on {result['device']} ({model})" + (f"; ceilings {ceilings.describe()}" if ceilings else ""))
    print(f"  one stream, {args.prompt_len}-token prompt, {args.new_tokens} new: {stream['decode_tok_s']:.1f} tok/s "
          f"(limit {limit:.0f}, ratio {result['ratio_to_bandwidth_limit']:.2f}; issue #16 target >= 0.90)")
    print(f"  time to first token, {args.ttft_prompt_len}-token prompt: {first['ttft_ms']:.1f} ms "
          "(limits and targets for both: benchmarks/fastpath.py)")
    write_json(result, args.out, "latency")
    if args.record:
        append_result("latency", command_line("latency.py", argv),
                      f"{stream['decode_tok_s']:.1f} tok/s one stream; TTFT {first['ttft_ms']:.1f} ms "
                      f"@{args.ttft_prompt_len}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
