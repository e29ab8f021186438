"""The one-process reference: the same requests through the plain model, every expert local.

Expert parallelism must not change outputs; tests compare every mode against this.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moeserve.ep.config import EPConfig
from moeserve.ep.requests import RequestRecord
from moeserve.ep.workload import TraceWorkload, build_workload


@dataclass
class LocalResult:
    record: RequestRecord
    wall_s: float


@torch.inference_mode()
def run_local(config: EPConfig) -> LocalResult:
    """Run ``config.requests`` as one batch in this process (``processes`` and modes are ignored)."""
    workload = build_workload(config)
    if isinstance(workload, TraceWorkload):
        workload.local_experts()
    record = RequestRecord(config.requests, config.new_tokens)
    start = time.perf_counter()
    record.body(workload, slice(0, config.requests), config.prompt_tokens)()
    return LocalResult(record, time.perf_counter() - start)
