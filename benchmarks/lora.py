"""Multi-LoRA throughput, single-stream speed and adapter load time (issue #13), on one engine:
  - throughput: 1,024 requests, prompts uniform 64-512 (seed 0), 256 output tokens, ignore_eos, as
    the base model and with 1, 8 and 64 rank-16 adapters spread uniformly over the requests
    (max_loras 64 >= the count), and with 512 adapters through the CPU tier (max_loras 64,
    max_cpu_loras 512: the scheduler admits at most 64 distinct adapters at once);
  - one stream (128-token prompt, 256 new tokens): decode tok/s with an adapter and as the base;
  - adapter load time: reading + checking + laying out one PEFT directory (CPU tier), and copying
    one adapter into a device slot.
Targets (issue #13): 64 adapters >= 0.90x base throughput, one stream with an adapter >= 0.90x
base, 512 adapters >= 0.80x base.

The adapters are random PEFT directories (adapter_config.json + adapter_model.safetensors) written
for the model's shapes; `--distinct-files` of them are written and registered under as many names as
needed (each name is its own adapter to the engine: own key, own CPU-tier entry, own slot).

  python benchmarks/lora.py                        (GPU: dummy Llama-3.1-8B bf16)
  python benchmarks/lora.py --smoke --out x.json   (CPU: a tiny model, a few short requests)
  python benchmarks/lora.py --lora-fused on        (A/B: the one-launch LoRA kernel for decode steps)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from latency import single_stream, sync_device  # noqa: E402
from throughput import add_dummy_model_args, add_workload_args, make_prompts  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.kernels.lora_fused import FUSED_MAX_TOKENS, lora_fused_enabled, set_lora_fused  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.lora.adapter import ATTENTION_MODULES, lora_module_shapes  # noqa: E402
from agentserve.model.arch_config import ArchConfig  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGET_64 = 0.90
TARGET_ONE_STREAM = 0.90
TARGET_512 = 0.80


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dummy_model_args(ap)
    add_workload_args(ap)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=",".join(ATTENTION_MODULES),
                    help="LoRA target modules (default: q,k,v,o: 27 MB a rank-16 8B adapter, so 512 fit in RAM)")
    ap.add_argument("--counts", default="1,8,64", help="adapter counts with max_loras >= count")
    ap.add_argument("--max-loras", type=int, default=64)
    ap.add_argument("--cpu-tier-adapters", type=int, default=512)
    ap.add_argument("--distinct-files", type=int, default=16)
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--stream-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lora-fused", choices=("on", "off"), default=None,
                    help=f"AGENTSERVE_LORA_FUSED for this run: one fused shrink+expand launch per projection for "
                         f"steps of <= {FUSED_MAX_TOKENS} tokens (kernels/lora_fused.py); default: the environment's")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: a tiny float32 model, small workloads")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.smoke:
        from agentserve.testing import tiny_model_cached

        args.model, args.load_format, args.dtype = str(tiny_model_cached("qwen2")), "auto", "float32"
        args.num_requests, args.min_prompt, args.max_prompt, args.output_len = 8, 8, 24, 4
        args.max_num_seqs, args.rank, args.counts, args.max_loras = 8, 4, "1,2", 2
        args.cpu_tier_adapters, args.distinct_files = 4, 2
        args.stream_prompt_len, args.stream_new_tokens, args.repeats = 8, 6, 1
    return args


def write_adapter(path: Path, arch: ArchConfig, rank: int, targets: list[str], seed: int) -> Path:
    """A random PEFT LoRA directory for `arch` (A ~ N(0, 1/in), B small: deltas of a sane size)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = lora_module_shapes(arch)
    tensors = {}
    for layer in range(arch.num_layers):
        for module in targets:
            block = "self_attn" if module in ATTENTION_MODULES else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            fan_in, fan_out = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5).to(torch.bfloat16)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}))
    return path


