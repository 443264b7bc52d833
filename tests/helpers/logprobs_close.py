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
    """transformers' greedy continuation of `prompt` on the model's device (exactly new_tokens tokens,
    past any EOS, as the engine's ignore_eos) and each position's top-n {token: logprob}, for the same
    comparison. A plain forward loop over the model's own KV cache: generate() with min_new_tokens
    would mask the EOS logit (a different argmax where EOS leads), and it takes no eos_token_id of None."""
    ids = torch.tensor([prompt], device=model.device)
    past = None
    tokens: list[int] = []
    steps = []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
            past = out.past_key_values
            logprobs = out.logits[0, -1].float().log_softmax(-1)
            values, idx = logprobs.topk(top_n)
            steps.append(dict(zip(idx.tolist(), values.tolist())))
            tokens.append(int(logprobs.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]], device=model.device)], dim=1)
    return tokens, steps
