"""What rank 0 sends the other ranks each step, over the process groups (groups.py).

A message is a header and tensors. The header (pickled: the message kind, a small payload such as
the step's device ops or its scalar metadata, and the shapes and dtypes of the tensors) goes over
the CPU control group as two broadcasts (its length, then its bytes); the tensors follow over the
device group, so on CUDA the step's flat tensors go device to device through NCCL. Every rank takes
part in every message in the same order, which is what keeps the ranks' collectives matched.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Optional

import torch

from agentserve.cache.device_ops import DeviceOp
from agentserve.lora.manager import SlotTensors
from agentserve.model.attention import ForwardMetadata
from agentserve.parallel.groups import ProcessGroups


class MessageKind(IntEnum):
    FORWARD = 1     # run the model on the step's flat tensors (and the lm_head on the sampled rows)
    DEVICE_OPS = 2  # page copies and swaps on this rank's shard of the KV cache
    SHUTDOWN = 3    # leave the loop and exit
    LORA_SLOT = 4   # copy a whole LoRA adapter (rank 0's slot load) into this rank's slot, cut to its shard


@dataclass
class Message:
    kind: MessageKind
    payload: Any
    tensors: list[torch.Tensor]


def send(groups: ProcessGroups, kind: MessageKind, payload: Any = None,
         tensors: Optional[list[torch.Tensor]] = None) -> None:
    tensors = [t.contiguous() for t in tensors or []]
    header = pickle.dumps((int(kind), payload, [(tuple(t.shape), t.dtype) for t in tensors]))
    groups.broadcast(torch.tensor([len(header)], dtype=torch.int64), control=True)
    groups.broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8), control=True)
    for t in tensors:
        groups.broadcast(t)


def receive(groups: ProcessGroups) -> Message:
    length = torch.zeros(1, dtype=torch.int64)
    groups.broadcast(length, control=True)
    raw = torch.empty(int(length.item()), dtype=torch.uint8)
    groups.broadcast(raw, control=True)
    kind, payload, specs = pickle.loads(raw.numpy().tobytes())
    tensors = []
    for shape, dtype in specs:
        t = torch.empty(shape, dtype=dtype, device=groups.device)
        groups.broadcast(t)
        tensors.append(t)
    return Message(MessageKind(kind), payload, tensors)


# --- the forward message: a step's flat inputs -----------------------------------------------------
def send_forward(groups: ProcessGroups, input_ids: torch.Tensor, positions: torch.Tensor, meta: ForwardMetadata,
                 logits_indices: torch.Tensor) -> None:
    lora = [meta.lora_slot_indices] if meta.lora_slot_indices is not None else []  # rows with adapters
    send(groups, MessageKind.FORWARD, (meta.max_query_len, meta.max_seq_len),
         [input_ids, positions, meta.slot_mapping, meta.block_tables, meta.query_start_loc, meta.seq_lens,
          logits_indices, *lora])


def unpack_forward(message: Message) -> tuple[torch.Tensor, torch.Tensor, ForwardMetadata, torch.Tensor]:
    max_query_len, max_seq_len = message.payload
    input_ids, positions, slots, tables, query_start, seq_lens, logits_indices, *lora = message.tensors
    meta = ForwardMetadata(slot_mapping=slots, block_tables=tables, query_start_loc=query_start, seq_lens=seq_lens,
                           max_query_len=max_query_len, max_seq_len=max_seq_len,
                           lora_slot_indices=lora[0] if lora else None)
    return input_ids, positions, meta, logits_indices


def send_device_ops(groups: ProcessGroups, ops: list[DeviceOp]) -> None:
    send(groups, MessageKind.DEVICE_OPS, list(ops))  # a copy: the runner takes ops off its list as they run


# --- LoRA slot loads: the whole adapter rank 0 copies into a slot --------------------------------------
def send_lora_slot(groups: ProcessGroups, slot: int, tensors: SlotTensors) -> None:
    """The adapter goes whole (each rank cuts its shard): rank 0's CPU tier holds it whole, and one
    broadcast serves every rank. On CUDA it travels device to device (NCCL), so it is staged first."""
    present = [(fused, t is not None) for fused, t in tensors.items()]
    flat = [x.to(groups.device) for t in tensors.values() if t is not None for x in t]
    send(groups, MessageKind.LORA_SLOT, (slot, present), flat)


def unpack_lora_slot(message: Message) -> tuple[int, SlotTensors]:
    slot, present = message.payload
    flat = iter(message.tensors)
    tensors: SlotTensors = {fused: (next(flat), next(flat), next(flat), next(flat)) if has else None
                            for fused, has in present}
    return slot, tensors
