"""Expert-worker side: the experts one rank holds, run on rows grouped by expert.

Shape legend: n rows, D hidden, I expert intermediate, E experts per layer, L MoE layers.

An :class:`ExpertShard` holds, per MoE layer, only the experts the placement gives its rank
(read one by one from the checkpoint with :class:`~moeserve.memory.store.ExpertStore`, or drawn
from a seed for the synthetic trace workload) and runs them with a registered experts backend
(chosen once, here). It knows nothing of processes or modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.moe.backends import BACKENDS, Activation, Backend, resolve_backend
from moeserve.moe.types import ExpertGroups, ResidentExperts


@dataclass(frozen=True)
class ShardLayer:
    """One layer's held experts; an :class:`~moeserve.moe.types.ExpertProvider` over E ids."""

    num_experts: int
    held: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """expert id -> (gate_up [2I, D], down [D, I])."""

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.held.values()))[0].dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.held.values()))[0].device

    def gate_up(self, expert: int) -> torch.Tensor:
        return self.held[expert][0]

    def down(self, expert: int) -> torch.Tensor:
        return self.held[expert][1]

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None


@dataclass(frozen=True)
class _HeldStack:
    """One layer's held experts stacked in ascending id order, run as one resident layer."""

    ids: torch.Tensor  # [h] int64 held expert ids, ascending
    experts: ResidentExperts  # gate_up [h, 2I, D], down [h, D, I]
    run: Backend  # this layer's own backend instance (it may keep per-layer scratch)


class ExpertShard:
    """The experts of one expert worker, every layer. ``run(layer, rows, expert_ids) -> outputs``.

    Each layer's held experts are stacked into one tensor pair (the :class:`ShardLayer` entries
    become views into it), so a call runs them as a resident layer of ``h`` experts: with the
    ``auto`` backend one grouped matmul per projection (``hybrid`` on CPU, ``grouped_mm`` on a GPU)
    instead of a Python loop of about ten operations per active expert. ``per_expert=True`` keeps
    the loop over the held experts one by one (the reference the tests compare with).
    """

    def __init__(
        self, layers: list[ShardLayer], act: Activation, backend: str = "auto", per_expert: bool = False
    ) -> None:
        if not layers or any(not layer.held for layer in layers):
            raise ValueError("an expert shard needs at least one expert in every layer")
        self.act = act
        first = layers[0]
        self.backend_name = resolve_backend(backend, first.device, first.dtype, stacked=not per_expert)
        self._stacks: list[_HeldStack] = []
        self._run_per_expert = BACKENDS.get(self.backend_name)() if per_expert else None
        if per_expert:
            self.layers = layers
            return
        self.layers = []
        for layer in layers:
            ids = sorted(layer.held)
            experts = ResidentExperts(
                torch.stack([layer.held[expert][0] for expert in ids]),  # [h, 2I, D]
                torch.stack([layer.held[expert][1] for expert in ids]),  # [h, D, I]
            )
            self.layers.append(
                ShardLayer(layer.num_experts, {expert: (experts.gate_up(i), experts.down(i)) for i, expert in enumerate(ids)})
            )
            self._stacks.append(_HeldStack(torch.tensor(ids), experts, BACKENDS.get(self.backend_name)()))

    def held_counts(self) -> list[int]:
        """[L] experts held per layer."""
        return [len(layer.held) for layer in self.layers]

    def run_grouped(self, layer: int, rows: torch.Tensor, expert_counts: torch.Tensor) -> torch.Tensor:
        """Outputs [n, D] for rows [n, D] already grouped by expert (ascending), ``expert_counts`` [E]."""
        if self._run_per_expert is not None:
            return self._run_per_expert(_groups(rows, expert_counts), self.layers[layer], self.act)
        stack = self._stacks[layer]
        held_counts = expert_counts.index_select(0, stack.ids.to(expert_counts.device))  # [h]
        # Checked where the counts are host values (the runtime's messages carry them on the CPU);
        # on an accelerator the check would cost a sync per call.
        if held_counts.device.type == "cpu" and int(held_counts.sum()) != rows.shape[0]:
            missing = sorted(set(torch.nonzero(expert_counts).flatten().tolist()) - set(stack.ids.tolist()))
            if missing:
                raise KeyError(f"layer {layer}: rows for experts {missing} this worker does not hold")
            raise ValueError(f"layer {layer}: expert counts add up to {int(held_counts.sum())}, got {rows.shape[0]} rows")
        return stack.run(_groups(rows, held_counts.to(rows.device)), stack.experts, self.act)

    def run(self, layer: int, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Outputs [n, D] for rows [n, D] in any order, ``expert_ids`` [n]: groups, runs, restores order."""
        order = torch.argsort(expert_ids, stable=True)  # [n] keeps arrival order within an expert
        counts = torch.bincount(expert_ids, minlength=self.layers[layer].num_experts)  # [E]
        grouped = self.run_grouped(layer, rows.index_select(0, order), counts)  # [n, D]
        outputs = torch.empty_like(grouped)
        outputs[order] = grouped
        return outputs


def _groups(rows: torch.Tensor, expert_counts: torch.Tensor) -> ExpertGroups:
    """Rows already grouped by expert, for the experts stage alone (no routing, no combine)."""
    return ExpertGroups(
        rows=rows,
        row2token=torch.zeros(0, dtype=torch.int64),
        row_weights=torch.zeros(0),
        expert_counts=expert_counts,
        capacity=None,
        dropped=torch.zeros((), dtype=torch.int64),
        assignments=rows.shape[0],
    )


def shard_from_checkpoint(folder: str, expert2worker: torch.Tensor, worker: int) -> ExpertShard:
    """Read worker ``worker``'s experts (``expert2worker`` [L, E] == worker) from the checkpoint only.

    MoE layer i is the i-th decoder layer, ascending, that has routed experts.
    """
    import json
    from pathlib import Path

    from transformers.activations import ACT2FN

    from moeserve.memory.store import ExpertStore

    store = ExpertStore(folder)
    config = json.loads((Path(folder) / "config.json").read_text())
    layers = []
    for moe_layer, decoder_layer in enumerate(store.layers):
        held = {}
        for expert in torch.nonzero(expert2worker[moe_layer] == worker).flatten().tolist():
            tensors = store.read_expert(decoder_layer, expert, dtype=torch.float32)
            held[expert] = (tensors.gate_up, tensors.down)
        layers.append(ShardLayer(num_experts=store.num_experts(decoder_layer), held=held))
    return ExpertShard(layers, ACT2FN[config.get("hidden_act", "silu")])


def synthetic_expert(
    seed: int, layer: int, expert: int, hidden: int, intermediate: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up [2I, D], down [D, I]) of one random expert, the same in every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer * 4099 + expert)
    scale_in, scale_out = hidden**-0.5, intermediate**-0.5
    gate_up = torch.randn(2 * intermediate, hidden, generator=generator) * scale_in
    down = torch.randn(hidden, intermediate, generator=generator) * scale_out
    return gate_up, down


def synthetic_shard(
    expert2worker: torch.Tensor, worker: int, seed: int, hidden: int, intermediate: int
) -> ExpertShard:
    """Random-weight experts (:func:`synthetic_expert`) that ``expert2worker`` [L, E] gives ``worker``."""
    layers = []
    for layer, row in enumerate(expert2worker):
        held = {
            expert: synthetic_expert(seed, layer, expert, hidden, intermediate)
            for expert in torch.nonzero(row == worker).flatten().tolist()
        }
        layers.append(ShardLayer(num_experts=row.numel(), held=held))
    return ExpertShard(layers, torch.nn.functional.silu)
