"""Prometheus metrics: request metrics under vLLM's names (``moeserve:`` prefix) and MoE metrics.

Request metrics are observed as engine outputs arrive. MoE metrics are read at scrape time
from the model (a routing observer counts tokens per expert per layer) and from whichever
memory features are on: the expert cache's hits, misses and stalled loads, the committee's
gate mass served exactly. Each server has its own registry, so several can live in one
process (tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from moeserve.engine.engine import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class ExpertLoadCounter:
    """Routing observer: tokens routed to each expert of each MoE layer, since the server started.

    The engine thread only keeps each step's expert ids (a list append); they are counted in one
    ``bincount`` every ``FOLD_EVERY`` steps of a layer and when the counts are read, so
    observing costs no tensor operations per step.
    """

    FOLD_EVERY = 256

    def __init__(self, model, attach: bool = True) -> None:
        import torch

        self.model = model
        self.counts = [torch.zeros(layer.experts.num_experts, dtype=torch.long) for layer in model.layers]
        self._pending: list[list] = [[] for _ in model.layers]
        self._lock = threading.Lock()
        if attach:
            self.attach()

    def attach(self) -> None:
        """Start observing the model's MoE layers (once)."""
        for layer in self.model.layers:
            if self.observe not in layer.observers:
                layer.observers.append(self.observe)

    def observe(self, layer_index: int, routing) -> None:
        with self._lock:  # the scrape thread may be folding this layer's list
            pending = self._pending[layer_index]
            pending.append(routing.topk_ids)
            full = len(pending) >= self.FOLD_EVERY
        if full:
            self._fold(layer_index)

    def _fold(self, layer_index: int) -> None:
        import torch

        with self._lock:
            pending, self._pending[layer_index] = self._pending[layer_index], []
        if not pending:
            return
        ids = torch.cat([ids.reshape(-1) for ids in pending]).cpu()  # [steps * T * k]
        counted = torch.bincount(ids, minlength=self.counts[layer_index].numel())
        with self._lock:
            self.counts[layer_index] += counted

    def snapshot(self) -> list[list[int]]:
        for layer_index in range(len(self.counts)):
            self._fold(layer_index)
        with self._lock:
            return [counts.tolist() for counts in self.counts]

    def detach(self) -> None:
        for layer in self.model.layers:
            if self.observe in layer.observers:
                layer.observers.remove(self.observe)