def load_adapters(llm: LLM, names: list[str], files: list[Path]) -> float:
    """Registers `names` (cycling over `files`); reads run in threads, as the servers do. Returns s."""
    control = llm.engine.lora
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        prepared = list(pool.map(lambda i: control.read(names[i], str(files[i % len(files)]), replace=False),
                                 range(len(names))))
    for p in prepared:
        control.install(p, replace=False)
    return time.perf_counter() - start


def run_throughput(llm: LLM, prompts: list[list[int]], adapters: list[Optional[str]], output_len: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    warm = min(len(prompts), 64)  # compiles the LoRA kernels' prefill variants outside the timing
    llm.generate(prompts[:warm], params.clone(max_tokens=2), adapter=adapters[:warm])
    manager = llm.engine.lora_manager
    loads_before = manager.num_slot_loads if manager is not None else 0
    sync_device()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, adapter=adapters)
    sync_device()
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"elapsed_s": elapsed, "output_tokens": out_tokens, "output_tok_s": out_tokens / elapsed,
            "requests_s": len(prompts) / elapsed, "distinct_adapters": len({a for a in adapters if a}),
            "slot_loads": (manager.num_slot_loads if manager is not None else 0) - loads_before}


def slot_load_ms(llm: LLM, name: str) -> float:
    """One adapter (already in the CPU tier) copied into a device slot: activate, to the copies' end."""
    manager = llm.engine.lora_manager
    assert manager is not None
    key = manager.key_of(name)
    assert key is not None and key not in manager.resident_keys(), "the adapter must not be resident"
    sync_device()
    start = time.perf_counter()
    manager.activate([key])
    manager.step_launched()
    sync_device()
    return (time.perf_counter() - start) * 1e3


