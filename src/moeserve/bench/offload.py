"""``moeserve bench offload``: generation under an expert-memory budget, side by side.

For each budget, the same greedy generation runs with every experts fully resident (the
baseline) and through the expert cache under each policy, in one process: tokens/s, resident
bytes, process RSS, hit rate next to Belady's (replayed from the step log of the LRU run, so
both see the same expert requests), stalled expert uses, and whether the generated tokens are
identical to the baseline's (exact policies must be). ``--committee`` adds a parameter
committee row per budget; ``--large`` builds and uses a random-weight Mixtral of 5.6 GB.

``warmup_tokens`` > 0 first generates that many tokens from a different prompt in every row
(the baseline too) and counts only the generation after it, as a server whose cache already
holds what earlier requests left: steady state instead of a cold start. The RSS column is read
while each row's cache is in place, right after its timed generation.

``device`` puts the model (and the caches' slots) on ``cuda``; the resident baseline then runs
its own backend (``grouped_mm``) and the caches a per-expert loop, so "identical" may be no by
rounding there. ``host_memory`` gives the policy rows' caches (and the committee's) a host
tier: their rows report its hits (loads that read no disk), the disk loads and the most it
held; the LRU and Belady rows that measure hit rates run without one (it does not change them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from moeserve.config import SamplingConfig
from moeserve.engine.generate import generate, warm_up
from moeserve.memory.offload import apply_expert_cache, remove_expert_cache
from moeserve.memory.policies import EVICTION_POLICIES
from moeserve.models.loader import load_model

WARMUP_PROMPT = "class Counter:\n    def __init__(self):\n        self.counts = {}\n\n    def add(self, key):\n"
DEFAULT_PROMPT = 'import os\nimport sys\n\n\ndef main(argv):\n    """Print every argument."""\n    for name in argv:\n'


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class OffloadRow:
    budget: str
    policy: str
    """``resident`` for the all-experts-resident baseline."""
    prefetch: bool
    tokens_per_s: float
    budget_bytes: int
    max_resident_bytes: int
    rss_bytes: int
    hit_rate: float | None
    belady_hit_rate: float | None
    stalled_uses: int
    loads: int
    identical_to_resident: bool
    token_agreement: float
    """Share of generated positions whose token equals the resident run's (1.0 for exact policies)."""
    served_exactly: float | None = None
    """Committee rows: share of routed gate mass served by the expert the router chose."""
    host_tier: str = "none"
    """``none``, ``ram`` (a second RAM tier, CPU) or ``pinned`` (before a GPU)."""
    host_budget_bytes: int = 0
    host_hits: int = 0
    """Loads served from the host tier (no disk read)."""
    disk_loads: int = 0
    """Loads that read the checkpoint."""
    bytes_read: int = 0
    """Checkpoint bytes read during the timed generation."""
    max_host_resident_bytes: int = 0


@dataclass
class OffloadBenchResult:
    model: str
    new_tokens: int
    threads: int
    expert_bytes: int
    rows: list[OffloadRow] = field(default_factory=list)
    cold_reads: bool = False
    temperature: float = 0.0
    warmup_tokens: int = 0
    committee_swaps: int = 0
    device: str = "cpu"
    host_memory: str | None = None

    def to_dict(self) -> dict:
        return {
            "benchmark": "offload",
            "model": self.model,
            "new_tokens": self.new_tokens,
            "threads": self.threads,
            "expert_bytes": self.expert_bytes,
            "cold_reads": self.cold_reads,
            "temperature": self.temperature,
            "warmup_tokens": self.warmup_tokens,
            "committee_swaps": self.committee_swaps,
            "device": self.device,
            "host_memory": self.host_memory,
            "results": [asdict(row) for row in self.rows],
        }


def _timed_generation(model, prompt: str, new_tokens: int, temperature: float = 0.0) -> tuple[list[int], float]:
    # Seeded: every run draws the same random numbers, so exact policies still give identical tokens.
    sampling = SamplingConfig(max_new_tokens=new_tokens, stop_at_eos=False, temperature=temperature, seed=0)
    result = generate(model, prompt, sampling)
    return result.token_ids, result.tokens_per_s


def _measured_generation(model, cache, prompt: str, new_tokens: int, temperature: float,
                         warmup_tokens: int, also_reset=()) -> tuple[list[int], float, int]:
    """(tokens, tokens/s, RSS bytes) of one row's timed generation, after its warm-up if any.

    With a warm-up the cache's counters restart after it (``reset_stats``; residency stays), so
    the row's hit rate, loads and stalls are the timed generation's alone; ``also_reset``: more
    counters to restart there (the committee's telemetry).
    """
    if warmup_tokens > 0:
        _timed_generation(model, WARMUP_PROMPT, warmup_tokens, temperature)
        if cache is not None:
            cache.reset_stats()
        for reset in also_reset:
            reset()
    ids, tokens_per_s = _timed_generation(model, prompt, new_tokens, temperature)
    if cache is not None:
        cache.wait_for_prefetch()
    return ids, tokens_per_s, current_rss_bytes()


