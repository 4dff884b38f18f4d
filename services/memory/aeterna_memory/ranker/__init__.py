"""The shipped second-stage ranker file (``lambdamart.json``), written by
``make train-ranker`` and loaded by :class:`aeterna_memory.domain.ranking.LambdaMartRanker`."""
