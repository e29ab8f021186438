"""Simulators of serving set-ups that do not run a model: ``ep`` models expert parallelism.

``ep`` replays real or synthetic routing through a discrete-event model of attention and expert
workers, in ``sync`` (barrier all-to-all) or ``async`` (mu-queues, layer schedulers from
``schedulers``) mode. Its figures are simulator figures, not measurements.
"""