def run_offload_bench(
    model_path: Path | None,
    budgets: list[str],
    policies: list[str],
    prefetch: bool = False,
    new_tokens: int = 64,
    prompt: str = DEFAULT_PROMPT,
    committee: bool = False,
    calibration_tokens: int = 8192,
    cold_reads: bool = False,
    temperature: float = 0.0,
    warmup_tokens: int = 0,
    committee_swaps: int = 0,
    device: str = "cpu",
    host_memory: str | None = None,
    committee_warm_in: bool = False,
) -> OffloadBenchResult:
    """Run the baseline and every (budget, policy) configuration; see the module docstring.

    ``cold_reads``: ask that expert loads read the storage device, not the page cache (the
    checkpoint's pages are dropped before and after each read; advisory), as on a machine whose
    RAM cannot also cache the checkpoint. ``temperature`` > 0 samples (seeded) instead of greedy decoding.
    ``warmup_tokens``: see the module docstring. ``committee_swaps`` > 0 runs the committee rows
    with the online scheduler (up to that many asynchronous member swaps per layer per step).
    ``device`` and ``host_memory``: see the module docstring. In the committee row every
    planned member is a member from the first token, read when a token first needs it;
    ``committee_warm_in`` adds a row ``committee-warm-in`` whose members warm in from the cold
    cache on the background loader while tokens use the members resident (``generate``/``serve``
    ``--committee-warm-in``).
    """
    if warmup_tokens < 0:
        raise ValueError(f"warmup_tokens must be >= 0, got {warmup_tokens}")
    if committee_warm_in and not committee:
        raise ValueError("committee_warm_in (--committee-warm-in) adds a committee row: it needs committee (--committee)")
    for policy in policies:
        if EVICTION_POLICIES.get(policy).needs_stream or not EVICTION_POLICIES.get(policy).online:
            raise ValueError(f"policy {policy!r} cannot run live (it needs the whole stream or the future)")
    model = load_model(model_path, device=device)
    warm_up(model)
    baseline_ids, baseline_tps, baseline_rss = _measured_generation(model, None, prompt, new_tokens, temperature,
                                                                    warmup_tokens)
    first = model.layers[0].experts
    expert_bytes = sum(
        (layer.experts.gate_up(0).numel() + layer.experts.down(0).numel()) * first.gate_up(0).element_size()
        * layer.experts.num_experts
        for layer in model.layers
    )
    result = OffloadBenchResult(str(model.path), new_tokens, torch.get_num_threads(), expert_bytes,
                                cold_reads=cold_reads, temperature=temperature, warmup_tokens=warmup_tokens,
                                committee_swaps=committee_swaps, device=str(model.device), host_memory=host_memory)
    result.rows.append(
        OffloadRow("100%", "resident", False, baseline_tps, expert_bytes, expert_bytes, baseline_rss,
                   None, None, 0, 0, True, 1.0)
    )
    calibration = _calibration_tokens(model, calibration_tokens) if committee else None
    for budget in budgets:
        # The LRU run records its step log (warm-up included), so Belady replays exactly the same
        # expert requests; its counters, like every row's, cover the timed generation only.
        cache = apply_expert_cache(model, budget, "lru", record_steps=True, cold_reads=cold_reads)
        try:
            _measured_generation(model, cache, prompt, new_tokens, temperature, warmup_tokens)
            step_log = list(cache.step_log or [])
        finally:
            remove_expert_cache(model, cache)
        cache = apply_expert_cache(model, budget, "belady", future=step_log, cold_reads=cold_reads)
        try:
            _measured_generation(model, cache, prompt, new_tokens, temperature, warmup_tokens)
            belady_hit_rate = _rate(cache.stats().hit_rate)
        finally:
            remove_expert_cache(model, cache)
        for policy in policies:
            cache = apply_expert_cache(model, budget, policy, prefetch=prefetch, cold_reads=cold_reads,
                                       host_memory=host_memory)
            try:
                ids, tokens_per_s, rss = _measured_generation(model, cache, prompt, new_tokens, temperature,
                                                              warmup_tokens)
                stats = cache.stats()
            finally:
                remove_expert_cache(model, cache)
            result.rows.append(
                OffloadRow(budget, policy, prefetch, tokens_per_s, stats.budget_bytes, stats.max_resident_bytes,
                           rss, _rate(stats.hit_rate), belady_hit_rate, stats.stalled_uses,
                           stats.loads, ids == baseline_ids, _agreement(ids, baseline_ids), **_tier_figures(stats))
            )
        if calibration is not None:
            for warm_in in (False, True) if committee_warm_in else (False,):
                result.rows.append(_committee_row(model, budget, expert_bytes, calibration, prompt, new_tokens,
                                                  baseline_ids, cold_reads, temperature, warmup_tokens, committee_swaps,
                                                  host_memory, warm_in))
    return result


