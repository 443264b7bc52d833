"""Ranks 1..n-1: a process per rank (spawned for GPUs, forked from a forkserver on the CPU: driver.py) that
builds its shard of the model and KV cache, then runs every step rank 0 sends (protocol.py) until told to stop.

A worker never outlives rank 0: a thread waits on the parent process and ends the worker when it
goes (SIGTERM or a crash of rank 0 leave no orphans), and a collective whose peer has exited fails
at once, which also ends the loop. Ctrl-C reaches the whole process group; workers ignore it and
leave when rank 0 shuts them down.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from agentserve.cache.device_ops import execute_device_ops
from agentserve.config import EngineConfig
from agentserve.model.arch_config import ArchConfig
from agentserve.parallel.groups import COLLECTIVE_TIMEOUT, ProcessGroups, disable_nvls
from agentserve.parallel.protocol import MessageKind, receive, unpack_forward, unpack_lora_slot
from agentserve.parallel.rank import TensorParallelRank, shard_forward


@dataclass
class WorkerArgs:
    config: EngineConfig
    arch: ArchConfig
    model_path: Optional[Path]
    dtype: torch.dtype
    max_model_len: int
    rank: int
    size: int
    store_port: int
    device_type: str


# What the forkserver of CPU ranks imports once, for every rank it forks (driver._worker_context): this module
# and the model runner, which _serve imports when it runs (the model, the kernels: most of a rank's start).
FORKSERVER_PRELOAD = (__name__, "agentserve.worker.model_runner")


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    assert parent is not None, "a tensor-parallel worker runs in a child process"
    parent.join()
    os._exit(1)  # the engine is gone: nothing to flush, nobody to answer


def worker_main(args: WorkerArgs, errors: "multiprocessing.queues.Queue[tuple[int, str]]") -> None:
    """Entry point of a rank's process. Its failure is reported on `errors` (rank, text) for rank 0 to
    name in its error, and the process exits with status 1."""
    disable_nvls()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()
    try:
        _serve(args)
    except BaseException as e:  # noqa: BLE001 - whatever it is, rank 0 must learn which rank failed and why
        errors.put((args.rank, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"))
        errors.close()
        errors.join_thread()
        sys.exit(1)


def _serve(args: WorkerArgs) -> None:
    from agentserve.worker.model_runner import ModelRunner

    device = torch.device(args.device_type, args.rank) if args.device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", args.store_port, args.size, False, timeout=COLLECTIVE_TIMEOUT)
    store.set(f"tp_up_{args.rank}", "1")  # rank 0 waits for these before it makes the groups
    groups = ProcessGroups(store, args.rank, args.size, device)
    if args.config.attention_backend != "auto":
        from agentserve.kernels import set_backend

        set_backend(args.config.attention_backend)
    # The draft model (speculation) is replicated on rank 0 only: it proposes there, unsharded.
    runner = ModelRunner(args.config, args.arch, device, args.dtype, args.model_path, args.max_model_len,
                         draft=None, parallel=TensorParallelRank(groups))
    with torch.inference_mode():
        while True:
            message = receive(groups)
            if message.kind == MessageKind.SHUTDOWN:
                break
            if message.kind == MessageKind.DEVICE_OPS:
                execute_device_ops(runner.kv_cache, message.payload)
                runner.kv_cache.step_launched()  # an idle engine's ops come alone: let paced copies progress
            elif message.kind == MessageKind.LORA_SLOT:
                assert runner.lora_manager is not None, "rank 0 serves LoRA; every rank has the same config"
                runner.lora_manager.load_slot(*unpack_lora_slot(message))
            else:
                shard_forward(runner.model, runner.kv_cache.layers, *unpack_forward(message), graphs=runner.graphs)
                runner.kv_cache.step_launched()  # paced swap-in copies follow the step's uploads
    runner.close()
