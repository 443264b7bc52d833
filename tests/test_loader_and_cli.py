"""Loading variants (sharded checkpoints, dummy weights, dtypes), the priority policy, abort at
any point, and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentserve import SamplingParams
from agentserve.llm import LLM
from agentserve.testing import make_tiny_model, tiny_model_cached

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def test_sharded_checkpoint_loads_like_single_file() -> None:
    single = LLM(str(tiny_model_cached("llama3")), device="cpu").generate(["Sharded weights"], GREEDY)
    sharded = LLM(str(tiny_model_cached("llama3", shards=3)), device="cpu").generate(["Sharded weights"], GREEDY)
    assert sharded[0].outputs[0].token_ids == single[0].outputs[0].token_ids


def test_missing_shard_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = make_tiny_model(tmp_path / "m", arch="qwen2", shards=2)
    shard = sorted(path.glob("*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=shard.name):
        LLM(str(path), device="cpu")


def test_dummy_weights_for_a_config() -> None:
    llm = LLM(str(tiny_model_cached("qwen3")), device="cpu", load_format="dummy")
    out = llm.generate([[5, 6, 7, 8]], GREEDY)[0].outputs[0]
    assert len(out.token_ids) == 16
    with pytest.raises(ValueError, match="unknown model shape 'no-such-shape'"):
        LLM("no-such-shape", device="cpu", load_format="dummy")


@pytest.mark.parametrize(("config_dtype", "bf16", "served"), [
    ("float32", True, torch.bfloat16), ("float32", False, torch.float16), (None, True, torch.bfloat16),
    ("float16", True, torch.float16), ("bfloat16", False, torch.bfloat16)])
def test_auto_dtype_on_cuda_serves_fp32_checkpoints_in_half(monkeypatch: pytest.MonkeyPatch, config_dtype: object,
                                                            bf16: bool, served: torch.dtype) -> None:
    """vLLM's 'auto': a float32 (or unnamed) checkpoint runs in the GPU's preferred half type; the CPU keeps fp32."""
    from agentserve.model.arch_config import ArchConfig
    from agentserve.model.loader import resolve_dtype
    arch = ArchConfig.from_dir(tiny_model_cached("llama3"))
    arch.torch_dtype = config_dtype  # type: ignore[assignment]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_dtype("auto", arch, torch.device("cuda")) == served
    assert resolve_dtype("auto", arch, torch.device("cpu")) == torch.float32
    assert resolve_dtype("float32", arch, torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_load_and_run(dtype: str) -> None:
    llm = LLM(str(tiny_model_cached("mistral")), device="cpu", dtype=dtype)
    assert llm.engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert len(llm.generate(["Half precision"], GREEDY)[0].outputs[0].token_ids) == 16


def test_priority_policy_serves_lower_priority_values_first() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", policy="priority", max_num_seqs=1)
    engine = llm.engine
    for rid, prio in (("low", 5), ("high", 0), ("mid", 2)):
        engine.add_request(rid, "Priority test", GREEDY.clone(max_tokens=4), priority=prio)
    order = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "mid", "low"]


def test_abort_at_any_point_frees_pages() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", max_num_batched_tokens=8, block_size=4)
    engine = llm.engine
    for steps in range(0, 12, 3):  # waiting, mid-prefill, decoding
        engine.add_request("a", "A prompt long enough to need several prefill chunks here", GREEDY)
        engine.add_request("b", "Another one", GREEDY)
        for _ in range(steps):
            engine.step()
        assert engine.abort("a") and engine.abort("b")
        assert not engine.abort("a")  # unknown now
        assert not engine.has_unfinished()
        engine.pool.check_all_free()


def test_cli_generate_and_tiny_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "tiny"
    run = subprocess.run([sys.executable, "-m", "agentserve.cli", "tiny-model", str(model), "--arch", "qwen3"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "agentserve.cli", "generate", "--model", str(model), "--device", "cpu",
                          "--prompt", "Hello", "--max-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "output:" in run.stdout and "tok/s" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "agentserve.cli", "generate", "--model", str(model), "--device", "cpu",
                          "--prompt", "x", "--max-num-seqs", "0"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_num_seqs" in bad.stderr


@pytest.mark.parametrize("module", ["agentserve.cli", "agentserve"])
def test_cli_runs_from_the_repository_root_on_any_python(module: str) -> None:
    """`python -m agentserve.cli` (or `python -m agentserve`) in a checkout, without -P / PYTHONSAFEPATH
    (Python 3.10 has neither): the working directory's kernels/ must not shadow the `kernels` package
    transformers >= 5.25 imports while loading a Llama tokenizer."""
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    run = subprocess.run([sys.executable, "-m", module, "generate", "--model", str(tiny_model_cached("llama")),
                          "--device", "cpu", "--prompt", "Hello", "--max-tokens", "3"], capture_output=True, text=True,
                         timeout=120, cwd=root, env=env)
    assert run.returncode == 0, run.stderr
    assert "output:" in run.stdout
