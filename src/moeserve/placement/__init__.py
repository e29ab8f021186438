"""Expert -> rank placement and replication for expert parallelism, and how balanced it is.

``balance`` holds the policies (pure numpy functions on per-layer arrays, one entry point
:func:`~moeserve.placement.balance.plan_placement`); ``report`` turns a plan into JSON and a table.
"""
