"""Rank 0's side of tensor parallelism: it starts the worker ranks, sends them each step, and stops
them. Rank 0 itself runs the scheduler, the servers and sampling (the engine's process).

Failures: a rank that exits (an error at load, a crash, a kill) fails rank 0's next collective or
message; rank 0 then raises TensorParallelError naming the rank, its exit status and its error, and
every later step raises the same error (the engine fails those steps' requests with it), because
the model's shards cannot run without the lost rank. The same holds when rank 0 itself fails in the
middle of a step (the others wait in a collective it will not reach: the ranks are out of step).
close() (and any failure at start-up) stops every worker: asked to leave when they can take a
message, else (or if they do not leave) terminated, then killed, so no process outlives the engine.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.queues
import queue
import time
from pathlib import Path
from multiprocessing.context import ForkServerContext, SpawnContext
from typing import Callable, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

from agentserve.cache.device_ops import DeviceOp
from agentserve.config import EngineConfig
from agentserve.lora.manager import SlotTensors
from agentserve.model.arch_config import ArchConfig
from agentserve.model.attention import ForwardMetadata
from agentserve.model.llama import CausalLM
from agentserve.parallel import protocol
from agentserve.parallel.groups import COLLECTIVE_TIMEOUT, CollectiveError, ProcessGroups, disable_nvls
from agentserve.parallel.rank import KVLayers, TensorParallelError, TensorParallelRank, shard_forward
from agentserve.parallel.shard import check_divisible
from agentserve.parallel.worker import FORKSERVER_PRELOAD, WorkerArgs, worker_main
from agentserve.worker.cuda_graph import DecodeGraphs

logger = logging.getLogger(__name__)

T = TypeVar("T")
_JOIN_TIMEOUT_S = 10.0
_PEER_EXIT_WAIT_S = 15.0  # after a broken collective: how long an exiting rank may take to go


class TensorParallelDriver(TensorParallelRank):
    def __init__(self, groups: ProcessGroups, processes: Sequence[multiprocessing.process.BaseProcess],
                 errors: "multiprocessing.queues.Queue[tuple[int, str]]", store: dist.TCPStore) -> None:
        super().__init__(groups)
        self.store = store  # the rendezvous server lives in this process: kept for the groups' lifetime
        self.processes = processes  # processes[i] is rank i + 1
        self.errors = errors
        self.closed = False

    # --- sending steps ------------------------------------------------------------------------------
    def agree_num_blocks(self, num_blocks: int) -> int:
        return self._guarded(lambda: super(TensorParallelDriver, self).agree_num_blocks(num_blocks))

    def run_forward(self, model: CausalLM, kv_layers: KVLayers, input_ids: torch.Tensor, positions: torch.Tensor,
                    meta: ForwardMetadata, logits_indices: torch.Tensor,
                    graphs: Optional[DecodeGraphs] = None) -> Optional[torch.Tensor]:
        def step() -> Optional[torch.Tensor]:
            protocol.send_forward(self.groups, input_ids, positions, meta, logits_indices)
            return shard_forward(model, kv_layers, input_ids, positions, meta, logits_indices, graphs)

        return self._guarded(step)

    def send_device_ops(self, ops: list[DeviceOp]) -> None:
        if ops:
            self._guarded(lambda: protocol.send_device_ops(self.groups, ops))

    def send_lora_slot(self, slot: int, tensors: SlotTensors) -> None:
        self._guarded(lambda: protocol.send_lora_slot(self.groups, slot, tensors))

    def is_healthy(self) -> bool:
        """No rank has failed, and every worker process is still there: a rank killed while the
        engine is idle counts at once, before a step runs into its absence (health checks ask this
        from the servers' thread; it only polls the processes and records nothing)."""
        return self.failure is None and not self._dead_ranks()

    def check_ranks(self) -> None:
        """Raises TensorParallelError if a rank has exited (or failed before)."""
        if self.failure is None:
            dead = self._dead_ranks()
            if dead:
                self._fail(self._describe_failure(dead))
        if self.failure is not None:
            raise TensorParallelError(str(self.failure))

    def _guarded(self, work: Callable[[], T]) -> T:
        """Runs work that every rank takes part in. Any failure in it leaves the ranks out of step
        (the others wait in a collective this rank will not reach, or it broke because a rank is
        gone), so it fails the driver for good, naming the ranks that exited if any did."""
        self.check_ranks()
        try:
            return work()
        except BaseException as e:
            # A broken collective means a rank is gone or going: its exit (after it reported its
            # error) can take seconds on a loaded machine, so wait for it there, to name it.
            wait_for_an_exit(self.processes, _PEER_EXIT_WAIT_S if isinstance(e, CollectiveError) else 1.0)
            dead = self._dead_ranks()
            self._fail(self._describe_failure(dead) if dead else TensorParallelError(
                f"rank 0 failed in a step every rank takes part in ({type(e).__name__}); the ranks are out of step"))
            if dead:
                raise TensorParallelError(str(self.failure)) from None
            raise  # rank 0's own error, as it is (the engine logs its type and stack)

    def _dead_ranks(self) -> list[tuple[int, Optional[int]]]:
        """(rank, exit code) of each worker process that has exited."""
        return [(rank, p.exitcode) for rank, p in enumerate(self.processes, start=1) if p.exitcode is not None]

    def _fail(self, failure: TensorParallelError) -> None:
        # Logged here, with its text: the engine logs step failures without exception texts (they
        # may carry request data); this one names ranks and their errors only.
        self.failure = failure
        logger.error("%s; the engine cannot run steps any more (every step fails until it is restarted)", failure)

    def _describe_failure(self, dead: Sequence[tuple[int, Optional[int]]]) -> TensorParallelError:
        return describe_failure(self.errors, dead)

    # --- stopping -----------------------------------------------------------------------------------
    def abandon_start(self) -> None:
        """Stops the workers after rank 0 failed to build its runner. They are then in a start-up
        collective (the KV pool's agreement, a profiling forward) that rank 0 will not reach, not
        waiting for a message: a shutdown message would wait for them in vain, so they are terminated."""
        self.failure = TensorParallelError("rank 0 failed to build its runner; the ranks are out of step")
        self.shutdown()

    def shutdown(self) -> None:
        """Asks the workers to leave, then terminates and kills any still there. Idempotent."""
        if self.closed:
            return
        self.closed = True
        grace = 0.0  # out of step or a rank gone: the others cannot take a message; terminate them
        if self.failure is None and all(p.exitcode is None for p in self.processes):
            try:
                protocol.send(self.groups, protocol.MessageKind.SHUTDOWN)
                grace = _JOIN_TIMEOUT_S
            except RuntimeError as e:
                logger.warning("tensor-parallel shutdown message failed (%s); terminating the workers", e)
        stop_processes(self.processes, grace)


def describe_failure(errors: "multiprocessing.queues.Queue[tuple[int, str]]",
                     dead: Sequence[tuple[int, Optional[int]]]) -> TensorParallelError:
    """An error naming each exited rank, its exit status and the error it reported (if it could)."""
    reasons: dict[int, str] = {}
    while True:
        try:
            rank, text = errors.get(timeout=0.5)
        except queue.Empty:
            break
        reasons[rank] = text
    parts = [f"tensor-parallel rank {rank} exited with status {code}"
             + (f": {reasons[rank]}" if rank in reasons else "") for rank, code in dead]
    return TensorParallelError("; ".join(parts))


def wait_for_an_exit(processes: Sequence[multiprocessing.process.BaseProcess], patience: float) -> None:
    """Returns once one of the processes has exited (then gives the others a moment to follow), or
    after `patience` seconds."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and all(p.exitcode is None for p in processes):
        time.sleep(0.05)
    for p in processes:
        p.join(timeout=0.2)


def stop_processes(processes: Sequence[multiprocessing.process.BaseProcess], grace: float = 0.0) -> None:
    """Waits up to `grace` seconds for the processes to exit, then terminates (and kills) the rest."""
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.exitcode is None:
            p.terminate()
            p.join(timeout=2.0)
        if p.exitcode is None:
            p.kill()
            p.join()


def _worker_context(device: torch.device) -> Union[SpawnContext, ForkServerContext]:
    """How ranks 1..n-1 start. Never fork: it would copy rank 0's threads (and CUDA state). CUDA ranks are
    spawned (a fresh interpreter each, as vLLM starts them): nothing vouches that importing the worker leaves the
    CUDA driver untouched, and a forked child of a process that initialised it cannot use the device. CPU ranks
    (gloo) fork from a forkserver that has imported the worker once: a spawned rank re-imports torch and the model
    code (2-5 s a rank, most of a CPU tensor-parallel engine's start)."""
    if device.type == "cuda":
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
    return ctx


def launch_tensor_parallel(config: EngineConfig, arch: ArchConfig, model_path: Optional[Path], dtype: torch.dtype,
                           max_model_len: int, device: torch.device) -> Optional[TensorParallelDriver]:
    """Starts ranks 1..n-1 and makes the groups; None at tensor_parallel_size 1."""
    size = config.tensor_parallel_size
    if size == 1:
        return None
    check_divisible(arch, size)
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise TensorParallelError(f"tensor_parallel_size={size} needs {size} GPUs; "
                                  f"{torch.cuda.device_count()} are visible")
    disable_nvls()  # inherited by the workers too (they also set it themselves)
    store = dist.TCPStore("127.0.0.1", 0, size, True, wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
    ctx = _worker_context(device)
    errors: "multiprocessing.queues.Queue[tuple[int, str]]" = ctx.Queue()
    processes = [ctx.Process(target=worker_main, name=f"agentserve-tp-rank{rank}", daemon=True,
                             args=(WorkerArgs(config, arch, model_path, dtype, max_model_len, rank, size, store.port,
                                              device.type), errors))
                 for rank in range(1, size)]
    for p in processes:
        p.start()
    try:
        _wait_for_workers(store, processes, errors)
        groups = ProcessGroups(store, 0, size, device)
    except BaseException:
        stop_processes(processes)
        raise
    return TensorParallelDriver(groups, processes, errors, store)


def _wait_for_workers(store: dist.TCPStore, processes: Sequence[multiprocessing.process.BaseProcess],
                      errors: "multiprocessing.queues.Queue[tuple[int, str]]") -> None:
    """Every worker has reached the store (so a rank that dies while starting is named rather than
    waited for until the rendezvous times out)."""
    keys = [f"tp_up_{rank}" for rank in range(1, len(processes) + 1)]
    deadline = time.monotonic() + COLLECTIVE_TIMEOUT.total_seconds()
    while not store.check(keys):
        dead = [(rank, p.exitcode) for rank, p in enumerate(processes, start=1) if p.exitcode is not None]
        if dead:
            raise describe_failure(errors, dead)
        if time.monotonic() > deadline:
            raise TensorParallelError("tensor-parallel workers did not start in time")
        time.sleep(0.05)
