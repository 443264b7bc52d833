"""Offline throughput: N requests with random prompt lengths (uniform, fixed seed), fixed output
length, ignore_eos. `--peer hf` runs transformers' own continuous batching (`generate_batch`) on the
same weights in the same process and prints the ratio. Also reports KV memory efficiency.

  python benchmarks/throughput.py --model PATH_OR_SHAPE [--load-format dummy] [--peer hf]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402


def add_dummy_model_args(ap: argparse.ArgumentParser) -> None:
    """The model flags of the GPU benchmarks that default to a dummy Llama-3.1-8B in bf16."""
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default=None)


def add_workload_args(ap: argparse.ArgumentParser, num_requests: int = 1024) -> None:
    """The throughput workload's flags (requests, prompts uniform in [min, max], output length), shared
    by every benchmark that runs it."""
    ap.add_argument("--num-requests", type=int, default=num_requests)
    ap.add_argument("--min-prompt", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)


def add_max_num_seqs_arg(ap: argparse.ArgumentParser) -> None:
    """--max-num-seqs, unset by default: the engine then takes its own for the device."""
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="default: the engine's for this device (engine/batch_defaults.py: 1,024 on an H200, else 256)")


def max_num_seqs_kwargs(max_num_seqs: Optional[int]) -> dict[str, int]:
    """The engine keyword for --max-num-seqs; none when it is unset, so the device's default applies."""
    return {} if max_num_seqs is None else {"max_num_seqs": max_num_seqs}


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(10, min(vocab, 32000) - 10, size=int(length)).tolist() for length in lengths]


def run_ours(llm: LLM, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[: min(4, len(prompts))], params.clone(max_tokens=4))  # warm-up
    m = llm.engine.metrics
    m.kv_slots_held = m.kv_slots_allocated = 0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    failed = [o for o in outs if o.error]
    if failed:  # a failed step must stop the benchmark, not read as a low throughput
        raise RuntimeError(f"{len(failed)} benchmark requests failed, the first: {failed[0].error}")
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    in_tokens = sum(len(p) for p in prompts)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_s": out_tokens / elapsed,
            "total_tok_s": (out_tokens + in_tokens) / elapsed, "requests_s": len(prompts) / elapsed,
            "kv_memory_efficiency": m.kv_memory_efficiency, "preemptions": m.num_preemptions_total,
            "kv_pages": llm.engine.pool.num_blocks}


