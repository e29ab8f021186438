"""The parameter committee (PC-MoE / SwapMoE, arXiv 2308.15030): the lossy core.

Under a hard expert-memory budget a small per-layer *committee* of important experts stays
resident, and routing is masked to it, so a token never waits for a load:

* :class:`CommitteeGate` is a routing transform on every MoE layer (``MoELayer.routing_transforms``).
  A token whose top-k experts are all members keeps its routing bit for bit. A token with a
  non-member in its top-k is re-routed among the members only: for softmax routers (Mixtral,
  Qwen2/3-MoE, OLMoE) the router probabilities are restricted to the members, the top-k is
  taken there and renormalised exactly as the family does (Mixtral always; the others when
  ``config.norm_topk_prob``), which equals a softmax over the members followed by top-k. For
  other routers (DeepSeek-V3's sigmoid with groups, DeepSeek-V2's scaled softmax with optional group limits), or when the router gives no logits, the
  non-member slots are dropped: they point at a member with weight 0 and the kept weights are
  rescaled to the row's original sum. Then every slot whose weight is under ``skip_threshold``
  gets weight 0 (shapes stay [T, k]). Zero-weight slots (skipped, or fillers) are marked
  ``RouterOutput.skip_zero_weights``: dispatch gives them no row, so their experts neither
  compute nor load for them (on an accelerator only with a skip threshold, since dispatch then
  waits for the kept rows' count). Telemetry: the share of the
  routed (original top-k) gate mass served exactly, i.e. on an expert that is a member and
  still carries weight in the final routing, per layer and overall.
* :func:`plan_committee` is the offline planner: it profiles per-expert gate mass on
  calibration tokens through a routing observer and sizes every layer's committee under
  ``budget_fraction`` of all experts (at least top_k per layer), greedily giving the next slot
  to whichever layer's next-best expert captures most gate mass. A :class:`CommitteePlan`
  round-trips through JSON and refuses a model it was not made for.
* :class:`CommitteeScheduler` is the online scheduler: an exponential moving average of each
  expert's recent gate mass (seen before the committee masks it) and at most N swaps per layer
  per ``step()`` toward the top of the average. With an expert cache the swaps are asynchronous
  (the incoming expert loads in the background and joins once resident); without one they
  change the gate's member set at once.

Shape legend as in :mod:`moeserve.moe.types`: T tokens, E experts, k top-k, L MoE layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeserve.moe.types import RouterOutput

if TYPE_CHECKING:
    from moeserve.memory.cache import ExpertCache
    from moeserve.models.loader import MoEModel

PLAN_FORMAT = "moeserve-committee/1"
SOFTMAX_FAMILIES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"})
"""Families whose router is softmax -> top-k (-> renormalise when configured)."""


def _renormalises(model: MoEModel) -> bool:
    """Whether the family renormalises its top-k weights to sum 1 (Mixtral always does)."""
    if model.family.model_type == "mixtral":
        return True
    return bool(getattr(model.config, "norm_topk_prob", False))


@dataclass
class LayerTelemetry:
    """Counters of one layer's committee gate (host floats, summed over calls)."""

    tokens: int = 0
    rerouted_tokens: int = 0
    """Tokens with at least one non-member in their original top-k."""
    routed_mass: float = 0.0
    """Sum of the original top-k gate weights."""
    exact_mass: float = 0.0
    """Original top-k gate weight on experts that are members and keep weight > 0 in the final routing."""
    skipped_slots: int = 0
    """Final (token, slot) assignments given weight 0 by ``skip_threshold``."""

    @property
    def served_exactly(self) -> float:
        """Share of routed gate mass served exactly (1.0 before any token)."""
        return self.exact_mass / self.routed_mass if self.routed_mass > 0 else 1.0


