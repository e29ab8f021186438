"""Expert parallelism over real processes: torch.distributed (gloo on CPU), sync and async modes.

One attention worker (rank 0: embeddings, attention, router, KV cache, the model's non-expert
part) and ``N - 1`` expert workers (ranks 1..N-1, each holding the experts a placement gives
it). The model stays the checkpoint's own forward; expert parallelism is a transform that
replaces each MoE layer's experts with :class:`~moeserve.ep.remote.RemoteExperts`.

- ``sync`` (:mod:`moeserve.ep.sync`): per layer a barrier exchange (``all_to_all_single`` with
  split sizes) dispatches rows and combines outputs; every rank waits for the slowest.
- ``async`` (:mod:`moeserve.ep.async_`, DESIGN 1C): several micro-batches in flight at the
  attention worker; typed messages (:mod:`moeserve.ep.messages`, one wire format in
  :mod:`moeserve.ep.serialize`) go into per-layer mu-queues at expert workers, which re-batch
  and pick the layer to run with a scheduler from ``moeserve.sim.schedulers.LAYER_SCHEDULERS``.

``launch.run_expert_parallel`` starts the processes and stops them all when one fails;
``local.run_local`` is the one-process reference the tests compare against;
``metrics.metrics_snapshot`` merges what the workers measured into per-layer figures
(balancedness, barrier wait, mu-queue depth and age) for a server to export.

Modules: config (EPConfig), workload (what rank 0 runs), remote (the transform), dispatch (rows by
worker, combine), experts (a rank's shard), messages + serialize (the wire), sync, async_,
requests (driving sessions), metrics, faults (test hook), worker (one rank), launch (processes).
"""
