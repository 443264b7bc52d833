"""The benchmarks' shared helpers, without running a benchmark: where the ceilings come from
(benchmarks/ceilings.py: measured, the table of known GPUs, the table when measuring runs out of
memory) and the KV release before the transformers peer (benchmarks/throughput.py)."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path
from typing import NoReturn

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ceilings  # noqa: E402
from ceilings import KNOWN_DEVICES, device_ceilings  # noqa: E402
from limits import ModelWork  # noqa: E402
from throughput import release_kv_for_peer  # noqa: E402

from agentserve.llm import LLM  # noqa: E402
from agentserve.model.arch_config import ArchConfig  # noqa: E402
from agentserve.model.llama import CausalLM  # noqa: E402
from agentserve.testing import tiny_model_cached  # noqa: E402
from agentserve.testing.tiny import NAMED_SHAPES  # noqa: E402

CPU = torch.device("cpu")


def pretend_device_is(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setattr(ceilings, "device_label", lambda device: name)


def llama_8b_work() -> ModelWork:
    arch = ArchConfig.from_dict(NAMED_SHAPES["llama-3.1-8b"])
    with torch.device("meta"):
        model = CausalLM(arch).to(torch.bfloat16)
    return ModelWork.from_model(model, arch, torch.bfloat16)


def test_the_table_gives_the_h200s_measured_ceilings_and_issue_16s_one_stream_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_device_is(monkeypatch, "NVIDIA H200")
    c = device_ceilings(CPU, torch.bfloat16, source="table")
    # shared/gpu/README.md: copy 4.26 TB/s, bf16 8192^3 matmul 806 TFLOP/s.
    assert (c.copy_bytes_s, c.matmul_flop_s) == (4.26e12, 806e12)
    assert c.source.startswith("table: H200") and "2026-12-02" in c.source and c.source in c.describe()
    # Issue #16: ~284 tok/s one stream for dummy Llama-3.1-8B bf16 (128 prompt, 256 new).
    assert llama_8b_work().single_stream_tok_s(c.copy_bytes_s, 128, 256) == pytest.approx(284, rel=0.01)


def test_the_h100_is_in_the_table_with_its_own_lower_ceilings(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_device_is(monkeypatch, "NVIDIA H100 80GB HBM3")
    h100 = device_ceilings(CPU, torch.bfloat16, source="table")
    h200 = KNOWN_DEVICES["NVIDIA H200"]
    assert h100.copy_bytes_s < h200.copy_bytes_s and h100.matmul_flop_s < h200.matmul_flop_s
    assert "H100" in h100.source


@pytest.mark.parametrize("name, dtype", [("CPU", torch.bfloat16), ("NVIDIA H100 PCIe", torch.bfloat16),
                                         ("NVIDIA H200", torch.float32)])
def test_no_table_figures_for_an_unknown_device_or_dtype(monkeypatch: pytest.MonkeyPatch, name: str,
                                                        dtype: torch.dtype) -> None:
    pretend_device_is(monkeypatch, name)
    with pytest.raises(LookupError, match="measure them instead"):
        device_ceilings(CPU, dtype, source="table")


def test_measured_ceilings_are_used_and_name_the_table_beside_them(monkeypatch: pytest.MonkeyPatch) -> None:
    pretend_device_is(monkeypatch, "NVIDIA H200")
    monkeypatch.setattr(ceilings, "measure_copy_bytes_s", lambda device, nbytes, repeats: 4.0e12)
    monkeypatch.setattr(ceilings, "measure_matmul_flop_s", lambda device, n, dtype, repeats: 700e12)
    c = device_ceilings(CPU, torch.bfloat16)
    assert (c.copy_bytes_s, c.matmul_flop_s) == (4.0e12, 700e12)
    assert c.source.startswith("measured here") and "table: 4.26 TB/s, 806 TFLOP/s" in c.source


def test_the_table_stands_in_when_measuring_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def out_of_memory(*args: object) -> NoReturn:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    pretend_device_is(monkeypatch, "NVIDIA H200")
    monkeypatch.setattr(ceilings, "measure_copy_bytes_s", out_of_memory)
    c = device_ceilings(CPU, torch.bfloat16)
    assert c.copy_bytes_s == KNOWN_DEVICES["NVIDIA H200"].copy_bytes_s
    assert c.source.startswith("table: H200") and "ran out of memory" in c.source
    pretend_device_is(monkeypatch, "CPU")  # nothing to stand in: the lookup's error says so
    with pytest.raises(LookupError):
        device_ceilings(CPU, torch.bfloat16)


def test_release_kv_for_peer_frees_the_pool_and_keeps_the_weights() -> None:
    """The transformers peer (throughput.py, fastpath.py --peer hf) runs in the same process: our KV
    pool must be gone before it sizes its cache (it used to stay alive through the runner's page stores)."""
    with LLM(str(tiny_model_cached("qwen2")), device="cpu", dtype="float32") as llm:
        kv_ref = weakref.ref(llm.engine.runner.kv_cache.layers[0][0])
        release_kv_for_peer(llm)
        gc.collect()
        assert kv_ref() is None
        assert not any(p.is_meta for p in llm.engine.runner.model.parameters())
