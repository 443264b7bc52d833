"""GPU: tensor parallelism over NCCL on two GPUs of one host. Greedy outputs at tensor_parallel_size=2
are those of one GPU on the tiny models (bf16: the sums run in another order, so the tokens are
compared on short outputs where bf16 ties are unlikely), each rank holds half the KV heads, and
close() frees the second GPU. Every rank captures decode CUDA graphs (their all-reduces and the
logits gather run inside them) and replays the size rank 0 picks: the tokens are those of eager steps,
with LoRA adapters too. Run with `pytest -m gpu`; skipped unless two GPUs are visible."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.parallel.driver import TensorParallelDriver
from agentserve.testing import ARCHS, tiny_model_cached
from agentserve.worker.cuda_graph import DecodeGraphs
from helpers.lora import ALL_MODULES, build_peft_adapter

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs two CUDA devices")]

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [8, 9, 10, 11] * 6, [300, 301, 5] * 9 + [7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = dict(dtype="float32", gpu_memory_utilization=0.3)


@pytest.mark.parametrize("arch", ARCHS)
def test_two_gpus_give_the_one_gpu_greedy_tokens(arch: str) -> None:
    path = str(tiny_model_cached(arch))
    with LLM(path, **ENGINE) as llm:
        one = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    with LLM(path, **ENGINE, tensor_parallel_size=2) as llm:
        two = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
        driver = llm.engine.runner.parallel
        assert isinstance(driver, TensorParallelDriver)
        assert llm.engine.runner.kv_heads_per_rank == llm.engine.arch.num_kv_heads // 2
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        workers = driver.processes
    assert two == one
    assert [p.exitcode for p in workers] == [0]


def test_dummy_8b_shape_runs_at_tp2() -> None:
    with LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=1024,
             tensor_parallel_size=2) as llm:
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
        assert len(out[0].outputs[0].token_ids) == 16
        # Half of the 8 KV heads per rank: each rank's KV pool holds pages of 4 heads.
        assert llm.engine.runner.kv_cache.layers[0][0].shape[2] == 4


def _tp2_tokens(path: str, adapters: Optional[list[Optional[str]]] = None, **kw: Any) -> tuple[list[list[int]], bool]:
    """Greedy tokens of every prompt under each adapter (None: base) at TP 2, and whether rank 0 captured graphs."""
    names = adapters or [None]
    with LLM(path, **ENGINE, tensor_parallel_size=2, **kw) as llm:
        outs = llm.generate([p for _ in names for p in PROMPTS], GREEDY, adapter=[n for n in names for _ in PROMPTS])
        return [o.outputs[0].token_ids for o in outs], llm.engine.runner.graphs is not None


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_graphs_on_every_rank_match_eager_steps(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tiny_model_cached(arch))
    replays: list[int] = []
    real_run = DecodeGraphs.run

    def recording(self: DecodeGraphs, *args: Any) -> torch.Tensor:
        replays.append(args[0].shape[0])
        return real_run(self, *args)

    monkeypatch.setattr(DecodeGraphs, "run", recording)  # rank 0's replays (the worker replays the same)
    graphs, captured = _tp2_tokens(path)
    assert captured and replays
    eager, captured_eager = _tp2_tokens(path, enforce_eager=True)
    assert not captured_eager
    assert graphs == eager


def test_lora_decode_graphs_at_tp2_match_eager(tmp_path: Path) -> None:
    base = tiny_model_cached("llama")
    dirs = {"all": build_peft_adapter(base, tmp_path / "all", seed=1, scale=3.0, r=8, lora_alpha=16,
                                      target_modules=list(ALL_MODULES)),
            "kod": build_peft_adapter(base, tmp_path / "kod", seed=2, scale=3.0, r=4, lora_alpha=8,
                                      target_modules=["k_proj", "o_proj", "down_proj"])}
    kw: dict[str, Any] = dict(enable_lora=True, max_lora_rank=16, max_loras=2,
                              lora_modules={n: str(p) for n, p in dirs.items()})
    names: list[Optional[str]] = [None, "all", "kod"]
    graphs, captured = _tp2_tokens(str(base), names, **kw)
    eager, _ = _tp2_tokens(str(base), names, enforce_eager=True, **kw)
    assert captured
    assert graphs == eager
    n = len(PROMPTS)
    assert graphs[n:2 * n] != graphs[:n]  # the adapter changes the tokens


def test_fp8_weights_and_kv_cache_run_at_tp2() -> None:
    """W8A8 quantizes a row-parallel layer's activations per token over this rank's columns (as vLLM
    does), so tokens are not compared with one GPU; the weights, scales and pages are checked."""
    with LLM(str(tiny_model_cached("llama")), **ENGINE, quantization="fp8", kv_cache_dtype="fp8",
             tensor_parallel_size=2) as llm:
        out = llm.generate(PROMPTS, GREEDY)
        assert all(len(o.outputs[0].token_ids) == GREEDY.max_tokens for o in out)
        runner = llm.engine.runner
        assert runner.kv_cache.layers[0][0].dtype == torch.float8_e4m3fn
        o_proj = runner.model.layers[0].self_attn.o_proj
        assert o_proj.weight.dtype == torch.float8_e4m3fn
        assert o_proj.weight_scale.shape[0] == llm.engine.arch.hidden_size  # row-parallel: every output's scale
