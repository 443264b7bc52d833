"""GPU: the device's batch defaults (engine/batch_defaults.py) and decode steps above the largest captured
CUDA graph, which run eagerly. Run with `pytest -m gpu`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agentserve import SamplingParams
from agentserve.engine.batch_defaults import batch_defaults_for
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from agentserve.worker.cuda_graph import MAX_CAPTURE_SIZE

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_the_engine_takes_the_device_defaults_and_keeps_explicit_values() -> None:
    props = torch.cuda.get_device_properties(0)
    expected = batch_defaults_for(props.total_memory, props.name) or {"max_num_seqs": 256, "max_num_batched_tokens": 2048}
    path = str(tiny_model_cached("llama3"))
    llm = LLM(path, device="cuda", dtype="float32", max_model_len=256, gpu_memory_utilization=0.3)
    scheduler = llm.engine.scheduler.config
    assert {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens} == expected
    assert llm.engine.runner.graphs is not None
    assert llm.engine.runner.graphs.sizes[-1] == min(expected["max_num_seqs"], MAX_CAPTURE_SIZE)
    llm.close()
    explicit = LLM(path, device="cuda", dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, max_num_seqs=16)
    assert explicit.engine.scheduler.config.max_num_seqs == 16
    explicit.close()


def test_decode_steps_above_the_captured_sizes_run_eagerly_and_agree() -> None:
    """600 rows decode together (eager: above MAX_CAPTURE_SIZE); the first prompts' greedy tokens equal those of
    an engine that decodes them in a captured graph of 8 rows (fp32: no bf16 rounding differences)."""
    path = str(tiny_model_cached("llama3"))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 200, size=int(n)).tolist() for n in rng.integers(4, 24, size=600)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    wide = LLM(path, device="cuda", dtype="float32", max_model_len=256, gpu_memory_utilization=0.3,
               max_num_seqs=640, max_num_batched_tokens=16384)
    assert wide.engine.runner.graphs is not None and wide.engine.runner.graphs.padded_size(600) is None
    wide_tokens = [o.outputs[0].token_ids for o in wide.generate(prompts, params)]
    assert wide.engine.metrics.num_preemptions_total == 0
    wide.close()
    narrow = LLM(path, device="cuda", dtype="float32", max_model_len=256, gpu_memory_utilization=0.3, max_num_seqs=8)
    narrow_tokens = [o.outputs[0].token_ids for o in narrow.generate(prompts[:16], params)]
    narrow.close()
    assert wide_tokens[:16] == narrow_tokens