class CommitteeGate:
    """Routing transform masking each MoE layer's routing to its committee.

    ``members[layer]`` is the layer's committee; every layer of the model must have one with at
    least top_k members (a layer with all E experts is left untouched). Call as a
    ``RoutingTransform``: ``gate(layer_index, routing) -> routing`` with ``topk_ids`` [T, k]
    only naming members.
    """

    def __init__(
        self,
        members: Mapping[int, set[int]],
        num_experts: int,
        top_k: int,
        *,
        skip_threshold: float = 0.0,
        softmax_router: bool = True,
        renormalize: bool = True,
    ) -> None:
        if not (math.isfinite(skip_threshold) and skip_threshold >= 0):
            raise ValueError(f"skip_threshold must be a finite number >= 0, got {skip_threshold}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.skip_threshold = float(skip_threshold)
        self.softmax_router = softmax_router
        self.renormalize = renormalize
        self._masks: dict[int, torch.Tensor] = {}
        self._device_masks: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._telemetry: dict[int, LayerTelemetry] = {}
        self._pending: dict[int, torch.Tensor] = {}
        """Per layer, counters not yet read on an accelerator: float64 [4] (routed mass, exact mass,
        rerouted tokens, skipped slots), summed on the device so the gate never waits for it."""
        self.scheduler: CommitteeScheduler | None = None
        """The online scheduler changing the members, if one was attached (reported in ``telemetry``)."""
        for layer, layer_members in members.items():
            self.set_members(layer, layer_members)

    def set_members(self, layer: int, members: set[int]) -> None:
        """Replace one layer's committee (at least top_k distinct ids in [0, E))."""
        ids = sorted(set(members))
        if len(ids) < self.top_k:
            raise ValueError(f"layer {layer}: a committee needs at least top_k={self.top_k} members, got {len(ids)}")
        if ids and (ids[0] < 0 or ids[-1] >= self.num_experts):
            raise ValueError(f"layer {layer}: expert ids must be in [0, {self.num_experts}), got {ids}")
        mask = torch.zeros(self.num_experts, dtype=torch.bool)
        mask[ids] = True
        self._masks[layer] = mask
        self._device_masks = {key: value for key, value in self._device_masks.items() if key[0] != layer}
        self._telemetry.setdefault(layer, LayerTelemetry())

    def members(self, layer: int) -> set[int]:
        """The layer's current committee."""
        return {int(e) for e in self._masks[layer].nonzero().flatten().tolist()}

    @property
    def layers(self) -> list[int]:
        return sorted(self._masks)

    def __call__(self, layer: int, routing: RouterOutput) -> RouterOutput:
        mask = self._masks.get(layer)
        if mask is None:
            raise KeyError(f"no committee for MoE layer {layer}; have layers {self.layers}")
        ids, weights = routing.topk_ids, routing.topk_weights  # [T, k], [T, k]
        if ids.device.type != "cpu":
            return self._call_without_sync(layer, routing)
        slot_member = mask[ids]  # [T, k]
        row_ok = slot_member.all(dim=1)  # [T]
        all_ok = bool(row_ok.all())
        if all_ok:
            new_ids, new_weights = ids, weights
        else:
            sub_ids, sub_weights = self._reroute(mask, routing)
            keep = row_ok[:, None]
            new_ids = torch.where(keep, ids, sub_ids)
            new_weights = torch.where(keep, weights, sub_weights.to(weights.dtype))
        skipped = 0
        if self.skip_threshold > 0:
            low = new_weights < self.skip_threshold
            skipped = int(low.sum())
            if skipped:
                new_weights = new_weights.masked_fill(low, 0)
        self._account(layer, mask, ids, weights, new_ids, new_weights, all_ok, row_ok, skipped)
        if all_ok and not skipped:
            return routing
        return RouterOutput(topk_ids=new_ids, topk_weights=new_weights, logits=routing.logits,
                            skip_zero_weights=True)  # filler and skipped slots run no expert

    def _call_without_sync(self, layer: int, routing: RouterOutput) -> RouterOutput:
        """:meth:`__call__` on an accelerator: the same routing with no host sync (every token's
        reroute is computed and kept only where a slot is not a member; skipped slots are zeroed
        unconditionally; the counters add up on the device until :meth:`telemetry` reads them)."""
        ids, weights = routing.topk_ids, routing.topk_weights  # [T, k], [T, k]
        key = (layer, ids.device)
        mask = self._device_masks.get(key)
        if mask is None:
            mask = self._device_masks[key] = self._masks[layer].to(ids.device)
        row_ok = mask[ids].all(dim=1)  # [T]
        sub_ids, sub_weights = self._reroute(mask, routing)
        keep = row_ok[:, None]
        new_ids = torch.where(keep, ids, sub_ids)
        new_weights = torch.where(keep, weights, sub_weights.to(weights.dtype))
        skipped = torch.zeros((), device=ids.device)
        if self.skip_threshold > 0:
            low = new_weights < self.skip_threshold
            skipped = low.sum()
            new_weights = new_weights.masked_fill(low, 0)
        routed = weights.float()
        served = self._served(mask, ids, new_ids, new_weights)
        counters = torch.stack([routed.sum(), (routed * served).sum(), (~row_ok).sum(), skipped]).double()
        pending = self._pending.get(layer)
        self._pending[layer] = counters if pending is None else pending + counters
        self._telemetry[layer].tokens += int(ids.shape[0])
        return RouterOutput(topk_ids=new_ids, topk_weights=new_weights, logits=routing.logits,
                            skip_zero_weights=self.skip_threshold > 0)  # dispatch then syncs once

    def _fold_pending(self) -> None:
        """Add the accelerator-side counters into the host telemetry (one sync per layer)."""
        for layer, counters in self._pending.items():
            routed, exact, rerouted, skipped = counters.tolist()
            t = self._telemetry[layer]
            t.routed_mass += routed
            t.exact_mass += exact
            t.rerouted_tokens += round(rerouted)
            t.skipped_slots += round(skipped)
        self._pending = {}

    def _reroute(self, mask: torch.Tensor, routing: RouterOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing of every token among members only: ([T, k] ids, [T, k] weights)."""
        k = routing.topk_ids.shape[1]
        if self.softmax_router and routing.logits is not None:
            probs = torch.softmax(routing.logits.float(), dim=-1)  # [T, E]
            masked = probs.masked_fill(~mask, -1.0)
            values, ids = torch.topk(masked, k, dim=-1)  # [T, k]
            if self.renormalize:
                values = values / values.sum(dim=-1, keepdim=True)
            return ids, values
        # Drop non-member slots: point them at a member with weight 0, rescale the kept ones.
        ids, weights = routing.topk_ids, routing.topk_weights.float()
        member = mask[ids]  # [T, k]
        filler = mask.to(torch.int64).argmax()  # the first member (a 0-d tensor: no host sync)
        kept = weights * member
        total, kept_total = weights.sum(dim=-1, keepdim=True), kept.sum(dim=-1, keepdim=True)
        scale = torch.where(kept_total > 0, total / kept_total.clamp_min(1e-30), torch.zeros_like(total))
        return torch.where(member, ids, filler), kept * scale

    def _account(self, layer: int, mask: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 new_ids: torch.Tensor, new_weights: torch.Tensor, all_ok: bool, row_ok: torch.Tensor,
                 skipped: int) -> None:
        t = self._telemetry[layer]
        routed = weights.float()
        t.tokens += int(ids.shape[0])
        t.routed_mass += float(routed.sum())
        t.skipped_slots += skipped
        if all_ok and not skipped:
            t.exact_mass += float(routed.sum())
            return
        t.rerouted_tokens += int((~row_ok).sum())
        t.exact_mass += float((routed * self._served(mask, ids, new_ids, new_weights)).sum())

    def _served(self, mask: torch.Tensor, ids: torch.Tensor, new_ids: torch.Tensor,
                new_weights: torch.Tensor) -> torch.Tensor:
        """[T, k] whether each original slot's expert is a member and keeps weight > 0 in the final routing."""
        final = torch.zeros(ids.shape[0], self.num_experts, dtype=torch.float32, device=ids.device)
        final.scatter_add_(1, new_ids, new_weights.float())  # [T, E] final weight per expert
        return mask[ids] & (final.gather(1, ids) > 0)

    def telemetry(self) -> dict:
        """``{"layers": {i: {...LayerTelemetry, served_exactly}}, "served_exactly": overall share}``, and
        ``"scheduler"`` (swaps started and completed, the current members) when one is attached."""
        self._fold_pending()
        layers = {
            layer: {**asdict(t), "served_exactly": t.served_exactly} for layer, t in sorted(self._telemetry.items())
        }
        routed = sum(t.routed_mass for t in self._telemetry.values())
        exact = sum(t.exact_mass for t in self._telemetry.values())
        report: dict = {"layers": layers, "served_exactly": exact / routed if routed > 0 else 1.0}
        if self.scheduler is not None:
            report["scheduler"] = {"max_swaps": self.scheduler.max_swaps, "swaps_started": self.scheduler.swaps_started,
                                   "swaps_completed": self.scheduler.swaps,
                                   "warm_in_joined": self.scheduler.warm_in_joined,
                                   "warm_in_loading": sum(len(w) for w in self.scheduler.warming.values()),
                                   "members": {layer: sorted(self.members(layer)) for layer in self.layers}}
        return report

    def reset_telemetry(self) -> None:
        self._telemetry = {layer: LayerTelemetry() for layer in self._masks}
        self._pending = {}


def apply_committee(model: MoEModel, members: Mapping[int, set[int]], skip_threshold: float = 0.0) -> CommitteeGate:
    """Install a :class:`CommitteeGate` as the last routing transform of every MoE layer of ``model``.

    ``members`` maps every MoE layer index (0..L-1) to its committee. Raises ``ValueError``
    for a missing layer, an unknown expert id or fewer than top_k members, and when the model
    already has a committee.
    """
    layer_ids = [layer.layer_index for layer in model.layers]
    missing = [i for i in layer_ids if i not in members]
    if missing:
        raise ValueError(f"committee has no members for MoE layers {missing}")
    extra = sorted(set(members) - set(layer_ids))
    if extra:
        raise ValueError(f"committee names MoE layers {extra}; the model has layers 0..{len(layer_ids) - 1}")
    if any(isinstance(t, CommitteeGate) for layer in model.layers for t in layer.routing_transforms):
        raise ValueError("the model already has a committee; remove_committee() it first")
    gate = CommitteeGate(
        members,
        model.num_experts,
        model.top_k,
        skip_threshold=skip_threshold,
        softmax_router=model.family.model_type in SOFTMAX_FAMILIES,
        renormalize=_renormalises(model),
    )
    for layer in model.layers:
        layer.routing_transforms.append(gate)
    return gate


def remove_committee(model: MoEModel, gate: CommitteeGate | None = None) -> None:
    """Remove ``gate`` (None: every committee gate) from the model's routing transforms."""
    for layer in model.layers:
        layer.routing_transforms[:] = [
            t for t in layer.routing_transforms
            if not (t is gate or (gate is None and isinstance(t, CommitteeGate)))
        ]


class GateMassProfiler:
    """Routing observer summing routed top-k gate weight per expert: ``mass`` [L, E] float64."""

    def __init__(self, num_layers: int, num_experts: int) -> None:
        self.mass = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.tokens = 0

    def __call__(self, layer: int, routing: RouterOutput) -> None:
        ids = routing.topk_ids.flatten().cpu()
        self.mass[layer].index_add_(0, ids, routing.topk_weights.flatten().to(torch.float64).cpu())
        if layer == 0:
            self.tokens += int(routing.topk_ids.shape[0])


@dataclass
class CommitteePlan:
    """Per-layer committees for one model under a budget; JSON-serialisable.

    ``members[i]`` holds MoE layer i's expert ids (sorted); ``gate_mass[i][e]`` the calibration
    gate mass (share of layer i's routed mass) of expert e.
    """

    model_name: str
    num_experts: int
    num_layers: int
    top_k: int
    budget_fraction: float
    members: list[list[int]]
    gate_mass: list[list[float]] = field(default_factory=list)
    calibration_tokens: int = 0

    @property
    def total_members(self) -> int:
        return sum(len(m) for m in self.members)

    def members_by_layer(self) -> dict[int, set[int]]:
        """``{layer: set(ids)}`` for :func:`apply_committee`."""
        return {i: set(m) for i, m in enumerate(self.members)}

    def ranked_members(self) -> dict[int, list[int]]:
        """``{layer: ids}``, each layer's members by calibration gate mass, largest first (ties
        and plans without gate mass: by id), for :class:`CommitteeScheduler`'s ``warm_in``."""
        ranked = {}
        for layer, members in enumerate(self.members):
            mass = self.gate_mass[layer] if layer < len(self.gate_mass) else [0.0] * self.num_experts
            ranked[layer] = sorted(members, key=lambda expert: (-mass[expert], expert))
        return ranked

    def check_model(self, model: MoEModel) -> None:
        """Raise ``ValueError`` naming every mismatch between this plan and ``model``."""
        problems = []
        if self.model_name != model.name:
            problems.append(f"model name {self.model_name!r} != {model.name!r}")
        if self.num_experts != model.num_experts:
            problems.append(f"num_experts {self.num_experts} != {model.num_experts}")
        if self.num_layers != len(model.layers):
            problems.append(f"MoE layers {self.num_layers} != {len(model.layers)}")
        if problems:
            raise ValueError(f"committee plan does not fit model {model.name!r}: " + "; ".join(problems))

    def to_json(self) -> str:
        return json.dumps({"format": PLAN_FORMAT, **asdict(self)}, indent=1)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_json(cls, text: str, model: MoEModel | None = None) -> CommitteePlan:
        """Parse a plan; with ``model``, also check it fits (``ValueError`` naming the mismatch)."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a committee plan (expected format {PLAN_FORMAT!r})")
        data.pop("format")
        try:
            plan = cls(**data)
        except TypeError as error:
            raise ValueError(f"malformed committee plan: {error}") from None
        if model is not None:
            plan.check_model(model)
        return plan

    @classmethod
    def load(cls, path: str | Path, model: MoEModel | None = None) -> CommitteePlan:
        try:
            return cls.from_json(Path(path).read_text(), model)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def allocate_members(mass: torch.Tensor, total: int, min_per_layer: int) -> list[list[int]]:
    """Choose committees from gate mass ``[L, E]``: ``total`` members, at least ``min_per_layer`` each.

    Each layer's experts are ranked by mass (ties by id); every layer first gets its best
    ``min_per_layer``; each remaining slot goes to the layer whose next-ranked expert has the
    largest share of that layer's mass (greedy on marginal gate mass captured, optimal for
    this additive objective since each layer's ranked masses decrease).
    """
    num_layers, num_experts = mass.shape
    if not num_layers * min_per_layer <= total <= num_layers * num_experts:
        raise ValueError(
            f"{total} members cannot be split over {num_layers} layers of {num_experts} experts "
            f"with at least {min_per_layer} each (need {num_layers * min_per_layer}..{num_layers * num_experts})"
        )
    share = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)  # [L, E]
    rows: list[list[float]] = share.tolist()
    orders = [sorted(range(num_experts), key=lambda e: (-row[e], e)) for row in rows]
    counts = [min_per_layer] * num_layers
    for _ in range(total - num_layers * min_per_layer):
        best = max(
            (i for i in range(num_layers) if counts[i] < num_experts),
            key=lambda i: (rows[i][orders[i][counts[i]]], -i),
        )
        counts[best] += 1
    return [sorted(orders[i][: counts[i]]) for i in range(num_layers)]


@torch.inference_mode()
def plan_committee(model: MoEModel, calibration_token_ids: torch.Tensor, budget_fraction: float,
                   seq_len: int = 256) -> CommitteePlan:
    """Profile gate mass on ``calibration_token_ids`` [N] and plan committees of ``budget_fraction``.

    Total members = round(budget_fraction * L * E), at least top_k per layer (``ValueError``
    when the budget cannot hold that). The model runs its current routing (remove any
    committee first to profile the full router) over windows of ``seq_len`` tokens.
    """
    num_layers, num_experts, top_k = len(model.layers), model.num_experts, model.top_k
    total = round(budget_fraction * num_layers * num_experts)
    profiler = GateMassProfiler(num_layers, num_experts)
    for layer in model.layers:
        layer.observers.append(profiler)
    try:
        ids = calibration_token_ids.long().flatten()
        for start in range(0, ids.numel(), seq_len):
            window = ids[start : start + seq_len]
            model.hf_model(input_ids=window[None].to(model.device), use_cache=False)
    finally:
        for layer in model.layers:
            layer.observers.remove(profiler)
    members = allocate_members(profiler.mass, total, top_k)
    share = profiler.mass / profiler.mass.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return CommitteePlan(
        model_name=model.name,
        num_experts=num_experts,
        num_layers=num_layers,
        top_k=top_k,
        budget_fraction=budget_fraction,
        members=members,
        gate_mass=[[round(float(x), 6) for x in row] for row in share],
        calibration_tokens=profiler.tokens,
    )


class CommitteeScheduler:
    """Online committee scheduler: EMA of recent gate mass, at most ``max_swaps`` per layer per step.

    Installs a recording routing transform *before* the committee gate on every layer (so it
    sees the router's own choice, including non-members). ``step()`` folds the mass seen since
    the last step into ``ema`` [L, E] (``ema = decay * ema + (1 - decay) * share``), then per
    layer swaps the lowest-average member for the highest-average non-member while the latter
    is larger by more than the ``margin`` (relative: ``joining > (1 + margin) * leaving``; 0:
    any larger), with at most ``max_swaps`` swaps per layer begun and not yet completed. A
    margin keeps near-ties from swapping back and forth, each swap a read under a budget.

    Without ``cache`` a swap is immediate (the gate's member set changes at once; the model
    keeps every expert resident). With ``cache`` (an :class:`~moeserve.memory.cache.ExpertCache`
    serving the model under a budget) a swap is asynchronous: the outgoing member leaves the
    committee at once, which frees its slot (a committee never shrinks below top_k), and the
    incoming expert is loaded on the cache's background loader
    (:meth:`~moeserve.memory.cache.ExpertCache.load_in_background`, evicting no member); it
    joins the committee at the first ``step()`` after it is resident, so no token waits for it.
    ``step_every`` N > 0 calls ``step()`` by itself after every N forward passes (counted at the
    last MoE layer), so generation and serving need no extra hook; 0 leaves it to the caller.
    ``close()`` removes the recorder. ``swaps_started`` / ``swaps`` count swaps begun / completed.

    ``warm_in`` (with ``cache``; per layer, the planned members best first) starts from a cold
    cache without making tokens wait for members: each layer's committee begins as its members
    already resident, topped up to top_k with the best planned ones (loaded on first use: a
    token needs top_k experts), and the other planned members load on the background loader,
    every layer's best first (queued at the first ``step()``, once the first forward pass has
    loaded what it needs), joining at the first ``step()`` after they land (``warming``;
    ``warm_in_joined`` counts them). Until then the gate routes among the members resident, as
    the committee does at any time. A load that finds no slot is given up. A layer begins swaps
    once its warm-in is over.
    """

    def __init__(self, model: MoEModel, gate: CommitteeGate, *, decay: float = 0.9, max_swaps: int = 1,
                 cache: ExpertCache | None = None, step_every: int = 0, margin: float = 0.0,
                 warm_in: Mapping[int, Sequence[int]] | None = None) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if not (math.isfinite(margin) and margin >= 0.0):
            raise ValueError(f"margin must be >= 0, got {margin}")
        if max_swaps < 0 or step_every < 0:
            raise ValueError(f"max_swaps and step_every must be >= 0, got {max_swaps} and {step_every}")
        if warm_in is not None and cache is None:
            raise ValueError("warm_in needs an expert cache (without one every member is resident)")
        self.model = model
        self.gate = gate
        self.decay = decay
        self.max_swaps = max_swaps
        self.cache = cache
        self.step_every = step_every
        self.margin = margin
        self.ema = torch.zeros(len(model.layers), model.num_experts, dtype=torch.float64)
        self._profiler = GateMassProfiler(len(model.layers), model.num_experts)
        self.incoming: dict[int, set[int]] = {layer: set() for layer in range(len(model.layers))}
        """Per layer, experts chosen to join whose load has not landed yet (cache mode)."""
        self.swaps = 0
        self.swaps_started = 0
        self.warming: dict[int, list[int]] = {layer: [] for layer in range(len(model.layers))}
        """Per layer, planned members still loading at a cold start (``warm_in``), best first."""
        self.warm_in_joined = 0
        self._loads: dict[tuple[int, int], Future[Any]] = {}
        self._warm_in_queued = True  # nothing to queue unless ``warm_in`` is given
        self._forwards = 0
        self._last_layer = len(model.layers) - 1
        for layer in model.layers:
            layer.routing_transforms.insert(0, self._record)
        if warm_in is not None:
            self._start_warm_in(warm_in)

    def _start_warm_in(self, ranked: Mapping[int, Sequence[int]]) -> None:
        cache = self.cache
        assert cache is not None
        for layer, experts in ranked.items():
            order = list(dict.fromkeys(int(e) for e in experts))
            resident = [e for e in order if cache.is_resident(layer, e)]
            absent = [e for e in order if e not in resident]
            seeds = resident + absent[: max(0, self.gate.top_k - len(resident))]
            self.gate.set_members(layer, set(seeds))
            self.warming[layer] = [e for e in absent if e not in seeds]
        self._warm_in_queued = False

    def _queue_warm_in(self) -> None:
        """Queue the warm-in's background loads, at the first ``step()``: after the first forward
        pass (a benchmark's clock sees them all), whose own experts then load without them."""
        self._warm_in_queued = True
        depth = max((len(waiting) for waiting in self.warming.values()), default=0)
        for rank in range(depth):  # every layer's best absent member, then every layer's next
            for layer, waiting in self.warming.items():
                if rank < len(waiting):
                    self._load(layer, waiting[rank])

    def _load(self, layer: int, expert: int) -> None:
        assert self.cache is not None
        keep = self.gate.members(layer) | self.incoming[layer] | set(self.warming[layer])
        self._loads[(layer, expert)] = self.cache.load_in_background(layer, expert, keep=keep)

    def _warm(self, layer: int, members: set[int]) -> bool:
        """Join the layer's warm-in members that landed; give up those whose load ended without
        a slot. True while some are still loading."""
        assert self.cache is not None
        waiting = []
        for expert in self.warming[layer]:
            if self.cache.is_resident(layer, expert):
                members.add(expert)
                self.warm_in_joined += 1
            elif (layer, expert) not in self._loads or not self._loads[(layer, expert)].done():
                waiting.append(expert)  # loading, or not queued yet (no forward pass so far)
        for expert in set(self.warming[layer]) - set(waiting):
            self._loads.pop((layer, expert), None)
        self.warming[layer] = waiting
        return bool(waiting)

    def _record(self, layer: int, routing: RouterOutput) -> RouterOutput:
        self._profiler(layer, routing)
        if self.step_every and layer == self._last_layer:
            self._forwards += 1
            if self._forwards % self.step_every == 0:
                self.step()
        return routing

    def step(self) -> int:
        """Update the averages, complete the swaps whose expert landed, begin new ones; returns
        the number of swaps completed in this call."""
        mass = self._profiler.mass
        share = mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-30)
        self.ema.mul_(self.decay).add_(share, alpha=1.0 - self.decay)
        mass.zero_()
        if not self._warm_in_queued:
            self._queue_warm_in()
        made = 0
        for layer in range(self.ema.shape[0]):
            members = self.gate.members(layer)
            if self.warming[layer]:
                if self._warm(layer, members):
                    self.gate.set_members(layer, members)
                    continue  # no swaps in a layer still warming in
            incoming = self.incoming[layer]
            for expert in sorted(incoming):  # landed: join; not yet: ask again (a load may have found no slot)
                if self.cache is None or self.cache.is_resident(layer, expert):
                    members.add(expert)
                    incoming.discard(expert)
                    made += 1
                else:
                    self.cache.load_in_background(layer, expert, keep=members | incoming)
            row = self.ema[layer]
            for _ in range(self.max_swaps - len(incoming)):
                outside = [e for e in range(row.numel()) if e not in members and e not in incoming]
                if not outside:
                    break
                joining = max(outside, key=lambda e: (float(row[e]), -e))
                leaving = min(members, key=lambda e: (float(row[e]), -e))
                if float(row[joining]) <= (1.0 + self.margin) * float(row[leaving]):
                    break
                at_once = self.cache is None or self.cache.is_resident(layer, joining)
                if not at_once and len(members) <= self.gate.top_k:
                    break  # leaving first would shrink the committee below top_k
                members.discard(leaving)
                self.swaps_started += 1
                if self.cache is None or at_once:
                    members.add(joining)
                    made += 1
                else:
                    incoming.add(joining)
                    self.cache.load_in_background(layer, joining, keep=members | incoming)
            self.gate.set_members(layer, members)
        self.swaps += made
        return made

    def close(self) -> None:
        for layer in self.model.layers:
            layer.routing_transforms[:] = [t for t in layer.routing_transforms if t != self._record]

