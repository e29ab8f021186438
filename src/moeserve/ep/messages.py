"""Typed messages between the attention worker and the expert workers.

Shape legend: n rows (token-expert assignments) in one message, D hidden size, E experts per layer.

Every value crossing a process boundary is one of these dataclasses; :mod:`moeserve.ep.serialize`
is the only place that turns them into bytes and back. ``sender`` fields hold the sender's rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyncControl:
    """sync mode, attention -> each expert worker, once per layer call: what the next exchange carries.

    ``stop`` ends the sync phase (then ``layer`` and ``expert_counts`` are ignored).
    """

    stop: bool
    layer: int
    expert_counts: torch.Tensor  # [E] int64 rows per expert, zero for experts the receiver does not hold


@dataclass(frozen=True)
class Dispatch:
    """async mode, attention -> expert worker: one micro-batch's rows for this worker at one layer.

    Rows are grouped by expert id, ascending; within an expert, in token order.
    """

    micro_batch: int
    layer: int
    rows: torch.Tensor  # [n, D] hidden states
    expert_ids: torch.Tensor  # [n] int64 expert of each row


@dataclass(frozen=True)
class Combine:
    """async mode, expert worker -> attention: unweighted expert outputs for one Dispatch, same row order."""

    micro_batch: int
    layer: int
    sender: int
    outputs: torch.Tensor  # [n, D]


@dataclass(frozen=True)
class Shutdown:
    """async mode, attention -> expert worker: nothing more will come; answer with Stopped."""


@dataclass(frozen=True)
class Stopped:
    """async mode, expert worker -> attention: every queued row has been served and sent back."""

    sender: int


@dataclass(frozen=True)
class Filler:
    """Transport only: matches a receive the peer posted ahead after the conversation's final message."""


Message = Dispatch | Combine | Shutdown | Stopped | Filler