class MoECollector:
    """Scrape-time MoE metrics from the load counter, expert cache and committee, where present."""

    def __init__(self, loads: ExpertLoadCounter | None, cache: Any = None, committee: Any = None,
                 expert_parallel: Any = None) -> None:
        self.loads = loads
        self.cache = cache
        self.committee = committee
        self.expert_parallel = expert_parallel
        """``moeserve.ep.metrics.AttentionStats`` of a sync expert-parallel deployment."""

    def collect(self) -> Iterator[Metric]:
        if self.loads is not None:
            load = CounterMetricFamily("moeserve:expert_load_tokens", "Tokens routed to each expert", labels=["layer", "expert"])
            balance = GaugeMetricFamily(
                "moeserve:expert_balancedness", "Mean over max tokens per expert of each MoE layer since start (1 = even)",
                labels=["layer"],
            )
            for layer, counts in enumerate(self.loads.snapshot()):
                for expert, tokens in enumerate(counts):
                    load.add_metric([str(layer), str(expert)], tokens)
                busiest = max(counts)
                balance.add_metric([str(layer)], (sum(counts) / len(counts)) / busiest if busiest else 1.0)
            yield load
            yield balance
        if self.cache is not None:
            stats = self.cache.stats()
            for name, value, text in (
                ("hits", stats.hits, "Expert uses found resident"),
                ("misses", stats.misses, "Expert uses that waited for a load"),
                ("loads", stats.loads, "Experts read from the checkpoint"),
                ("stalled_loads", stats.stalled_uses, "Expert uses stalled on a load"),
            ):
                yield CounterMetricFamily(f"moeserve:expert_cache_{name}", text, value=value)
            yield GaugeMetricFamily("moeserve:expert_cache_resident_bytes", "Expert bytes resident", value=stats.resident_bytes)
            yield GaugeMetricFamily("moeserve:expert_cache_budget_bytes", "Expert memory budget", value=stats.budget_bytes)
        if self.committee is not None:
            telemetry = self.committee.telemetry()
            served = GaugeMetricFamily(
                "moeserve:committee_gate_mass_served_exactly", "Share of routed gate mass served by resident experts",
                labels=["layer"],
            )
            for layer, values in telemetry["layers"].items():
                served.add_metric([str(layer)], values["served_exactly"])
            served.add_metric(["all"], telemetry["served_exactly"])
            yield served
            scheduler = telemetry.get("scheduler")
            if scheduler is not None:
                yield CounterMetricFamily("moeserve:committee_swaps_started", "Committee member swaps begun by the online scheduler",
                                          value=scheduler["swaps_started"])
                yield CounterMetricFamily("moeserve:committee_swaps_completed", "Committee member swaps whose expert joined",
                                          value=scheduler["swaps_completed"])
        if self.expert_parallel is not None:
            stats = self.expert_parallel
            rows = CounterMetricFamily("moeserve:ep_worker_rows", "Token rows sent to each expert worker",
                                       labels=["layer", "worker"])
            balance = GaugeMetricFamily(
                "moeserve:ep_balancedness", "Mean over max rows per expert worker of each MoE layer since start",
                labels=["layer"],
            )
            for layer, per_worker in enumerate(stats.worker_rows):
                for worker, count in enumerate(per_worker):
                    rows.add_metric([str(layer), str(worker)], count)
                busiest = max(per_worker)
                balance.add_metric([str(layer)], (sum(per_worker) / len(per_worker)) / busiest if busiest else 1.0)
            yield rows
            yield balance
            yield CounterMetricFamily("moeserve:ep_expert_wait_seconds", "Time the attention worker waited on expert "
                                      "workers (barrier all-to-all, sync mode)", value=stats.expert_wait_s)


class ServerMetrics:
    """The server's registry, fed with engine outputs by the engine loop."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], moe: MoECollector | None = None) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes etc.
        Gauge("moeserve:num_requests_running", "Requests in the running batch", registry=self.registry).set_function(running)
        Gauge("moeserve:num_requests_waiting", "Requests waiting for a slot", registry=self.registry).set_function(waiting)
        self.time_to_first_token = Histogram(
            "moeserve:time_to_first_token_seconds", "Arrival to first token", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.inter_token_latency = Histogram(
            "moeserve:inter_token_latency_seconds", "Time between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "moeserve:e2e_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.prompt_tokens = Counter("moeserve:prompt_tokens", "Prompt tokens of finished requests", registry=self.registry)
        self.generation_tokens = Counter("moeserve:generation_tokens", "Generated tokens", registry=self.registry)
        self.request_success = Counter(
            "moeserve:request_success", "Finished requests by finish reason", ["finished_reason"], registry=self.registry
        )
        self.rejected = Counter("moeserve:request_errors", "Requests answered with an error status (4xx, 429, 5xx)", ["status"],
                                registry=self.registry)
        if moe is not None:
            self.registry.register(moe)
        self._last_token_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def observe(self, output: RequestOutput) -> None:
        """Account one engine output (called on the engine thread)."""
        with self._lock:
            if output.token_ids:
                self.generation_tokens.inc(len(output.token_ids))
                previous = self._last_token_at.get(output.request_id)
                if previous is None and output.first_token_time is not None:
                    self.time_to_first_token.observe(output.first_token_time - output.arrival_time)
                elif previous is not None:
                    self.inter_token_latency.observe(output.now - previous)
                self._last_token_at[output.request_id] = output.now
            if output.finished:
                self._last_token_at.pop(output.request_id, None)
                self.e2e_latency.observe(output.now - output.arrival_time)
                self.prompt_tokens.inc(output.prompt_tokens)
                self.request_success.labels(finished_reason=output.finish_reason or "unknown").inc()
