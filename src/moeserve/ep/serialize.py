"""The one wire format of moeserve.ep: typed messages <-> byte tensors that gloo sends.

A point-to-point message is ONE uint8 send: a 64-byte header (int64 fields: kind, sender rank,
body bytes, micro-batch, layer, rows n, width D, dtype code) then the body: expert ids
(int64 [n], Dispatch only) then the rows ([n, D]), so every part starts aligned.

Why one send into buffers posted ahead: gloo's TCP transport is receiver-driven. A send goes
out at once only if the receiver already posted a matching receive; otherwise the data waits
for the receiver's "ready" notice, which the sender's event-loop thread must then handle, a
round trip that costs milliseconds when the sender is busy computing on a loaded machine.
An :class:`Inbox` therefore keeps ``depth`` receives posted into ``capacity``-byte buffers
(gloo accepts a message shorter than the buffer), and a header-then-body protocol, which
would post the body's receive only after the header arrived, is avoided.

gloo offers no way to ask whether a point-to-point receive has completed without waiting for
it (``Work.is_completed`` turns true only after ``wait``), so a receiver could not look at its
mu-queues and its mail at once. Every message therefore also rings the receiver's
:class:`Doorbell`, a local datagram socket carrying only the sender's rank: ``select`` on it
tells, without blocking, which peer sent what, and a blocking wait on any peer is one
``select``. The data itself travels through gloo.

A conversation ends with a final message (Shutdown or Stopped) followed by ``depth - 1``
:class:`~moeserve.ep.messages.Filler` messages that match the receives still posted, so no
receive is left pending when the phase ends.

:class:`SyncControl` is a fixed-size int64 row ``[stop, layer, expert_counts[E]]`` exchanged with
``all_to_all_single`` (one row per destination rank).

This module knows nothing of modes, queues or models.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeserve.ep.messages import Combine, Dispatch, Filler, Message, Shutdown, Stopped, SyncControl

MESSAGE_TAG = 11
HEADER_BYTES = 64
_HEADER_FIELDS = HEADER_BYTES // 8
_KINDS: dict[type, int] = {Dispatch: 1, Combine: 2, Shutdown: 3, Stopped: 4, Filler: 5}
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPES:
        raise ValueError(f"rows of dtype {dtype} cannot be sent; supported: {_DTYPES}")
    return _DTYPES.index(dtype)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(-1).view(torch.uint8)


def message_capacity(max_rows: int, hidden_size: int, element_bytes: int = 4) -> int:
    """Bytes of the largest message carrying ``max_rows`` rows of width ``hidden_size``."""
    return HEADER_BYTES + max_rows * (8 + hidden_size * element_bytes)


def encode(message: Message, sender: int) -> torch.Tensor:
    """uint8 [64 + body bytes]: the header, then the body."""
    fields = [_KINDS[type(message)], sender, 0, 0, 0, 0, 0, 0]
    parts: list[torch.Tensor] = []
    if isinstance(message, Dispatch):
        n, width = message.rows.shape
        parts = [_as_bytes(message.expert_ids.to(torch.int64)), _as_bytes(message.rows)]
        fields[3:8] = [message.micro_batch, message.layer, n, width, _dtype_code(message.rows.dtype)]
    elif isinstance(message, Combine):
        n, width = message.outputs.shape
        parts = [_as_bytes(message.outputs)]
        fields[3:8] = [message.micro_batch, message.layer, n, width, _dtype_code(message.outputs.dtype)]
    fields[2] = sum(part.numel() for part in parts)
    header = torch.tensor(fields, dtype=torch.int64).view(torch.uint8)  # [64]
    return torch.cat([header, *parts]) if parts else header


def decode(buffer: torch.Tensor) -> Message:
    """The message at the start of ``buffer`` (uint8, maybe longer); tensors are copied out of it."""
    fields = buffer[:HEADER_BYTES].view(torch.int64).tolist()
    kind, sender, body_bytes, micro_batch, layer, n, width, dtype_code = fields[:_HEADER_FIELDS]
    body = buffer[HEADER_BYTES : HEADER_BYTES + body_bytes]
    if kind == _KINDS[Shutdown]:
        return Shutdown()
    if kind == _KINDS[Stopped]:
        return Stopped(sender=sender)
    if kind == _KINDS[Filler]:
        return Filler()
    dtype = _DTYPES[dtype_code]
    if kind == _KINDS[Dispatch]:
        ids = body[: n * 8].view(torch.int64).clone()  # [n]
        rows = body[n * 8 :].view(dtype).view(n, width).clone()  # [n, D]
        return Dispatch(micro_batch=micro_batch, layer=layer, rows=rows, expert_ids=ids)
    if kind == _KINDS[Combine]:
        outputs = body.view(dtype).view(n, width).clone()  # [n, D]
        return Combine(micro_batch=micro_batch, layer=layer, sender=sender, outputs=outputs)
    raise ValueError(f"unknown message kind {kind} in header {fields}")


def encode_control(control: SyncControl) -> torch.Tensor:
    """int64 [2 + E]: ``[stop, layer, expert_counts...]``."""
    head = torch.tensor([int(control.stop), control.layer], dtype=torch.int64)
    return torch.cat([head, control.expert_counts.to(torch.int64)])


def decode_control(row: torch.Tensor) -> SyncControl:
    """Inverse of :func:`encode_control` for one int64 [2 + E] row."""
    return SyncControl(stop=bool(row[0]), layer=int(row[1]), expert_counts=row[2:])


def control_width(num_experts: int) -> int:
    return 2 + num_experts


class Doorbell:
    """This rank's doorbell: a datagram socket in ``directory`` that peers ring once per message.

    A ring carries the sender's rank. ``rung()`` returns the rings that arrived, oldest first,
    without blocking; ``wait(timeout_s)`` blocks until at least one arrives.
    """

    def __init__(self, directory: str, rank: int) -> None:
        self.directory = directory
        self.rank = rank
        self._inbound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._inbound.bind(self.address(rank))
        self._inbound.setblocking(False)
        self._outbound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def address(self, rank: int) -> str:
        return os.path.join(self.directory, f"doorbell-{rank}")

    def ring(self, destination: int) -> None:
        self._outbound.sendto(struct.pack("<i", self.rank), self.address(destination))

    def rung(self) -> list[int]:
        senders: list[int] = []
        while True:
            try:
                data = self._inbound.recv(4)
            except BlockingIOError:
                return senders
            senders.append(struct.unpack("<i", data)[0])

    def wait(self, timeout_s: float) -> list[int]:
        readable, _, _ = select.select([self._inbound], [], [], timeout_s)
        if not readable:
            raise TimeoutError(f"rank {self.rank}: no message for {timeout_s} s")
        return self.rung()

    def fileno(self) -> int:
        return self._inbound.fileno()

    def close(self) -> None:
        self._inbound.close()
        self._outbound.close()


@dataclass
class Outbox:
    """Sends typed messages from one rank; each send is one non-blocking gloo send and a doorbell ring."""

    rank: int
    depth: int
    """Receives the peers keep posted (the Filler count after a final message is depth - 1)."""
    doorbell: Doorbell
    _sends: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list)

    def send(self, message: Message, destination: int) -> None:
        payload = encode(message, self.rank)
        work = dist.isend(payload, destination, tag=MESSAGE_TAG)
        assert work is not None
        self._sends.append((work, payload))  # the tensor must outlive the send
        if not isinstance(message, Filler):  # Fillers are taken by Inbox.close, unannounced
            self.doorbell.ring(destination)
        if len(self._sends) > 64:
            self.flush()

    def send_final(self, message: Shutdown | Stopped, destination: int) -> None:
        """The last message to ``destination`` in this phase, then Fillers for its posted receives."""
        self.send(message, destination)
        for _ in range(self.depth - 1):
            self.send(Filler(), destination)

    def flush(self) -> None:
        """Wait until every send has completed (each work is waited exactly once)."""
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


class Inbox:
    """Messages from one peer rank, received into ``depth`` buffers of ``capacity`` bytes posted ahead.

    ``receive`` returns messages in the order they were sent, waiting for the next one. After a
    final message (Shutdown or Stopped) no buffer is posted again; :meth:`close` then takes the
    sender's Fillers.
    """

    def __init__(self, source: int, capacity: int, depth: int) -> None:
        if depth < 1 or capacity < HEADER_BYTES:
            raise ValueError(
                f"an inbox needs depth >= 1 and capacity >= {HEADER_BYTES}, got {depth}, {capacity}"
            )
        self.source = source
        self._posted: list[tuple[dist.Work, torch.Tensor]] = []
        self._finished = False
        for _ in range(depth):
            self._post(torch.empty(capacity, dtype=torch.uint8))

    def _post(self, buffer: torch.Tensor) -> None:
        work = dist.irecv(buffer, src=self.source, tag=MESSAGE_TAG)
        assert work is not None
        self._posted.append((work, buffer))

    def receive(self) -> Message:
        """The next message, waiting for it (up to the process group's timeout)."""
        work, buffer = self._posted.pop(0)
        work.wait()  # a gloo receive may be waited on only once
        message = decode(buffer)
        if isinstance(message, Shutdown | Stopped):
            self._finished = True
        if not self._finished:
            self._post(buffer)
        return message

    def close(self) -> None:
        """After the final message: take the Fillers that match the receives still posted."""
        assert self._finished, "close an inbox only after its final message"
        while self._posted:
            message = self.receive()
            assert isinstance(message, Filler), f"expected a Filler after the final message, got {message!r}"


class InboxSet:
    """Messages from several peers in arrival order, taken in the calling thread (no receiver threads:
    in a busy process a receiver thread competes with the computing thread for the GIL and,
    preempted while holding it, stalls it for a scheduler time slice)."""

    def __init__(
        self, doorbell: Doorbell, sources: list[int], capacity: int, depth: int, timeout_s: float
    ) -> None:
        self.doorbell = doorbell
        self.inboxes = {source: Inbox(source, capacity, depth) for source in sources}
        self.timeout_s = timeout_s
        self._announced: list[int] = []

    def _take(self) -> Message:
        inbox = self.inboxes[self._announced.pop(0)]
        message = inbox.receive()
        if isinstance(message, Shutdown | Stopped):
            inbox.close()
        return message

    def ready(self) -> bool:
        """True when a message has been announced (then :meth:`receive` hardly waits)."""
        self._announced.extend(self.doorbell.rung())
        return bool(self._announced)

    def poll(self) -> Message | None:
        """An announced message, else None; never waits for one to be sent."""
        return self._take() if self.ready() else None

    def ready_within(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a message to be announced; True if one was."""
        if not self.ready():
            readable, _, _ = select.select([self.doorbell.fileno()], [], [], max(0.0, timeout_s))
            if readable:
                self._announced.extend(self.doorbell.rung())
        return bool(self._announced)

    def receive(self) -> Message:
        """The next message from any peer, waiting for it (TimeoutError after ``timeout_s``)."""
        if not self.ready():
            self._announced.extend(self.doorbell.wait(self.timeout_s))
        return self._take()
