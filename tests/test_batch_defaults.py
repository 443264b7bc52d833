"""The batch limits' device defaults (engine/batch_defaults.py, vLLM V1's rule) and the decode graphs' cap."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from agentserve.config import EngineConfig, ModelConfig, SchedulerConfig
from agentserve.engine import batch_defaults
from agentserve.engine.batch_defaults import batch_defaults_for, with_batch_defaults, with_device_batch_defaults
from agentserve.llm import LLM
from agentserve.testing import tiny_model_cached
from agentserve.worker.cuda_graph import MAX_CAPTURE_SIZE, capture_sizes

GIB = 2**30
LARGE = {"max_num_seqs": 1024, "max_num_batched_tokens": 8192}


@pytest.mark.parametrize("memory_gib, name, expected", [
    (140.4, "NVIDIA H200", LARGE),
    (79.6, "NVIDIA H100 80GB HBM3", LARGE),
    (191.5, "AMD Instinct MI300X", LARGE),
    (79.2, "NVIDIA A100-SXM4-80GB", {}),   # vLLM's exception (PR #17885: slower there with the larger budget)
    (44.3, "NVIDIA L40S", {}),
    (23.6, "NVIDIA L4", {}),
])
def test_defaults_follow_memory_and_name(memory_gib: float, name: str, expected: dict[str, int]) -> None:
    assert batch_defaults_for(int(memory_gib * GIB), name) == expected


def test_only_fields_the_caller_left_unset_change() -> None:
    unset = EngineConfig.from_kwargs("m")
    resolved = with_batch_defaults(unset, LARGE)
    assert (resolved.scheduler.max_num_seqs, resolved.scheduler.max_num_batched_tokens) == (1024, 8192)
    assert (unset.scheduler.max_num_seqs, unset.scheduler.max_num_batched_tokens) == (256, 2048)  # a copy
    assert resolved.model_dump(exclude={"scheduler"}) == unset.model_dump(exclude={"scheduler"})
    assert resolved.scheduler.policy == unset.scheduler.policy
    assert with_batch_defaults(resolved, LARGE) is resolved  # already resolved: nothing left unset

    explicit_seqs = with_batch_defaults(EngineConfig.from_kwargs("m", max_num_seqs=256), LARGE)
    assert (explicit_seqs.scheduler.max_num_seqs, explicit_seqs.scheduler.max_num_batched_tokens) == (256, 8192)
    both = EngineConfig.from_kwargs("m", max_num_seqs=8, max_num_batched_tokens=512)
    assert with_batch_defaults(both, LARGE) is both
    nested = EngineConfig(model=ModelConfig(model="m"), scheduler=SchedulerConfig(max_num_batched_tokens=4096))
    resolved_nested = with_batch_defaults(nested, LARGE)
    assert (resolved_nested.scheduler.max_num_seqs, resolved_nested.scheduler.max_num_batched_tokens) == (1024, 4096)
    assert with_batch_defaults(unset, {}) is unset


def test_the_device_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EngineConfig.from_kwargs("m")
    assert with_device_batch_defaults(config, torch.device("cpu")) is config
    props = {"cuda": SimpleNamespace(total_memory=int(140.4 * GIB), name="NVIDIA H200")}
    monkeypatch.setattr(batch_defaults.torch.cuda, "get_device_properties", lambda device: props[device.type])
    big = with_device_batch_defaults(config, torch.device("cuda"))
    assert (big.scheduler.max_num_seqs, big.scheduler.max_num_batched_tokens) == (1024, 8192)
    props["cuda"] = SimpleNamespace(total_memory=int(79.2 * GIB), name="NVIDIA A100-SXM4-80GB")
    assert with_device_batch_defaults(config, torch.device("cuda")) is config


def test_the_cpu_engine_keeps_the_config_defaults() -> None:
    llm = LLM(str(tiny_model_cached("qwen2")), device="cpu", dtype="float32")
    engine = llm.engine
    assert engine.scheduler.config.max_num_seqs == SchedulerConfig().max_num_seqs
    assert engine.scheduler.config.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens
    llm.close()


def test_decode_graph_sizes_stop_at_the_capture_cap() -> None:
    assert MAX_CAPTURE_SIZE == 512
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(256)[-1] == 256
    big = capture_sizes(1024)
    assert big[-1] == 512 and big == capture_sizes(512) and big == sorted(set(big))


def test_max_num_seqs_never_exceeds_the_step_budget() -> None:
    """vLLM refuses max_num_batched_tokens < max_num_seqs (each running sequence takes a token of a step); left
    unset, max_num_seqs follows a smaller budget, the config's default and a large GPU's alike."""
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be greater than or equal to "
                                         r"max_num_seqs \(8\)"):
        EngineConfig.from_kwargs("m", max_num_batched_tokens=4, max_num_seqs=8)
    assert EngineConfig.from_kwargs("m", max_num_batched_tokens=32).scheduler.max_num_seqs == 32
    assert EngineConfig.from_kwargs("m", max_num_batched_tokens=512, max_num_seqs=512).scheduler.max_num_seqs == 512
    on_h200 = with_batch_defaults(EngineConfig.from_kwargs("m", max_num_batched_tokens=768), LARGE)
    assert (on_h200.scheduler.max_num_seqs, on_h200.scheduler.max_num_batched_tokens) == (768, 768)
    on_h200 = with_batch_defaults(EngineConfig.from_kwargs("m", max_num_seqs=64), LARGE)
    assert (on_h200.scheduler.max_num_seqs, on_h200.scheduler.max_num_batched_tokens) == (64, 8192)
