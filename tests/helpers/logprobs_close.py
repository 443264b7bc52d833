"""vLLM's check_logprobs_close rule for greedy runs that may round differently (bf16, another GEMM
algorithm, graphs vs eager): tokens identical until the first difference, where each run's token
must be in the other's top-n logprobs; nothing after that point is compared."""

from __future__ import annotations

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
