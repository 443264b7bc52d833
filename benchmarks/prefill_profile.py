"""Where the time to first token of a long prompt goes (issue #16: TTFT 8k at 213-219 ms, target
<= 200 ms): the device's kernels during one prefill of a fresh prompt (torch.profiler, device
activity only), grouped by kind (GEMMs, attention, elementwise, sampling, copies), with the
device's busy and idle time over the request, so the next change aims at the largest share
instead of a guess.

  python benchmarks/prefill_profile.py                  # dummy Llama-3.1-8B bf16, 8,192 tokens
  python benchmarks/prefill_profile.py --smoke          # CPU, tiny model: the script's plumbing only
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_json  # noqa: E402
from spec_profile import _union_us  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402

# Kernel name patterns -> kind (first match wins; names are cuBLAS / CUTLASS / Triton / ATen kernels).
KINDS = [("gemm", r"gemm|cutlass|sm90_xmma|nvjet|matmul|gemv"), ("attention", r"attention|attn|flash|fmha|cudnn"),
         ("copy", r"memcpy|memset|copy|gather|index|scatter"), ("sampling", r"argmax|softmax|topk|sort|exponential")]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, low)), "elementwise/other")


def profile_prefill(llm: LLM, prompt_len: int, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(3)
    vocab = llm.engine.arch.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([rng.integers(10, vocab, size=prompt_len).tolist()], params)  # warm-up: compiles
    wall = []
    for _ in range(repeats):
        prompt = rng.integers(10, vocab, size=prompt_len).tolist()  # fresh: no prefix-cache hit
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall.append((time.perf_counter() - start) * 1e3)
    activities = [ProfilerActivity.CUDA] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        llm.generate([rng.integers(10, vocab, size=prompt_len).tolist()], params)
    wanted = DeviceType.CUDA if torch.cuda.is_available() else DeviceType.CPU
    device = [e for e in prof.events() if e.device_type == wanted]
    kernels: dict[str, list[float]] = defaultdict(list)
    for e in device:
        kernels[e.name[:90]].append(e.time_range.elapsed_us())
    start = min(e.time_range.start for e in device)
    end = max(e.time_range.end for e in device)
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in device])
    kinds: dict[str, float] = defaultdict(float)
    for name, times in kernels.items():
        kinds[kind_of(name)] += sum(times) / 1e3
    return {"ttft_ms_unprofiled": sorted(wall)[len(wall) // 2], "device_span_ms": (end - start) / 1e3,
            "busy_ms": busy / 1e3, "idle_ms": (end - start - busy) / 1e3, "kinds_ms": dict(kinds),
            "kernels": {n: {"count": len(v), "ms": sum(v) / 1e3} for n, v in kernels.items()}}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    kwargs: dict[str, Any] = dict(load_format="dummy", dtype="bfloat16")
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.model, args.prompt_len, args.repeats = str(tiny_model_cached("llama")), 256, 1
        kwargs = dict(dtype="float32")
    # The engine latency.py measures TTFT with: the whole prompt in one step.
    llm = LLM(args.model, max_model_len=args.prompt_len + 16, max_num_batched_tokens=max(args.prompt_len, 2048),
              max_num_seqs=64, **kwargs)
    result = profile_prefill(llm, args.prompt_len, args.repeats)
    llm.close()
    print(f"TTFT {args.prompt_len} tokens: {result['ttft_ms_unprofiled']:.1f} ms unprofiled; device span "
          f"{result['device_span_ms']:.1f} ms, busy {result['busy_ms']:.1f}, idle {result['idle_ms']:.1f}")
    for kind, ms in sorted(result["kinds_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<20} {ms:8.2f} ms")
    print(f"{'kernel':<90} {'ms':>8} {'count':>6}")
    for name, k in sorted(result["kernels"].items(), key=lambda kv: -kv[1]["ms"])[:25]:
        print(f"{name:<90} {k['ms']:8.2f} {k['count']:6d}")
    write_json({"model": args.model, "prompt_len": args.prompt_len, **result}, args.out, "prefill_profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
