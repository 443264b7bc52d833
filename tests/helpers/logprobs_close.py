"""vLLM's check_logprobs_close rule for greedy runs that may round differently (bf16, another GEMM
algorithm, graphs vs eager): tokens identical until the first difference, where each run's token
must be in the other's top-n logprobs; nothing after that point is compared."""

from __future__ import annotations

from typing import Any, Sequence

import torch

# (token ids per request, top-n {token: logprob} per position per request)
Result = tuple[list[list[int]], list[list[dict[int, float]]]]


def assert_close_greedy(ref: Result, got: Result, what: str) -> None:
    assert len(ref[0]) == len(got[0]), f"{what}: {len(ref[0])} vs {len(got[0])} requests"
    for i, (ref_ids, ids) in enumerate(zip(ref[0], got[0])):
        for pos, (a, b) in enumerate(zip(ref_ids, ids)):
            if a != b:
                assert b in ref[1][i][pos] and a in got[1][i][pos], \
                    f"{what} request {i}: diverged at {pos} outside the top-n ({a} vs {b})"
                break


def greedy_result(outs: Sequence[Any]) -> Result:
    """Our RequestOutputs (requested with logprobs=n) as a Result: first completion's tokens and,
    per position, its top-n {token: logprob}."""
    return ([list(o.outputs[0].token_ids) for o in outs],
            [[{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs] for o in outs])


def hf_greedy(model: Any, prompt: list[int], new_tokens: int, top_n: int = 5) -> tuple[list[int], list[dict[int, float]]]:
    """transformers' greedy continuation of `prompt` on the model's device (exactly new_tokens
    tokens) and each position's top-n {token: logprob}, for the same comparison."""
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    steps = []
    for logits in gen.logits:
        values, idx = logits[0].float().log_softmax(-1).topk(top_n)
        steps.append(dict(zip(idx.tolist(), values.tolist())))
    return gen.sequences[0, len(prompt):].tolist(), steps