def table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    targets = args.targets.split(",")
    n_names = max(max(counts), args.cpu_tier_adapters)
    if args.lora_fused is not None:  # before the engine exists: its decode graphs capture the choice
        os.environ["AGENTSERVE_LORA_FUSED"] = "1" if args.lora_fused == "on" else "0"  # worker processes (TP)
        set_lora_fused(args.lora_fused == "on")  # this process imported the kernels already
    llm = LLM(args.model, device=args.device, dtype=args.dtype, load_format=args.load_format,
              max_model_len=max(args.max_prompt + args.output_len, args.stream_prompt_len + args.stream_new_tokens) + 16,
              max_num_batched_tokens=2048 if args.smoke else 8192, max_num_seqs=args.max_num_seqs,
              enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.rank, max_cpu_loras=n_names,
              lora_target_modules=targets)  # the other projections run no LoRA kernels
    engine = llm.engine
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        files = [write_adapter(Path(tmp) / f"a{i}", engine.arch, args.rank, targets, seed=i)
                 for i in range(args.distinct_files)]
        names = [f"lora-{i}" for i in range(n_names)]
        t0 = time.perf_counter()
        llm.load_adapter(names[0], str(files[0]))
        one_load_ms = (time.perf_counter() - t0) * 1e3
        all_load_s = load_adapters(llm, names[1:], files[1:] + files[:1])
    prompts = make_prompts(args.num_requests, args.min_prompt, args.max_prompt, engine.arch.vocab_size, 0)
    rng = np.random.default_rng(1)

    def spread(k: int) -> list[Optional[str]]:
        # Uniform: every adapter serves the same number of requests (+-1), in a random order.
        return [names[int(i) % k] for i in rng.permutation(len(prompts))] if k else [None] * len(prompts)

    runs: dict[str, dict[str, Any]] = {}
    for name, k in [("base", 0), *((f"{k} adapters", k) for k in counts),
                    (f"{args.cpu_tier_adapters} adapters (CPU tier)", args.cpu_tier_adapters)]:
        runs[name] = run_throughput(llm, prompts, spread(k), args.output_len)
        print(f"{name}: {runs[name]['output_tok_s']:.0f} out tok/s, {runs[name]['slot_loads']} slot loads", flush=True)
    stream_base = single_stream(llm, args.stream_prompt_len, args.stream_new_tokens, args.repeats, None)
    stream_lora = single_stream(llm, args.stream_prompt_len, args.stream_new_tokens, args.repeats, names[0])
    manager = engine.lora_manager
    assert manager is not None
    # A slot copy needs an adapter that is not in a device slot; with every adapter resident (a run
    # with fewer adapters than slots) there is none to time.
    cold = next((n for n in reversed(names) if manager.key_of(n) not in manager.resident_keys()), None)
    slot_ms = slot_load_ms(llm, cold) if cold is not None else float("nan")

    base_tput = runs["base"]["output_tok_s"]
    ratios = {name: r["output_tok_s"] / base_tput for name, r in runs.items()}
    key_64 = f"{max(counts)} adapters"
    key_cpu = f"{args.cpu_tier_adapters} adapters (CPU tier)"
    stream_ratio = stream_lora["decode_tok_s"] / stream_base["decode_tok_s"]
    met = {f"{key_64} >= {TARGET_64}x base": ratios[key_64] >= TARGET_64,
           f"one stream with an adapter >= {TARGET_ONE_STREAM}x base": stream_ratio >= TARGET_ONE_STREAM,
           f"{key_cpu} >= {TARGET_512}x base": ratios[key_cpu] >= TARGET_512}
    result: dict[str, Any] = {
        "benchmark": "lora", "model": args.model, "device": device_name(), "rank": args.rank, "targets": targets,
        "max_loras": args.max_loras, "max_cpu_loras": n_names, "lora_fused": lora_fused_enabled(), "throughput": runs, "ratios_vs_base": ratios,
        "single_stream": {"base": stream_base, "adapter": stream_lora, "ratio": stream_ratio},
        "load": {"one_adapter_ms": one_load_ms, f"{n_names - 1}_adapters_s": all_load_s, "slot_copy_ms": slot_ms},
        "targets_met": met}

    rows = [("figure", "result", "vs base", "target")]
    for name, r in runs.items():
        target = {key_64: f">= {TARGET_64}", key_cpu: f">= {TARGET_512}"}.get(name, "")
        rows.append((f"throughput, {name}, out tok/s", f"{r['output_tok_s']:.0f}", f"{ratios[name]:.2f}", target))
    rows.append(("one stream, base, tok/s", f"{stream_base['decode_tok_s']:.1f}", "1.00", ""))
    rows.append((f"one stream, adapter ({names[0]}), tok/s", f"{stream_lora['decode_tok_s']:.1f}",
                 f"{stream_ratio:.2f}", f">= {TARGET_ONE_STREAM}"))
    rows.append(("adapter load into CPU tier (read + check + pin), ms", f"{one_load_ms:.1f}", "", ""))
    rows.append((f"{n_names - 1} adapter loads, 8 reader threads, s", f"{all_load_s:.2f}", "", ""))
    rows.append(("adapter copy into a device slot, ms", f"{slot_ms:.2f}", "", ""))
    print(table(rows))
    print(f"fused LoRA kernel for steps of <= {FUSED_MAX_TOKENS} tokens: {'on' if lora_fused_enabled() else 'off'}")
    for what, ok in met.items():
        print(f"target {what}: {'met' if ok else 'NOT met'}")

    on_gpu = engine.device.type == "cuda"
    default_out = RESULTS_DIR / f"lora_{torch.cuda.get_device_name(0).split()[-1].lower()}.json" if on_gpu else None
    path = write_json(result, args.out or (str(default_out) if default_out else None), "lora")
    if path is not None:
        print(f"wrote {path}")
    write_json(result, None, "lora")  # also $OUT/lora.json on the device machine, when set
    if on_gpu and not args.no_record:
        summary = "; ".join(f"{name} {r['output_tok_s']:.0f} tok/s ({ratios[name]:.2f}x)" for name, r in runs.items())
        summary += (f"; one stream {stream_lora['decode_tok_s']:.1f} vs {stream_base['decode_tok_s']:.1f} tok/s "
                    f"({stream_ratio:.2f}x); load {one_load_ms:.0f} ms, slot copy {slot_ms:.2f} ms; "
                    f"fused LoRA kernel {'on' if lora_fused_enabled() else 'off'}")
        append_result("lora", command_line("lora.py", argv), summary)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
