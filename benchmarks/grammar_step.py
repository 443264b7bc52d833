"""Per-step overhead of grammar masks: decode step time with JSON-schema-constrained requests
against the same batch unconstrained, at batch 1 and 64.

  python benchmarks/grammar_step.py                      # CPU, tiny model
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, device_name, write_json  # noqa: E402

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


def measure(llm: LLM, batch: int, constrained: bool, prompt_len: int, steps: int) -> dict[str, Any]:
    engine = llm.engine
    rng = np.random.default_rng(batch)
    vocab = min(engine.arch.vocab_size - 10, 30000)
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=steps + 8, ignore_eos=not constrained,
                            json_schema=SCHEMA if constrained else None)
    for i in range(batch):
        engine.add_request(f"{'c' if constrained else 'u'}{batch}-{i}", rng.integers(10, vocab, size=prompt_len).tolist(),
                           params.clone(seed=i))
    times: list[float] = []
    sizes: list[int] = []
    errors: list[str] = []
    while engine.has_unfinished():
        running = engine.scheduler.running
        # Steady decode steps only; constrained outputs may end early, so the batch may shrink a little.
        decode_only = (not engine.scheduler.waiting and len(running) >= max(1, int(batch * 0.9))
                       and all(r.num_computed_tokens == r.num_tokens - 1 for r in running))
        n = len(running)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = engine.step()
        elapsed = time.perf_counter() - start
        errors += [o.error for o in outs if o.error]
        if decode_only and len(times) < steps:
            times.append(elapsed * 1000)
            sizes.append(n)
    if errors:
        print(f"  {len(errors)} requests failed, e.g.: {errors[0]}")
    for rid in list(engine.groups):
        engine.abort(rid)
    return {"step_ms_median": statistics.median(times) if times else float("nan"), "steps": len(times),
            "mean_batch": statistics.mean(sizes) if sizes else 0.0, "errors": len(errors)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (dummy models: a synthetic one is built)")
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--grammar-backend", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    model, tokenizer = args.model, args.tokenizer
    if model is None:
        from agentserve.testing import tiny_model_cached

        model = str(tiny_model_cached("qwen2"))
    elif args.load_format == "dummy" and tokenizer is None:
        tokenizer = str(synthetic_tokenizer(args.vocab, Path(tempfile.mkdtemp(prefix="agentserve-tok-"))))
    llm = LLM(model, dtype=args.dtype, load_format=args.load_format, tokenizer=tokenizer, max_num_seqs=64,
              max_model_len=args.prompt_len + args.steps + 64, grammar_backend=args.grammar_backend)
    batches = [int(b) for b in args.batches.split(",")]
    measure(llm, 2, True, args.prompt_len, 4)  # warm-up: compile the grammar, Triton, graphs
    measure(llm, 2, False, args.prompt_len, 4)
    rows = []
    for batch in batches:
        plain = measure(llm, batch, False, args.prompt_len, args.steps)
        masked = measure(llm, batch, True, args.prompt_len, args.steps)
        overhead = masked["step_ms_median"] / plain["step_ms_median"] - 1
        rows.append({"batch": batch, "unconstrained_ms": plain["step_ms_median"],
                     "constrained_ms": masked["step_ms_median"], "overhead": overhead,
                     "steps": [plain["steps"], masked["steps"]], "masked_mean_batch": masked["mean_batch"],
                     "masked_errors": masked["errors"]})
    result = {"benchmark": "grammar_step", "model": model, "device": device_name(),
              "vocab": llm.engine.arch.vocab_size, "backend": args.grammar_backend, "rows": rows}
    print(f"grammar mask overhead per decode step on {result['device']} (vocab {result['vocab']})")
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