def release_kv_for_peer(llm: LLM) -> None:
    """Frees our KV pool and the CUDA graphs (they hold the pool) so the peer has room for its cache;
    the weights stay, for the peer to borrow. The pool is emptied in place: the runner's page stores
    refer to the same object, so dropping the runner's attribute alone kept every page alive."""
    runner = llm.engine.runner
    runner.graphs = runner.verify_graphs = None
    runner.kv_cache.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def hf_model_from_engine(llm: LLM) -> Any:
    """A transformers model holding the engine's weights (split back from the fused layout)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    engine = llm.engine
    if engine.model_path is not None:
        return AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=engine.dtype).to(engine.device)
    from agentserve.testing.tiny import NAMED_SHAPES

    shape = dict(NAMED_SHAPES[engine.config.model.model])
    model_type = shape.pop("model_type", "llama")
    shape.pop("architectures", None)
    cfg = AutoConfig.for_model(model_type, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=engine.dtype)
    model = model.to_empty(device=engine.device)
    ours = engine.runner.model
    a = engine.arch
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(ours.embed_tokens.weight)
        model.model.norm.weight.copy_(ours.norm.weight)
        if not a.tie_word_embeddings:
            model.lm_head.weight.copy_(ours.lm_head.weight)
        for theirs, mine in zip(model.model.layers, ours.layers):
            w = mine.self_attn.qkv_proj.weight
            theirs.self_attn.q_proj.weight.copy_(w[:q])
            theirs.self_attn.k_proj.weight.copy_(w[q:q + kv])
            theirs.self_attn.v_proj.weight.copy_(w[q + kv:])
            theirs.self_attn.o_proj.weight.copy_(mine.self_attn.o_proj.weight)
            gu = mine.mlp.gate_up_proj.weight
            theirs.mlp.gate_proj.weight.copy_(gu[: a.intermediate_size])
            theirs.mlp.up_proj.weight.copy_(gu[a.intermediate_size:])
            theirs.mlp.down_proj.weight.copy_(mine.mlp.down_proj.weight)
            theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
            theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)
    # Rotary buffers were left empty by to_empty: recompute them.
    for module in model.modules():
        if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
            inv_freq, scaling = module.rope_init_fn(module.config, engine.device)
            module.inv_freq = inv_freq
            module.original_inv_freq = inv_freq
            module.attention_scaling = scaling
    return model.eval()


def run_hf_peer(model: Any, prompts: list[list[int]], output_len: int) -> dict[str, Any]:
    from transformers import GenerationConfig

    # An impossible EOS id keeps every sequence to output_len (ignore_eos).
    gen_cfg = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1, pad_token_id=0)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=gen_cfg)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_s": out_tokens / elapsed,
            "requests": len(prompts)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir or named shape (default: a tiny qwen2)")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    add_workload_args(ap)
    ap.add_argument("--seed", type=int, default=0)
    add_max_num_seqs_arg(ap)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--attention-backend", default="auto")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="weights (as --quantization of serve)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--peer", choices=["hf"], default=None)
    ap.add_argument("--peer-requests", type=int, default=None, help="run the peer on a slice (say so)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true", help="append a line to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    model = args.model
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2"))
    llm = LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              **max_num_seqs_kwargs(args.max_num_seqs),
              max_num_batched_tokens=args.max_num_batched_tokens,
              attention_backend=args.attention_backend, gpu_memory_utilization=args.gpu_memory_utilization,
              quantization=args.quantization,
              max_model_len=args.max_prompt + args.output_len + 16)
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, llm.engine.arch.vocab_size, args.seed)
    ours = run_ours(llm, prompts, args.output_len)
    result: dict[str, Any] = {"benchmark": "throughput", "model": model, "device": device_name(),
                              "num_requests": args.num_requests, "prompt_len": [args.min_prompt, args.max_prompt],
                              "output_len": args.output_len,
                              "max_num_seqs": llm.engine.config.scheduler.max_num_seqs, "ours": ours}
    print(f"ours (max_num_seqs {result['max_num_seqs']}): {ours['output_tok_s']:.1f} output tok/s, KV memory efficiency "
          f"{ours['kv_memory_efficiency'] * 100:.1f}%", flush=True)
    if args.peer == "hf":
        slice_n = args.peer_requests or args.num_requests
        release_kv_for_peer(llm)
        hf = hf_model_from_engine(llm)
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        peer = run_hf_peer(hf, prompts[:slice_n], args.output_len)
        result["peer_hf"] = peer
        result["ratio_vs_hf"] = ours["output_tok_s"] / peer["output_tok_s"]

    rows = [("output tok/s", f"{ours['output_tok_s']:.1f}"), ("total tok/s", f"{ours['total_tok_s']:.1f}"),
            ("requests/s", f"{ours['requests_s']:.2f}"), ("elapsed s", f"{ours['elapsed_s']:.1f}"),
            ("KV memory efficiency", f"{ours['kv_memory_efficiency'] * 100:.1f}% (target >= 96%)"),
            ("preemptions", str(ours["preemptions"]))]
    if "peer_hf" in result:
        p = result["peer_hf"]
        rows += [(f"hf generate_batch tok/s ({p['requests']} req)", f"{p['output_tok_s']:.1f}"),
                 ("ratio ours / hf", f"{result['ratio_vs_hf']:.2f}x")]
    width = max(len(r[0]) for r in rows)
    print(f"throughput: {args.num_requests} requests, prompts {args.min_prompt}-{args.max_prompt}, "
          f"{args.output_len} out, on {result['device']}")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    write_json(result, args.out, "throughput")
    if args.record:
        summary = f"{ours['output_tok_s']:.1f} out tok/s, KV eff {ours['kv_memory_efficiency'] * 100:.1f}%"
        if "ratio_vs_hf" in result:
            summary += f", hf {result['peer_hf']['output_tok_s']:.1f} tok/s, ratio {result['ratio_vs_hf']:.2f}x"
        append_result("throughput", command_line("throughput.py", argv), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
