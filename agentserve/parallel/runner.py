"""Rank 0's model runner, with the other ranks started first when the model is split over several."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from agentserve.config import EngineConfig
from agentserve.model.arch_config import ArchConfig
from agentserve.parallel.driver import launch_tensor_parallel
from agentserve.worker.model_runner import ModelRunner


def start_model_runner(config: EngineConfig, arch: ArchConfig, device: torch.device, dtype: torch.dtype,
                       model_path: Optional[Path], max_model_len: int,
                       draft: Optional[tuple[ArchConfig, Optional[Path]]]) -> ModelRunner:
    """The workers (ranks 1..n-1) build their runners at the same time as this one: building is
    collective (the KV pool size is agreed, CUDA profiling runs the model on every rank). If this
    rank's build fails, the workers are stopped (terminated: they wait in one of those collectives)
    before the error goes on."""
    driver = launch_tensor_parallel(config, arch, model_path, dtype, max_model_len, device)
    try:
        runner = ModelRunner(config, arch, device, dtype, model_path, max_model_len, draft, driver)
    except BaseException:
        if driver is not None:
            driver.abandon_start()
        raise
    if driver is not None and runner.lora_manager is not None:
        # Every slot rank 0 loads, the other ranks load too (each its shard), before the step that reads it.
        runner.lora_manager.on_slot_load(driver.send_lora_slot)
    return runner
