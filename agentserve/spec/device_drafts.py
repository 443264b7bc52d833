"""Draft tokens that stay on the device from the proposal to the verification.

A draft model samples its k proposals on the device. Reading them back before the verification
step puts a device-to-host sync, and then the host's whole preparation of the verification (inputs,
metadata, rejection-sampling launch: ~0.4 ms at batch 1), between the last draft forward and the
verification forward, with the device idle meanwhile. The host needs only how many drafts each row
has to schedule and lay out the step, so the proposal leaves the values on the device
(`Request.spec_token_ids_device`) and `Request.spec_token_ids` holds DRAFT_ON_DEVICE placeholders;
the verification's inputs are built on the host with the placeholders and the values are put in
place on the device (one index_copy into the input ids, one into the drafts' SpecDecodeMetadata).
The host sees the tokens with the verification's result, which holds every accepted draft.

A path that needs the values on the host (an eager verification step, tensor parallelism, grammar
masks) calls `materialize_drafts` first: one sync, the same values.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from agentserve.request import Request

# Never a token id: marks a draft whose value is on the device.
DRAFT_ON_DEVICE = -1


def device_rows(requests: Sequence[Request], drafts: Sequence[Sequence[int]]) -> list[Optional[torch.Tensor]]:
    """Per row, its drafts on the device ([len(drafts[i])] int64) where drafts[i] are placeholders,
    else None. The scheduler may have cut a proposal short: the device values are cut the same way."""
    rows: list[Optional[torch.Tensor]] = []
    for request, draft in zip(requests, drafts):
        values = request.spec_token_ids_device
        if draft and draft[0] == DRAFT_ON_DEVICE and values is not None:
            if values.shape[0] < len(draft):
                raise RuntimeError(f"{request.request_id}: {len(draft)} placeholder drafts for "
                                   f"{values.shape[0]} device values")
            rows.append(values[:len(draft)])
        else:
            rows.append(None)
    return rows


def materialize_drafts(requests: Sequence[Request], drafts: Sequence[list[int]]) -> None:
    """Replaces the placeholders in `drafts` (each list in place, e.g. a ScheduledChunk's) and in the
    requests' spec_token_ids with the device values: one device-to-host copy for all rows."""
    rows = device_rows(requests, drafts)
    present = [(i, t) for i, t in enumerate(rows) if t is not None]
    if not present:
        return
    flat = torch.cat([t for _, t in present]).tolist()
    at = 0
    for i, t in present:
        n = t.shape[0]
        drafts[i][:] = flat[at:at + n]
        request = requests[i]
        if request.spec_token_ids is not drafts[i]:
            request.spec_token_ids[:n] = flat[at:at + n]
        request.spec_token_ids_device = None
        at += n


def scatter_indexes(drafts: Sequence[Sequence[int]], rows: Sequence[Optional[torch.Tensor]],
                    q: int) -> tuple[np.ndarray, np.ndarray]:
    """Host indexes for `scatter_device_drafts` in a layout of q tokens per row (the row's last known
    token, then its drafts): the flat input-id positions of the device drafts, and their positions
    in the flat drafts of SpecDecodeMetadata (row after row)."""
    id_index: list[int] = []
    draft_index: list[int] = []
    offset = 0
    for i, (draft, values) in enumerate(zip(drafts, rows)):
        if values is not None:
            id_index.extend(range(i * q + 1, i * q + 1 + len(draft)))
            draft_index.extend(range(offset, offset + len(draft)))
        offset += len(draft)
    return np.asarray(id_index, dtype=np.int64), np.asarray(draft_index, dtype=np.int64)


def scatter_device_drafts(rows: Sequence[Optional[torch.Tensor]], input_ids: torch.Tensor, id_index: torch.Tensor,
                          draft_token_ids: torch.Tensor, draft_index: torch.Tensor) -> None:
    """Puts the device drafts in place in the flat input ids and the metadata's flat drafts (both
    already on the device, holding placeholders there), queued on the current stream."""
    values = [t for t in rows if t is not None]
    if not values:
        return
    src = torch.cat(values).to(input_ids.dtype)
    input_ids.index_copy_(0, id_index, src)
    draft_token_ids.index_copy_(0, draft_index, src.to(draft_token_ids.dtype))
