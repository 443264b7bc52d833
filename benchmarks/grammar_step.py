"""Per-step overhead of grammar masks: decode step time with JSON-schema-constrained requests
against the same batch unconstrained, at batch 1, 16 and 64 (issue #16: < 5% at batch 64, 128k vocab).

  python benchmarks/grammar_step.py                      # CPU, tiny model
  python benchmarks/grammar_step.py --smoke --async-scheduling on   # CPU, seconds
  python benchmarks/grammar_step.py --model llama-3.1-8b --load-format dummy --dtype bfloat16
      # dummy 8B with a synthetic 128k-token byte-level vocabulary (real token strings are not
      # needed to measure masks: the grammar engine sees the same vocabulary size and byte shapes)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402
from latency import sync_device  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "arguments": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                           "days": {"type": "integer"}, "details": {"type": "array", "items": {"type": "string"}}},
            "required": ["location", "details"],
        },
    },
    "required": ["name", "arguments"],
}


def synthetic_tokenizer(vocab_size: int, out_dir: Path) -> Path:
    """A byte-level tokenizer with `vocab_size` tokens: the 256 byte symbols plus distinct strings
    of 2-10 symbols (letters, digits, spaces, JSON punctuation), like a real BPE vocabulary's shape."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {c: i for i, c in enumerate(alphabet)}
    rng = np.random.default_rng(0)
    common = list("etaoinshrdlucmfwypvbgkqjxz") + list("ETAOINSHRD0123456789") + ["Ġ"] * 6 + list('",:{}[]._-')
    while len(vocab) < vocab_size - 8:
        n = int(rng.integers(2, 11))
        token = "".join(common[int(i)] for i in rng.integers(0, len(common), size=n))
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    hf.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    hf.save_pretrained(str(out_dir))
    return out_dir


def _prefilling(engine: Any) -> bool:
    """Requests still waiting (for a slot or a grammar compile) or with prompt tokens to run."""
    return bool(engine.scheduler.num_waiting) or any(r.num_computed_tokens < r.num_prompt_tokens
                                                     for r in engine.scheduler.running)


def measure(llm: LLM, batch: int, constrained: bool, prompt_len: int, steps: int) -> dict[str, Any]:
    """Mean decode step time over a window: after every prompt is prefilled, up to `steps` decode steps
    are timed together between two device syncs (with async scheduling a step returns before its device work is
    done, so a single step's wall time is host time only). The window closes early when the batch
    shrinks below 90% (constrained outputs may end early). Per-step state checks would not work here:
    with async scheduling a request's next token is in flight, so the host never sees it 'one token
    behind' (what the first version of this script waited for, measuring 0 steps on a GPU)."""
    engine = llm.engine
    rng = np.random.default_rng(batch)
    vocab = min(engine.arch.vocab_size - 10, 30000)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=steps + 16, ignore_eos=not constrained,
                            json_schema=SCHEMA if constrained else None)
    for i in range(batch):
        engine.add_request(f"{'c' if constrained else 'u'}{batch}-{i}", rng.integers(10, vocab, size=prompt_len).tolist(),
                           params.clone(seed=i))
    errors: list[str] = []
    while _prefilling(engine):
        errors += [o.error for o in engine.step() if o.error]
    for _ in range(2):  # settle into steady decode (async scheduling: one step in flight)
        errors += [o.error for o in engine.step() if o.error]
    keep = max(1, int(batch * 0.9))
    sizes: list[int] = []
    sync_device()
    start = time.perf_counter()
    while len(sizes) < steps and len(engine.scheduler.running) >= keep:
        sizes.append(len(engine.scheduler.running))
        errors += [o.error for o in engine.step() if o.error]
    sync_device()
    elapsed = time.perf_counter() - start
    if errors:
        print(f"  {len(errors)} requests failed, e.g.: {errors[0]}")
    for rid in list(engine.groups):
        engine.abort(rid)
    engine.step()  # processes the step still in flight (its requests are aborted: nothing is emitted)
    if not sizes:
        raise RuntimeError(f"batch {batch} ({'constrained' if constrained else 'plain'}): no decode step was "
                           "measured (the batch shrank below 90% before the window opened)")
    return {"step_ms": elapsed * 1000 / len(sizes), "steps": len(sizes), "mean_batch": statistics.mean(sizes),
            "errors": len(errors)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (dummy models: a synthetic one is built)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--grammar-backend", default="auto")
    ap.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                    help="auto: the engine's default (on for CUDA)")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run: tiny model, batches 1,4, 4 steps")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.batches, args.steps, args.prompt_len = None, "1,4", 4, 16
    model, tokenizer = args.model, args.tokenizer
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2"))
    elif args.load_format == "dummy" and tokenizer is None:
        tokenizer = str(synthetic_tokenizer(args.vocab, Path(tempfile.mkdtemp(prefix="agentserve-tok-"))))
    batches = [int(b) for b in args.batches.split(",")]
    async_scheduling = {"auto": None, "on": True, "off": False}[args.async_scheduling]
    llm = LLM(model, dtype=args.dtype, load_format=args.load_format, tokenizer=tokenizer,
              max_num_seqs=max(batches + [2]), max_model_len=args.prompt_len + args.steps + 64, grammar_backend=args.grammar_backend,
              async_scheduling=async_scheduling)
    measure(llm, 2, True, args.prompt_len, 4)  # warm-up: compile the grammar, Triton, graphs
    measure(llm, 2, False, args.prompt_len, 4)
    rows = []
    for batch in batches:
        plain = measure(llm, batch, False, args.prompt_len, args.steps)
        masked = measure(llm, batch, True, args.prompt_len, args.steps)
        overhead = masked["step_ms"] / plain["step_ms"] - 1
        rows.append({"batch": batch, "unconstrained_ms": plain["step_ms"],
                     "constrained_ms": masked["step_ms"], "overhead": overhead,
                     "steps": [plain["steps"], masked["steps"]], "masked_mean_batch": masked["mean_batch"],
                     "masked_errors": masked["errors"]})
    result = {"benchmark": "grammar_step", "model": model, "device": device_name(),
              "vocab": llm.engine.arch.vocab_size, "backend": args.grammar_backend,
              "async_scheduling": llm.engine.async_scheduling, "rows": rows}
    print(f"grammar mask overhead per decode step on {result['device']} (vocab {result['vocab']}, async "
          f"scheduling {'on' if result['async_scheduling'] else 'off'}; issue #16 target: < 5% at batch 64)")
    print(f"  {'batch':>5}  {'plain ms':>9}  {'masked ms':>9}  {'overhead':>8}")
    for r in rows:
        print(f"  {r['batch']:>5}  {r['unconstrained_ms']:>9.2f}  {r['constrained_ms']:>9.2f}  {r['overhead'] * 100:>7.1f}%")
    write_json(result, args.out, "grammar_step")
    if args.record:
        append_result("grammar_step", command_line("grammar_step.py", argv),
                      "; ".join(f"batch {r['batch']}: {r['unconstrained_ms']:.2f} -> {r['constrained_ms']:.2f} ms "
                                f"({r['overhead'] * 100:+.1f}%)" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
