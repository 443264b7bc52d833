"""Real acceptance of speculative decoding on a real model (CPU is enough): SmolLM2-135M-Instruct.

Two workloads, greedy, and each checked against the same run without speculation (identical tokens):
  - agent: the model is handed a tool result (a JSON record and a short file) and asked to repeat /
    summarise it back, as agents do with tool outputs; proposer: n-gram prompt lookup;
  - text: plain chat questions; proposer: a draft made by truncating SmolLM2 to its first layers
    (same vocabulary and tokenizer, no training) and, for comparison, n-gram lookup.
Reported per (workload, proposer): acceptance rate, mean accepted length (tokens a verification row
emits), tokens per engine step with and without speculation.

  python benchmarks/spec_acceptance.py [--draft-layers 8] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, write_json  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.testing.drafts import first_layers_copy  # noqa: E402
from agentserve.testing.real import cache_root, smollm2_cached  # noqa: E402

RECORD = {"id": "ord-20931", "customer": "Ada Lovelace", "items": [{"sku": "KB-88", "qty": 2}, {"sku": "MS-12",
          "qty": 1}], "status": "shipped", "carrier": "DHL", "tracking": "JD014600003828"}
FILE = "def total(items):\n    return sum(item['qty'] * item['price'] for item in items)\n"
AGENT = [
    [{"role": "user", "content": "Look up order ord-20931."},
     {"role": "assistant", "content": "Calling get_order."},
     {"role": "user", "content": f"Tool result: {json.dumps(RECORD)}\nRepeat the order record exactly, as JSON."}],
    [{"role": "user", "content": f"Here is utils.py:\n{FILE}\nRewrite the file exactly, then say what it does."}],
    [{"role": "user", "content": f"The tracking API returned: {json.dumps(RECORD)}. Tell the customer, by name, "
      "their carrier and tracking number."}],
]
TEXT = [
    [{"role": "user", "content": "What is the capital of France? Answer in two sentences."}],
    [{"role": "user", "content": "Give three tips for writing clear emails."}],
    [{"role": "user", "content": "Explain what a hash map is to a beginner."}],
]


def run(model: str, conversations: list[Any], max_tokens: int, **spec: Any) -> dict[str, Any]:
    llm = LLM(model, device="cpu", dtype="float32", spec_dynamic=False, **spec)
    prompts = [llm.render_chat(c) for c in conversations]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    steps = 0
    llm.engine.emit_unfinished = False
    for i, p in enumerate(prompts):
        llm.engine.add_request(f"r{i}", p, params)
    outputs: dict[str, list[int]] = {}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
        steps += 1
    m = llm.engine.metrics
    result = dict(tokens=[outputs[f"r{i}"] for i in range(len(prompts))], steps=steps,
                  generated=sum(len(t) for t in outputs.values()), drafts=m.spec_num_drafts,
                  draft_tokens=m.spec_num_draft_tokens, accepted=m.spec_num_accepted_tokens,
                  acceptance=m.spec_acceptance_rate, mean_accepted_length=m.spec_mean_accepted_length)
    llm.close()
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--fp8-draft", action="store_true",
                    help="also the truncated draft and the whole model as drafts with draft_quantization=fp8 (their "
                         "lm_head included): what an FP8 draft costs in acceptance")
    ap.add_argument("--out", default=None)
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args(argv)
    model_dir = smollm2_cached()
    draft = first_layers_copy(model_dir, args.draft_layers, cache_root())
    k = args.num_speculative_tokens
    cases = [("agent", AGENT, "ngram", dict(speculative_method="ngram", num_speculative_tokens=k)),
             ("agent", AGENT, f"first {args.draft_layers} layers", dict(draft_model=str(draft), num_speculative_tokens=k)),
             ("text", TEXT, "ngram", dict(speculative_method="ngram", num_speculative_tokens=k)),
             ("text", TEXT, f"first {args.draft_layers} layers", dict(draft_model=str(draft), num_speculative_tokens=k))]
    if args.fp8_draft:
        for workload, convs in (("agent", AGENT), ("text", TEXT)):
            cases += [(workload, convs, f"first {args.draft_layers} layers, fp8",
                       dict(draft_model=str(draft), draft_quantization="fp8", num_speculative_tokens=k)),
                      (workload, convs, "whole model, fp8",
                       dict(draft_model=str(model_dir), draft_quantization="fp8", num_speculative_tokens=k))]
    plain = {name: run(str(model_dir), convs, args.max_tokens) for name, convs in (("agent", AGENT), ("text", TEXT))}
    rows = []
    print("| workload | proposer | identical | acceptance | mean accepted length | tokens/step (plain -> spec) |")
    print("|---|---|---|---|---|---|")
    for workload, convs, proposer, spec in cases:
        r = run(str(model_dir), convs, args.max_tokens, **spec)
        base = plain[workload]
        same = r["tokens"] == base["tokens"]
        row = dict(workload=workload, proposer=proposer, identical=same, acceptance=r["acceptance"],
                   mean_accepted_length=r["mean_accepted_length"], tokens_per_step_plain=base["generated"] / base["steps"],
                   tokens_per_step_spec=r["generated"] / r["steps"])
        rows.append(row)
        print(f"| {workload} | {proposer} | {same} | {r['acceptance']:.2f} | {r['mean_accepted_length']:.2f} | "
              f"{row['tokens_per_step_plain']:.2f} -> {row['tokens_per_step_spec']:.2f} |")
    write_json({"k": k, "rows": rows}, args.out, "spec_acceptance")
    if args.record:
        append_result("spec_acceptance", command_line("spec_acceptance.py", argv),
                      "; ".join(f"{r['workload']}/{r['proposer']}: acceptance {r['acceptance']:.2f}, "
                                f"mean accepted length {r['mean_accepted_length']:.2f}, identical {r['identical']}"
                                for r in rows))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
