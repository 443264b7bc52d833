"""The batch limits' defaults follow the device, as vLLM V1 sets them (EngineArgs.get_batch_defaults).

On a GPU with at least 70 GiB of memory that is not an A100 (H100, H200, MI300X, ...), an engine whose
caller left `max_num_seqs` / `max_num_batched_tokens` unset runs up to 1,024 requests at once with an
8,192-token step budget; everywhere else (smaller GPUs, the CPU) the config's own defaults stay (256 and
2,048). Why: on such a GPU a decode step's GEMMs are still well below the matmul rate at 256 rows (the
H200 measured cuBLAS at 621 TFLOP/s for the 8B's projections at M = 256 against 710 at 512), and the KV
pool has room for many more sequences. The scheduler admits a request only when its prompt and a decode
reserve fit beside what the running requests will claim (scheduler._make_room), so with a larger cap the
pool, not the cap, bounds the batch. vLLM excludes the A100 because its PR #17885 measured a throughput
loss there with the larger budget; this keeps that rule. Values a caller gives (keyword or flag) are
never changed: pydantic's `model_fields_set` tells them apart from defaults.

The step budget is vLLM's server value (8,192) for offline use too (vLLM's LLM class takes 16,384): one
budget for both entry points, and an 8,192-token prompt is still one prefill chunk.
"""

from __future__ import annotations

import torch

from agentserve.config import EngineConfig

LARGE_GPU_MIN_BYTES = 70 * 2**30
LARGE_GPU_MAX_NUM_SEQS = 1024
LARGE_GPU_MAX_NUM_BATCHED_TOKENS = 8192


def batch_defaults_for(total_memory_bytes: int, device_name: str) -> dict[str, int]:
    """The scheduler defaults a GPU of this size and name gets ({} : keep the config's own)."""
    if total_memory_bytes >= LARGE_GPU_MIN_BYTES and "a100" not in device_name.lower():
        return {"max_num_seqs": LARGE_GPU_MAX_NUM_SEQS, "max_num_batched_tokens": LARGE_GPU_MAX_NUM_BATCHED_TOKENS}
    return {}


def with_device_batch_defaults(config: EngineConfig, device: torch.device) -> EngineConfig:
    """`config` with the device's batch defaults in the scheduler fields its caller left unset."""
    if device.type != "cuda":
        return config
    props = torch.cuda.get_device_properties(device)
    return with_batch_defaults(config, batch_defaults_for(props.total_memory, props.name))


def with_batch_defaults(config: EngineConfig, defaults: dict[str, int]) -> EngineConfig:
    unset = {name: value for name, value in defaults.items() if name not in config.scheduler.model_fields_set}
    if not unset:
        return config
    if "max_num_seqs" in unset:  # no more sequences than a step has tokens for (SchedulerConfig's rule)
        budget = unset.get("max_num_batched_tokens", config.scheduler.max_num_batched_tokens)
        unset["max_num_seqs"] = min(unset["max_num_seqs"], budget)
    return config.model_copy(update={"scheduler": config.scheduler.model_copy(update=unset)})
