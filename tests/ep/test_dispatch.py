"""Expert parallelism without processes: dispatch by worker, experts per shard, combine.

EP=1 equals EP=N at the layer: splitting a layer's experts over workers, running each worker's
rows on its shard (in any order, as async re-batching does) and combining gives the MoE layer's
own output.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeserve.config import MoEConfig
from moeserve.ep.dispatch import combine_outputs, plan_dispatch
from moeserve.ep.experts import ExpertShard, ShardLayer, synthetic_expert
from moeserve.ep.worker import place_experts
from moeserve.moe.layer import MoELayer
from moeserve.moe.types import ResidentExperts, RouterOutput

E, K, D, INTERMEDIATE, T = 8, 2, 16, 24, 11


def _layer_and_routing(seed: int = 0):
    pairs = [synthetic_expert(seed, 0, expert, D, INTERMEDIATE) for expert in range(E)]
    resident = ResidentExperts(
        gate_up_proj=torch.stack([p[0] for p in pairs]), down_proj=torch.stack([p[1] for p in pairs])
    )
    layer = MoELayer(resident, torch.nn.functional.silu, MoEConfig(backend="loop"))
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, D, generator=generator)
    logits = torch.randn(T, E, generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), K)
    return layer, pairs, hidden, RouterOutput(topk_ids=ids, topk_weights=weights)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dispatch_to_workers_then_combine_equals_the_moe_layer(workers: int) -> None:
    layer, pairs, hidden, routing = _layer_and_routing()
    expected = layer(hidden, routing)
    loads = np.bincount(routing.topk_ids.reshape(-1).numpy(), minlength=E)[None, :]  # [1, E]
    expert2worker = torch.from_numpy(place_experts(loads, workers))  # [1, E]
    plan = plan_dispatch(0, hidden, routing, expert2worker[0], workers)
    assert sum(plan.worker_counts) == T * K
    outputs = torch.empty_like(plan.groups.rows)
    offsets = plan.worker_offsets
    for worker in range(workers):
        held = {e: pairs[e] for e in range(E) if int(expert2worker[0, e]) == worker}
        shard = ExpertShard([ShardLayer(E, held)], torch.nn.functional.silu)
        block = slice(offsets[worker], offsets[worker + 1])
        ids = plan.row_expert[block]
        assert all(int(expert2worker[0, e]) == worker for e in ids.tolist())
        # Reversed arrival order: the shard must regroup and restore the order itself.
        reverse = torch.arange(ids.numel() - 1, -1, -1)
        outputs[block] = shard.run(0, plan.groups.rows[block][reverse], ids[reverse])[reverse]
    combined = combine_outputs(plan, outputs, T)
    torch.testing.assert_close(combined, expected, rtol=0, atol=1e-6)


def test_grouped_rows_match_the_one_process_expert_groups() -> None:
    _, _, hidden, routing = _layer_and_routing(seed=1)
    expert2worker = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0])
    plan = plan_dispatch(0, hidden, routing, expert2worker, 2)
    # Within a worker's block, experts ascend and each expert's rows keep token order.
    for worker in range(2):
        block = slice(plan.worker_offsets[worker], plan.worker_offsets[worker + 1])
        ids = plan.row_expert[block]
        assert torch.equal(ids, torch.sort(ids, stable=True).values)
        tokens = plan.groups.row2token[block]
        for expert in ids.unique().tolist():
            mine = tokens[ids == expert]
            assert torch.equal(mine, torch.sort(mine).values)


def test_shard_refuses_an_empty_layer() -> None:
    with pytest.raises(ValueError, match="at least one expert"):
        ExpertShard([ShardLayer(E, {})], torch.nn.functional.silu)


@pytest.mark.parametrize("rows", [1, 3, 4, 40, 300])
@pytest.mark.parametrize("backend", ["auto", "loop", "hybrid"])
def test_stacked_shard_matches_the_per_expert_reference(rows: int, backend: str) -> None:
    # Three layers holding different experts; every call mixes experts in arrival order.
    held_ids = [[0, 3, 5], [1, 2, 6, 7], [4]]
    layers = [
        ShardLayer(E, {e: synthetic_expert(3, layer, e, D, INTERMEDIATE) for e in ids})
        for layer, ids in enumerate(held_ids)
    ]
    stacked = ExpertShard(layers, torch.nn.functional.silu, backend=backend)
    reference = ExpertShard(layers, torch.nn.functional.silu, backend="loop", per_expert=True)
    generator = torch.Generator().manual_seed(rows)
    for layer, ids in enumerate(held_ids):
        x = torch.randn(rows, D, generator=generator)
        expert_ids = torch.tensor(ids)[torch.randint(len(ids), (rows,), generator=generator)]
        torch.testing.assert_close(stacked.run(layer, x, expert_ids), reference.run(layer, x, expert_ids), rtol=1e-5, atol=1e-6)
        # The shard's entries are views into its stacks: the same values as the experts given.
        for expert in ids:
            assert torch.equal(stacked.layers[layer].held[expert][0], layers[layer].held[expert][0])


def test_stacked_shard_refuses_rows_for_an_expert_it_does_not_hold() -> None:
    shard = ExpertShard([ShardLayer(E, {e: synthetic_expert(0, 0, e, D, INTERMEDIATE) for e in (0, 2)})], torch.nn.functional.silu)
    with pytest.raises(KeyError, match=r"experts \[5\]"):
        shard.run(0, torch.randn(3, D), torch.tensor([0, 5, 2]))
    counts = torch.zeros(E, dtype=torch.int64)
    counts[0], counts[2] = 2, 1
    with pytest.raises(ValueError, match="add up to 3, got 2 rows"):
        shard.run_grouped(0, torch.randn(2, D), counts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [2, 40, 300])
def test_stacked_shard_on_cuda_matches_the_cpu_per_expert_reference(rows: int, dtype: torch.dtype) -> None:
    """On a GPU the stacked shard runs ``grouped_mm`` where the build takes the dtype (``loop``
    otherwise), with counts on the device (no host check); compared with the CPU loop in fp64."""
    ids = [1, 2, 6, 7]
    cpu = {e: synthetic_expert(5, 0, e, D, INTERMEDIATE) for e in ids}
    on_gpu = {e: (gate_up.to("cuda", dtype), down.to("cuda", dtype)) for e, (gate_up, down) in cpu.items()}
    shard = ExpertShard([ShardLayer(E, on_gpu)], torch.nn.functional.silu)
    reference = ExpertShard(
        [ShardLayer(E, {e: (g.double(), d.double()) for e, (g, d) in cpu.items()})],
        torch.nn.functional.silu, backend="loop", per_expert=True,
    )
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, D, generator=generator).to(dtype)
    expert_ids = torch.tensor(ids)[torch.randint(len(ids), (rows,), generator=generator)]
    actual = shard.run(0, x.to("cuda"), expert_ids.to("cuda")).cpu().double()
    expected = reference.run(0, x.double(), expert_ids)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)
