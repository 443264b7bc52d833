"""The padded layout of verification and catch-up CUDA graphs (rows of q tokens, padding with slot -1 at
positions past the row's) gives the real tokens exactly the hidden states of the unpadded ragged
forward: causal attention keeps the padding out of every real query's context. Checked on the CPU
through the torch reference attention (the graphs replay the same forward on the GPU)."""

from __future__ import annotations

import torch

from agentserve.llm import LLM
from agentserve.spec.draft_inputs import DraftRun, build_draft_inputs, build_padded_inputs
from agentserve.testing import tiny_model_cached


def test_padded_rows_match_the_ragged_forward() -> None:
    llm = LLM(str(tiny_model_cached("qwen3")), device="cpu", dtype="float32", num_blocks=64, block_size=4)
    runner = llm.engine.runner
    model, layers = runner.model, runner.kv_cache.layers
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (13, 9, 6)]
    tables = [list(range(0, 4)), list(range(8, 11)), list(range(16, 18))]
    prefix = [10, 8, 3]  # tokens already in the cache; the rest are this step's (1 to 3 per row)
    with torch.inference_mode():
        ids, pos, meta, _ = build_draft_inputs([DraftRun(s[:p], 0, t) for s, p, t in zip(seqs, prefix, tables)], 4,
                                               torch.device("cpu"))
        model(ids, pos, layers, meta)
        runs = [DraftRun(s[p:], p, t) for s, p, t in zip(seqs, prefix, tables)]
        ids, pos, meta, _ = build_draft_inputs(runs, 4, torch.device("cpu"))
        ragged = model(ids, pos, layers, meta)
        for q in (3, 5):
            padded = build_padded_inputs(runs, q, 4, llm.engine.max_model_len, torch.device("cpu"))
            meta = type(meta)(slot_mapping=padded.slot_mapping, block_tables=padded.block_tables,
                              query_start_loc=torch.arange(len(runs) + 1, dtype=torch.int32) * q,
                              seq_lens=padded.seq_lens, max_query_len=q, max_seq_len=int(padded.seq_lens.max()))
            hidden = model(padded.input_ids, padded.positions, layers, meta)
            torch.testing.assert_close(hidden.index_select(0, padded.real_index), ragged, rtol=1e-5, atol=1e-5)
            assert padded.last_index.tolist() == [2, q, 2 * q + 2]
    llm.close()
