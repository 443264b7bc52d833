"""Multi-LoRA residency: `max_loras` device slots of stacked A/B weights, a CPU tier of loaded
adapters (`max_cpu_loras`, LRU), and the names that requests use.

Tiers
-----
- Names: `load(name, path)` reads and validates a PEFT directory at once (a bad adapter is refused
  before anyone uses its name) and gives the name a new key (id + load generation, lora/key.py):
  caches key by it, so KV computed under earlier weights of the name is never found again.
- CPU tier: each loaded adapter in the slot layout (kernels/lora.py), already zero-padded to
  max_lora_rank, cast and (on CUDA) in pinned memory, so that moving it into a slot is nothing but
  asynchronous copies. More than `max_cpu_loras` adapters: the least recently used are dropped from
  memory and read again from their directory when a request needs them (vLLM's max_cpu_loras),
  unless the directory's files changed since the load (lora/source.py): then those requests fail.
- Device slots: per fused projection one tensor [max_loras, num_layers, ...] for each of A, B, ranks
  and scaling; each layer's LoRALinear (lora/layers.py) holds its layer's view. Only projections
  that `lora_target_modules` allows get slots (and LoRA layers). A step's adapters
  get slots in `activate`: resident ones are touched, others take an empty slot or the least
  recently used slot that this step does not use. The scheduler admits at most max_loras distinct
  adapters among running requests, so every running request's adapter stays in a slot (pinned in
  effect: it is touched by every step it runs in) and activation always finds room.

Loading is asynchronous to the step (CUDA): the copies run on a side stream that first waits for the
last step that read the slot (an event recorded in `step_launched`), and the step's stream waits on
the copies' event before its forward; the host never waits. On the CPU the copies are plain.

The base model's weights are never touched: the deltas are added to the projections' outputs.

Tensor parallelism: each rank's slots hold its shard of the adapters (lora/tensor_parallel.py).
Rank 0's manager decides everything (names, keys, CPU tier, which adapter goes in which slot) and
tells a listener of each slot load (`on_slot_load`: the driver sends the whole adapter to the other
ranks); the other ranks' managers only copy what they are sent into their slots (`load_slot`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from agentserve.config import LoRAConfig
from agentserve.kernels.lora import slice_starts_for
from agentserve.lora.adapter import (FUSED_SLICES, LORA_TARGET_MODULES, LoRAAdapter, LoRAAdapterError,
                                     load_lora_adapter, lora_module_shapes)
from agentserve.lora.key import LoRAKey, LoRAKeys
from agentserve.lora.source import AdapterSource
from agentserve.lora.tensor_parallel import LoRAShardLayout
from agentserve.model.arch_config import ArchConfig

FUSED_PROJECTIONS: tuple[str, ...] = tuple(FUSED_SLICES)
# A whole adapter as one slot load copies it: per fused projection (A, B^T, ranks, scaling) over all
# layers, or None where the adapter targets none of its slices.
SlotTensors = dict[str, Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]]
SlotLoadListener = Callable[[int, SlotTensors], None]


class LoRASlotsExhaustedError(RuntimeError):
    """A step asked for more distinct adapters than there are slots (a scheduler bug: it admits at
    most max_loras distinct adapters)."""


@dataclass(frozen=True)
class LoRAStack:
    """One layer's fused projection across all slots, in the kernels' layout (kernels/lora.py)."""

    lora_a: torch.Tensor   # [max_loras, num_slices, max_rank, in_features]
    lora_b: torch.Tensor   # [max_loras, max_rank, out_features]
    ranks: torch.Tensor    # [max_loras, num_slices] int32 (0: slice not targeted)
    scaling: torch.Tensor  # [max_loras, num_slices] float32
    slice_sizes: tuple[int, ...]
    slice_starts: torch.Tensor  # [num_slices + 1] int32 column boundaries


@dataclass(frozen=True)
class _Stacked:
    """One fused projection, all layers: the device slots, or one adapter's CPU copy (no slot dim)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    ranks: torch.Tensor
    scaling: torch.Tensor


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter read and laid out for the slots, not yet bound to its name (MultiLoRAManager.read)."""

    name: str
    source: AdapterSource  # the directory and its files as read (a read again must find the same)
    weights: dict[str, Optional[_Stacked]]


class MultiLoRAManager:
    """Implements lora/interface.py's LoRAManager over device slots and a CPU tier."""

    def __init__(self, arch: ArchConfig, config: LoRAConfig, dtype: torch.dtype, device: torch.device,
                 keys: Optional[LoRAKeys] = None, shard_layout: Optional[LoRAShardLayout] = None) -> None:
        """`shard_layout`: this rank's cut of the projections under tensor parallelism (None: whole)."""
        self.arch = arch
        self.max_loras = config.max_loras
        self.max_rank = config.max_lora_rank
        self.max_cpu_loras = max(config.max_cpu_loras, config.max_loras)  # config's documented floor
        self.dtype = dtype
        self.device = device
        self.keys = keys if keys is not None else LoRAKeys()
        self.shard_layout = shard_layout
        shapes = shard_layout.local_shapes(arch) if shard_layout is not None else lora_module_shapes(arch)
        self.slice_sizes = {f: tuple(shapes[m][1] for m in FUSED_SLICES[f]) for f in FUSED_PROJECTIONS}
        self.in_features = {f: shapes[FUSED_SLICES[f][0]][0] for f in FUSED_PROJECTIONS}
        # Only the fused projections some allowed module belongs to get slots and LoRA layers: the
        # others cost neither memory nor kernel launches (SGLang's --lora-target-modules).
        self.target_modules = frozenset(config.lora_target_modules or LORA_TARGET_MODULES)
        self.projections = tuple(f for f in FUSED_PROJECTIONS if self.target_modules & set(FUSED_SLICES[f]))
        n, slots, r = arch.num_layers, self.max_loras, self.max_rank
        # Slot-major ([slot, layer, ...]): loading a slot is one contiguous copy per tensor; a layer's
        # view [:, layer] strides over slots, which the kernels take as given (stride of dim 0).
        self._slots: dict[str, _Stacked] = {}
        for f in self.projections:
            s = len(FUSED_SLICES[f])
            self._slots[f] = _Stacked(
                lora_a=torch.zeros(slots, n, s, r, self.in_features[f], dtype=dtype, device=device),
                lora_b=torch.zeros(slots, n, r, sum(self.slice_sizes[f]), dtype=dtype, device=device),
                ranks=torch.zeros(slots, n, s, dtype=torch.int32, device=device),
                scaling=torch.zeros(slots, n, s, dtype=torch.float32, device=device))
        self._slice_starts = {f: slice_starts_for(self.slice_sizes[f], device) for f in self.projections}
        # Loaded names, in load order. Replaced, never changed in place: servers read it from other
        # threads (listing models) while the step thread loads and unloads.
        self._names: dict[str, LoRAKey] = {}
        self._sources: dict[LoRAKey, AdapterSource] = {}  # every key a request may still hold
        self._cpu: OrderedDict[LoRAKey, dict[str, Optional[_Stacked]]] = OrderedDict()  # LRU: oldest first
        self._slot_key: list[Optional[LoRAKey]] = [None] * slots
        self._slot_of: dict[LoRAKey, int] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict((i, None) for i in range(slots))
        self._cuda = device.type == "cuda"
        self._copy_stream = torch.cuda.Stream(device) if self._cuda else None
        self._slot_read: list[Optional[torch.cuda.Event]] = [None] * slots  # last step that read a slot
        self._step_slots: list[int] = []
        self._slot_listener: Optional[SlotLoadListener] = None
        self.num_slot_loads = 0  # adapters copied into a slot (metrics, tests)
        self.num_disk_reads = 0  # adapters read from their directory (load, or again after CPU eviction)

    # --- the layers' view ---------------------------------------------------------------------------
    def stack(self, layer: int, fused: str) -> LoRAStack:
        s = self._slots[fused]
        return LoRAStack(lora_a=s.lora_a[:, layer], lora_b=s.lora_b[:, layer], ranks=s.ranks[:, layer],
                         scaling=s.scaling[:, layer], slice_sizes=self.slice_sizes[fused],
                         slice_starts=self._slice_starts[fused])

    def release(self) -> None:
        """Drops the slots and the CPU tier (engine close: device memory and pinned memory go back).
        The manager cannot activate adapters afterwards."""
        self._slots = {}
        self._slice_starts = {}
        self._cpu.clear()
        self._slot_read = [None] * self.max_loras

    # --- names --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._names)

    def key_of(self, name: str) -> Optional[LoRAKey]:
        """The current key of a loaded name; None when it is not loaded."""
        return self._names.get(name)

    def path_of(self, name: str) -> Optional[Path]:
        key = self._names.get(name)
        return self._sources[key].path if key is not None else None

    def load(self, name: str, path: str) -> None:
        """Reads and checks the adapter, then (re)binds `name` to it under a new key. The earlier
        weights of a reloaded name stay reachable by their key for requests still using them."""
        self.install(name, self.read(name, path))

    def read(self, name: str, path: str) -> PreparedAdapter:
        """The part of a load that grows with the adapter (file reads, checks, padding, pinning). It
        touches no manager state, so servers run it off the step thread; `install` then binds it."""
        if not name:
            raise LoRAAdapterError("an adapter needs a non-empty name")
        source = AdapterSource.of(Path(path))
        adapter = self._read(source.path, LoRAKey(0, 0), name)
        # A trainer saving its next checkpoint between the config's read and the weights' would give weights of
        # one save with the scaling of another (neither checkpoint): the files read must be the ones noted.
        source.check_unchanged(name)
        return PreparedAdapter(name=name, source=source, weights=self._to_slot_layout(adapter))

    def install(self, name: str, prepared: PreparedAdapter) -> None:
        """Binds `name` to a read adapter under a new key (step thread: cheap, no I/O)."""
        assert prepared.name == name, "installed under another name than it was read for"
        replaced = self._names.get(name)
        if replaced is not None:
            # No new request can name the old weights: like an unload, their CPU copy goes, so that it
            # does not push adapters still served out of the tier (a request of the old key, if any,
            # reads them again from their directory, as after a drained unload).
            self._cpu.pop(replaced, None)
        key = self.keys.register(name)
        self._sources[key] = prepared.source
        self._names = {**self._names, name: key}
        self._put_cpu(key, prepared.weights)

    def unload(self, name: str) -> None:
        """Forgets the name and its CPU copy; a request still running with it (drained unload)
        reads it again from its directory if it needs it in a slot again."""
        key = self._names.get(name)
        if key is None:
            raise KeyError(name)
        self._names = {n: k for n, k in self._names.items() if n != name}
        self._cpu.pop(key, None)
        self.keys.forget(name)

    def unbound_keys(self) -> list[LoRAKey]:
        """Keys no name points to any more (replaced or unloaded), kept while requests may hold them."""
        bound = set(self._names.values())
        return [key for key in self._sources if key not in bound]

    def forget(self, key: LoRAKey) -> None:
        """Drops an unbound key that nothing holds any more: a reload loop (RL-style load_inplace)
        must not grow the manager by one record per load."""
        assert key not in self._names.values(), "a name still points to this key"
        self._sources.pop(key, None)
        self._cpu.pop(key, None)

    # --- slots --------------------------------------------------------------------------------------
    def on_slot_load(self, listener: SlotLoadListener) -> None:
        """Rank 0 under tensor parallelism: `listener(slot, whole adapter)` runs at each slot load,
        before this rank's copy (the other ranks load the same slot with it)."""
        self._slot_listener = listener

    def load_slot(self, slot: int, tensors: SlotTensors) -> None:
        """The other ranks under tensor parallelism: copies rank 0's slot load (a whole adapter) into
        this rank's slot, cut to its shard; in order on the step's stream, after the steps before."""
        self._copy_into(slot, {f: None if t is None else _Stacked(*t) for f, t in tensors.items()})

    def activate(self, keys: Sequence[Optional[LoRAKey]]) -> list[int]:
        """Makes each row's adapter resident; returns each row's slot (-1: the base model)."""
        wanted = list(dict.fromkeys(k for k in keys if k is not None))
        if len(wanted) > self.max_loras:
            raise LoRASlotsExhaustedError(f"a step uses {len(wanted)} adapters but there are only "
                                          f"{self.max_loras} LoRA slots (max_loras)")
        for key in wanted:
            slot = self._slot_of.get(key)
            if slot is not None:
                self._slot_lru.move_to_end(slot)
        busy = {self._slot_of[k] for k in wanted if k in self._slot_of}
        for key in wanted:
            if key not in self._slot_of:
                slot = self._victim(busy)
                self._load_slot(slot, key)
                busy.add(slot)
        self._step_slots = sorted(busy)
        return [self._slot_of[k] if k is not None else -1 for k in keys]

    def step_launched(self) -> None:
        """Called once the step's forward is queued: a later load into one of its slots waits for it."""
        if self._cuda and self._step_slots:
            event = torch.cuda.Event()
            event.record()
            for slot in self._step_slots:
                self._slot_read[slot] = event
        self._step_slots = []

    def ensure_weights(self, key: LoRAKey) -> None:
        """Makes sure `activate` will find the key's weights: in a slot, in the CPU tier, or read
        again now from its directory (a drained or CPU-evicted adapter). Raises LoRAAdapterError
        when they cannot be read (the directory was removed or broken since the load), so the engine
        fails the requests of that key alone instead of the whole step."""
        if key not in self._slot_of:
            self._cpu_copy(key)

    def resident_keys(self) -> list[Optional[LoRAKey]]:
        return list(self._slot_key)

    def _victim(self, busy: set[int]) -> int:
        for slot in self._slot_lru:  # least recently used first; empty slots were never touched
            if self._slot_key[slot] is None and slot not in busy:
                return slot
        for slot in self._slot_lru:
            if slot not in busy:
                return slot
        raise LoRASlotsExhaustedError("no LoRA slot is free")  # activate's count check rules it out

    def _load_slot(self, slot: int, key: LoRAKey) -> None:
        weights = self._cpu_copy(key)
        old = self._slot_key[slot]
        if old is not None:
            del self._slot_of[old]
        self._slot_key[slot] = key
        self._slot_of[key] = slot
        self._slot_lru.move_to_end(slot)
        self.num_slot_loads += 1
        if self._slot_listener is not None:
            self._slot_listener(slot, {f: None if w is None else (w.lora_a, w.lora_b, w.ranks, w.scaling)
                                       for f, w in weights.items()})
        if not self._cuda:
            self._copy_into(slot, weights)
            return
        assert self._copy_stream is not None
        read = self._slot_read[slot]
        with torch.cuda.stream(self._copy_stream):
            if read is not None:
                self._copy_stream.wait_event(read)  # the step still reading the old adapter goes first
            self._copy_into(slot, weights)
            loaded = torch.cuda.Event()
            loaded.record(self._copy_stream)
        torch.cuda.current_stream(self.device).wait_event(loaded)  # the step's forward reads it

    def _copy_into(self, slot: int, weights: dict[str, Optional[_Stacked]]) -> None:
        for f, w in weights.items():
            dst = self._slots[f]
            if w is None:  # not targeted in any layer: rank 0 makes the kernels skip the slot
                dst.ranks[slot].zero_()
                # and zeroed A / B leave nothing of the slot's previous adapter to read: a kernel that multiplies
                # by its mask rather than skipping turned a stale inf into NaN in this adapter's rows.
                dst.lora_a[slot].zero_()
                dst.lora_b[slot].zero_()
                continue
            lora_a, lora_b = w.lora_a, w.lora_b
            if self.shard_layout is not None:  # the CPU tier and rank 0's messages hold whole adapters
                lora_a, lora_b = self.shard_layout.shard(self.arch, f, lora_a, lora_b)
            dst.lora_a[slot].copy_(lora_a, non_blocking=True)
            dst.lora_b[slot].copy_(lora_b, non_blocking=True)
            dst.ranks[slot].copy_(w.ranks, non_blocking=True)
            dst.scaling[slot].copy_(w.scaling, non_blocking=True)

    # --- CPU tier -----------------------------------------------------------------------------------
    def _cpu_copy(self, key: LoRAKey) -> dict[str, Optional[_Stacked]]:
        weights = self._cpu.get(key)
        if weights is not None:
            self._cpu.move_to_end(key)
            return weights
        source = self._sources.get(key)
        if source is None:
            raise LoRAAdapterError(f"adapter {key} is not loaded")
        name = next((n for n, k in self._names.items() if k == key), source.path.name)
        source.check_unchanged(name)  # other files now would be served under this key's cached pages
        weights = self._to_slot_layout(self._read(source.path, key, name))
        source.check_unchanged(name)  # and files replaced while they were being read
        self._put_cpu(key, weights)
        return weights

    def _put_cpu(self, key: LoRAKey, weights: dict[str, Optional[_Stacked]]) -> None:
        self._cpu[key] = weights
        self._cpu.move_to_end(key)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _read(self, path: Path, key: LoRAKey, name: str) -> LoRAAdapter:
        adapter = load_lora_adapter(path, self.arch, max_lora_rank=self.max_rank, adapter_id=key.adapter_id,
                                    generation=key.generation, name=name)
        self.num_disk_reads += 1
        return adapter

    def _to_slot_layout(self, adapter: LoRAAdapter) -> dict[str, Optional[_Stacked]]:
        """The adapter in the slots' layout for every layer (padded, cast; pinned on CUDA)."""
        outside = adapter.target_modules - self.target_modules
        if outside:
            raise LoRAAdapterError(f"adapter {adapter.name!r} targets {', '.join(sorted(outside))}, outside the modules "
                                   f"this server applies LoRA to (lora_target_modules: "
                                   f"{', '.join(sorted(self.target_modules))})")
        out: dict[str, Optional[_Stacked]] = {}
        for f in self.projections:
            if not adapter.target_modules & set(FUSED_SLICES[f]):
                out[f] = None  # nothing to hold (a q/v-only adapter has no MLP weights)
                continue
            per_layer = [adapter.slot_weights(layer, f, self.max_rank, self.dtype)
                         for layer in range(self.arch.num_layers)]
            out[f] = _Stacked(lora_a=self._host(torch.stack([w.lora_a for w in per_layer])),
                              lora_b=self._host(torch.stack([w.lora_b for w in per_layer])),
                              ranks=self._host(torch.stack([w.ranks for w in per_layer])),
                              scaling=self._host(torch.stack([w.scaling for w in per_layer])))
        return out

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t.pin_memory() if self._cuda else t

