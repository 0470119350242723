"""Estimator search for issue 12: which KDEformer sampling scheme is most accurate at honest cost.

    python -m benchmarks.estimators.search            # every variant, b in {32, 64, 128, 256}, all texts
    python -m benchmarks.estimators.search --quick    # one text, one seed

Modules: `data` (Q/K/V of the 72 MiniLM heads per text, GloVe), `cost` (multiply-adds of every method,
counted from the real shapes), `dense` (turns a column plan into the output, for N <= a few thousand),
`baselines` (today's estimators and the peers), `best` (the winning scheme, batched, ready to port),
`variants` (the other schemes measured), `search` (the harness).
"""