def _tier_figures(stats) -> dict:
    """The OffloadRow fields a cache's host tier and disk reads fill."""
    return {
        "host_tier": stats.host_tier,
        "host_budget_bytes": stats.host_budget_bytes,
        "host_hits": stats.host_hits,
        "disk_loads": stats.disk_loads,
        "bytes_read": stats.bytes_read,
        "max_host_resident_bytes": stats.max_host_resident_bytes,
    }


def _agreement(ids: list[int], reference: list[int]) -> float:
    """Share of positions where the two generations agree (teacher-forcing is not used: the
    first divergence usually changes what follows, so this is a lower bound on per-step agreement)."""
    if not reference:
        return 1.0
    return sum(a == b for a, b in zip(ids, reference, strict=False)) / len(reference)


def _calibration_tokens(model, count: int) -> torch.Tensor:
    from moeserve.models.reference import reference_split_tokens

    return reference_split_tokens(model.tokenizer, held_out=False, max_tokens=count)


def _committee_row(model, budget: str, expert_bytes: int, calibration: torch.Tensor, prompt: str,
                   new_tokens: int, baseline_ids: list[int], cold_reads: bool = False,
                   temperature: float = 0.0, warmup_tokens: int = 0, committee_swaps: int = 0,
                   host_memory: str | None = None, warm_in: bool = False) -> OffloadRow:
    """The committee under the same budget: members sized to it, served through the LRU cache,
    each loaded when a token first needs it (``warm_in``: row ``committee-warm-in``, members
    warm in from the cold cache in the background)."""
    from moeserve.memory.cache import parse_expert_memory
    from moeserve.memory.committee import (
        CommitteeScheduler,
        apply_committee,
        plan_committee,
        remove_committee,
    )

    fraction = parse_expert_memory(budget).resolve(expert_bytes) / expert_bytes
    plan = plan_committee(model, calibration, fraction)
    gate = apply_committee(model, plan.members_by_layer())
    try:
        cache = apply_expert_cache(model, budget, "lru", cold_reads=cold_reads, host_memory=host_memory)
        scheduler = None
        if committee_swaps or warm_in:
            scheduler = CommitteeScheduler(model, gate, max_swaps=committee_swaps, cache=cache, step_every=1,
                                           warm_in=plan.ranked_members() if warm_in else None)
        try:
            ids, tokens_per_s, rss = _measured_generation(model, cache, prompt, new_tokens, temperature, warmup_tokens,
                                                          also_reset=(gate.reset_telemetry,))
            stats = cache.stats()
        finally:
            if scheduler is not None:
                scheduler.close()
            remove_expert_cache(model, cache)
        served = float(gate.telemetry()["served_exactly"])
    finally:
        remove_committee(model, gate)
    return OffloadRow(budget, "committee-warm-in" if warm_in else "committee", False, tokens_per_s, stats.budget_bytes, stats.max_resident_bytes,
                      rss, _rate(stats.hit_rate), None, stats.stalled_uses, stats.loads,
                      ids == baseline_ids, _agreement(ids, baseline_ids), served, **_tier_figures(stats))


def _rate(value: float) -> float | None:
    """A hit rate for JSON: NaN (no expert uses) becomes None."""
    return None if math.isnan(value) else value


def render_table(result: OffloadBenchResult) -> Table:
    host = "" if result.host_memory is None else f", host tier {result.host_memory}"
    table = Table(title=f"{result.model}: {result.new_tokens} greedy tokens, {result.threads} thread(s), "
                        f"{result.device}{host}")
    for column in ("budget", "policy", "tokens/s", "max resident MiB", "RSS MiB", "hit rate", "belady",
                   "stalled uses", "host hits", "disk MiB", "identical", "agreement"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(
            row.budget,
            row.policy + (" +prefetch" if row.prefetch else ""),
            f"{row.tokens_per_s:.1f}",
            f"{row.max_resident_bytes / 2**20:.2f}",
            f"{row.rss_bytes / 2**20:.0f}",
            "-" if row.hit_rate is None else f"{row.hit_rate:.3f}",
            "-" if row.belady_hit_rate is None else f"{row.belady_hit_rate:.3f}",
            str(row.stalled_uses),
            "-" if row.host_tier == "none" else str(row.host_hits),
            f"{row.bytes_read / 2**20:.1f}",
            "yes" if row.identical_to_resident else "no",
            f"{row.token_agreement:.3f}",
        )
    return table
