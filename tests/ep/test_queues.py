"""The async expert worker's mu-queues: hold and flush rules and what the scheduler sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve.ep.async_ import MuQueues, _Queued
from moeserve.ep.config import EPConfig, FailureInjection
from moeserve.sim.schedulers import LAYER_SCHEDULERS


def _entry(rows: int, arrived: float) -> _Queued:
    return _Queued(0, torch.zeros(rows, 4), torch.zeros(rows, dtype=torch.int64), arrived)


def test_layers_wait_for_the_hold_threshold_or_the_flush_deadline() -> None:
    queues = MuQueues(num_layers=3, top_k=2, hold_rows=np.array([4.0, 4.0, 4.0]), flush_after_s=1.0)
    queues.push(0, _entry(2, arrived=10.0))
    queues.push(1, _entry(5, arrived=10.0))
    assert queues.eligible(now=10.5).tolist() == [False, True, False]
    assert queues.eligible(now=11.0).tolist() == [True, True, False]


def test_snapshot_counts_tokens_and_take_empties_the_layer() -> None:
    queues = MuQueues(num_layers=2, top_k=2, hold_rows=np.zeros(2), flush_after_s=0.0)
    queues.push(1, _entry(6, arrived=0.0))
    queues.push(1, _entry(2, arrived=1.0))
    snapshot = queues.snapshot(queues.eligible(now=2.0))
    assert snapshot.tokens.tolist() == [0.0, 4.0]
    assert LAYER_SCHEDULERS.get("defrag")(snapshot) == 1
    entries = queues.take(1)
    assert [entry.rows.shape[0] for entry in entries] == [6, 2]
    assert queues.empty() and len(queues.history) == 1


def test_config_rejects_bad_values_with_their_names() -> None:
    with pytest.raises(ValueError, match="processes"):
        EPConfig(processes=1)
    with pytest.raises(ValueError, match="modes"):
        EPConfig(modes=("barrier",))
    with pytest.raises(KeyError, match="defrag"):
        EPConfig(scheduler="nope")
    with pytest.raises(ValueError, match="micro_batches"):
        EPConfig(requests=2, micro_batches=3)
    with pytest.raises(ValueError, match="inject_failure"):
        EPConfig(processes=2, inject_failure=FailureInjection(rank=5))
