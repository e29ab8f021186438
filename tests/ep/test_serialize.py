"""The one wire format: every message survives encode -> decode unchanged."""

from __future__ import annotations

import torch

from moeserve.ep.messages import Combine, Dispatch, Filler, Shutdown, Stopped, SyncControl
from moeserve.ep.serialize import (
    HEADER_BYTES,
    decode,
    decode_control,
    encode,
    encode_control,
    message_capacity,
)


def _roundtrip(message, sender: int = 3):
    """Encode, copy into a larger reused receive buffer (as gloo fills one), decode."""
    payload = encode(message, sender)
    buffer = torch.full((payload.numel() + 100,), 255, dtype=torch.uint8)
    buffer[: payload.numel()] = payload
    decoded = decode(buffer)
    buffer.zero_()  # decoded tensors must not alias the buffer, which the inbox reuses
    return decoded


def test_dispatch_roundtrip_keeps_rows_ids_and_routing_fields() -> None:
    rows = torch.randn(5, 7)  # odd width: the ids come first so the rows stay aligned
    ids = torch.tensor([0, 0, 3, 9, 9])
    decoded = _roundtrip(Dispatch(micro_batch=2, layer=5, rows=rows, expert_ids=ids))
    assert isinstance(decoded, Dispatch)
    assert (decoded.micro_batch, decoded.layer) == (2, 5)
    assert torch.equal(decoded.rows, rows)
    assert torch.equal(decoded.expert_ids, ids)


def test_combine_roundtrip_keeps_sender_and_bfloat16_outputs() -> None:
    outputs = torch.randn(4, 8).to(torch.bfloat16)
    decoded = _roundtrip(Combine(micro_batch=1, layer=0, sender=2, outputs=outputs), sender=2)
    assert isinstance(decoded, Combine)
    assert decoded.sender == 2 and decoded.outputs.dtype == torch.bfloat16
    assert torch.equal(decoded.outputs, outputs)


def test_empty_dispatch_and_control_messages() -> None:
    decoded = _roundtrip(Dispatch(0, 1, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64)))
    assert isinstance(decoded, Dispatch) and decoded.rows.shape == (0, 4)
    assert isinstance(_roundtrip(Shutdown()), Shutdown)
    assert _roundtrip(Stopped(sender=4), sender=4) == Stopped(sender=4)
    assert isinstance(_roundtrip(Filler()), Filler)


def test_capacity_holds_the_largest_dispatch() -> None:
    rows, ids = torch.randn(6, 5), torch.arange(6)
    assert encode(Dispatch(0, 0, rows, ids), 0).numel() == message_capacity(6, 5) > HEADER_BYTES


def test_sync_control_roundtrip() -> None:
    counts = torch.tensor([0, 3, 0, 1])
    control = decode_control(encode_control(SyncControl(stop=False, layer=2, expert_counts=counts)))
    assert not control.stop and control.layer == 2
    assert torch.equal(control.expert_counts, counts)
    assert decode_control(encode_control(SyncControl(True, 0, torch.zeros(4, dtype=torch.int64)))).stop
