"""Attribution graphs for one prompt (Ameisen et al. 2025; circuit-tracer's method and defaults).

- :mod:`sfcd.graphs.replacement`: the local replacement model as hooks on the real model (MLPs replaced by their
  transcoders plus error nodes, attention patterns and LayerNorm scales frozen);
- :mod:`sfcd.graphs.attribution`: direct effects between feature, error, token and logit nodes (the adjacency
  matrix), by batched backward passes;
- :mod:`sfcd.graphs.prune`: influence, pruning and the replacement / completeness scores;
- :mod:`sfcd.graphs.page` and :mod:`sfcd.graphs.stage`: ``graph.json``, ``graph.html`` and ``sfcd graph``.
"""
