"""GPU multi-LoRA (`pytest -m gpu`): the engine on CUDA with the Triton SGMV kernels against PEFT's
merged model (fp32: identical greedy tokens; bf16: vLLM's logprobs-close rule) with more adapters than
slots; decode CUDA graphs with LoRA (persistent slot-index buffer) give the same tokens as eager
mode, and base-only decode steps replay the graphs captured without LoRA; slot loads on the side
stream are ordered after the step that last read the slot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import ARCHS, tiny_model_cached
from agentserve.worker.cuda_graph import DecodeGraphs
from helpers.lora import ALL_MODULES, build_peft_adapter
from helpers.logprobs_close import assert_close_greedy, greedy_result, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

NEW_TOKENS = 24
TEXTS = ["The quick brown fox", "In a distant galaxy, a small robot named",
         "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
CONFIGS: dict[str, dict[str, Any]] = {
    "r8-all": dict(r=8, lora_alpha=16, target_modules=list(ALL_MODULES)),
    "r16-qv": dict(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "r32-mlp": dict(r=32, lora_alpha=64, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "r64-ko": dict(r=64, lora_alpha=32, use_rslora=True, target_modules=["k_proj", "o_proj"]),
}
Result = tuple[list[list[int]], list[list[dict[int, float]]]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("peft")
    return {arch: {name: build_peft_adapter(tiny_model_cached(arch), root / arch / name, seed=i + 1, **cfg)
                   for i, (name, cfg) in enumerate(CONFIGS.items())} for arch in ARCHS}


def _requests(tok: Any) -> tuple[list[list[int]], list[Optional[str]]]:
    prompts = [tok.encode(t) for t in TEXTS]
    names: list[Optional[str]] = [None, *CONFIGS]
    return [p for _ in names for p in prompts], [n for n in names for _ in prompts]


def run_engine(arch: str, adapters: dict[str, Path], dtype: str, max_num_seqs: int = 16, **kw: Any) -> Result:
    llm = LLM(str(tiny_model_cached(arch)), device="cuda", dtype=dtype, max_num_seqs=max_num_seqs, max_model_len=512,
              gpu_memory_utilization=0.3, enable_lora=True, max_loras=2, max_lora_rank=64,
              lora_modules={n: str(p) for n, p in adapters.items()}, **kw)
    try:
        prompts, names = _requests(llm.tokenizer)
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True,
                                                    logprobs=5), adapter=names)
        assert llm.engine.lora_manager is not None and llm.engine.lora_manager.num_slot_loads > 2
        return greedy_result(outs)
    finally:
        llm.close()


def peft_run(arch: str, adapters: dict[str, Path], dtype: torch.dtype) -> Result:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_cached(arch)
    prompts, names = _requests(AutoTokenizer.from_pretrained(base))
    ids: list[list[int]] = []
    lps: list[list[dict[int, float]]] = []
    for name in dict.fromkeys(names):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        if name is not None:
            model = PeftModel.from_pretrained(model, str(adapters[name])).merge_and_unload()
        model = model.cuda().eval()
        for prompt, n in zip(prompts, names):
            if n != name:
                continue
            tokens, steps = hf_greedy(model, prompt, NEW_TOKENS)
            ids.append(tokens)
            lps.append(steps)
    return ids, lps


@pytest.mark.parametrize("arch", ARCHS)
def test_fp32_matches_peft_merged(arch: str, dirs: dict[str, dict[str, Path]]) -> None:
    ours = run_engine(arch, dirs[arch], "float32")
    ref = peft_run(arch, dirs[arch], torch.float32)
    assert ours[0] == ref[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logprobs_close_to_peft_merged(arch: str, dirs: dict[str, dict[str, Path]]) -> None:
    ours = run_engine(arch, dirs[arch], "bfloat16")
    ref = peft_run(arch, dirs[arch], torch.bfloat16)
    exact = sum(a == b for a, b in zip(ref[0], ours[0]))
    print(f"{arch} bf16 LoRA vs PEFT: {exact}/{len(ref[0])} sequences identical")
    assert_close_greedy(ref, ours, f"{arch} bf16 LoRA")


@pytest.mark.parametrize("arch", ["llama3", "qwen3"])
def test_cuda_graphs_with_lora_match_eager(arch: str, dirs: dict[str, dict[str, Path]],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    replays: list[bool] = []
    real_run = DecodeGraphs.run

    def recording(self: DecodeGraphs, *args: Any) -> torch.Tensor:
        replays.append(len(args) > 6 and args[6] is not None)  # lora_slot_indices given: the LoRA graph
        return real_run(self, *args)

    monkeypatch.setattr(DecodeGraphs, "run", recording)
    graphs = run_engine(arch, dirs[arch], "float32")
    assert any(replays), "no decode step replayed a LoRA graph"
    eager = run_engine(arch, dirs[arch], "float32", enforce_eager=True)
    assert graphs[0] == eager[0]


def test_base_only_decode_replays_the_base_graph(dirs: dict[str, dict[str, Path]],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    replays: list[Optional[torch.Tensor]] = []
    real_run = DecodeGraphs.run

    def recording(self: DecodeGraphs, *args: Any) -> torch.Tensor:
        replays.append(args[6] if len(args) > 6 else None)
        return real_run(self, *args)

    monkeypatch.setattr(DecodeGraphs, "run", recording)
    llm = LLM(str(tiny_model_cached("qwen2")), device="cuda", dtype="bfloat16", max_num_seqs=8,
              max_model_len=512, gpu_memory_utilization=0.3, enable_lora=True, max_loras=2, max_lora_rank=16,
              lora_modules={"a": str(dirs["qwen2"]["r8-all"])})
    try:
        graphs = llm.engine.runner.graphs
        assert graphs is not None and graphs.lora_slots is not None
        assert {k[2] for k in graphs.graphs} == {False, True}  # both captured
        llm.generate(TEXTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
        assert replays and all(r is None for r in replays)
        replays.clear()
        llm.generate(TEXTS, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), adapter=[None, "a", None])
        # One adapter row among base rows, in every decode step: one slot >= 0, two -1.
        assert replays and all(r is not None and sorted(r.tolist())[:2] == [-1, -1] and int(r.max()) >= 0
                               for r in replays)
    finally:
        llm.close()


def test_slot_reload_waits_for_the_step_reading_it(dirs: dict[str, dict[str, Path]]) -> None:
    """One slot, two adapters alternating every step: each step's slot load must wait for the step
    before (still reading the slot) and the step must wait for its load. Output equals running each
    adapter alone."""
    base = str(tiny_model_cached("llama"))
    adapters = {"a": str(dirs["llama"]["r8-all"]), "b": str(dirs["llama"]["r64-ko"])}
    kw: dict[str, Any] = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=512,
                              gpu_memory_utilization=0.3, enable_lora=True, max_loras=1, max_lora_rank=64,
                              lora_modules=adapters)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm = LLM(base, **kw)
    try:
        prompt = llm.tokenizer.encode(TEXTS[2])
        alone = {n: list(llm.generate([prompt], params, adapter=n)[0].outputs[0].token_ids) for n in adapters}
        engine = llm.engine
        engine.add_request("a", prompt, params, lora_name="a")
        engine.add_request("b", prompt, params, lora_name="b")
        done: dict[str, list[int]] = {}
        while engine.has_unfinished():  # max_loras=1: a runs to the end, then b (admission waits)
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = list(out.outputs[0].token_ids)
        assert done == alone
        manager = engine.lora_manager
        assert manager is not None
        loads_before = manager.num_slot_loads
        for _ in range(3):  # alternate: every generate swaps the slot while the last step may still run
            for n in adapters:
                assert list(llm.generate([prompt], params, adapter=n)[0].outputs[0].token_ids) == alone[n]
        assert manager.num_slot_loads >= loads_before + 6
    finally:
        llm.close()
