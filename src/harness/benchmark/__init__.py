"""Speed benchmark of the XAI methods: ``python -m harness.benchmark`` (README, "Benchmark").

:func:`harness.benchmark.core.run` times each method against the raw model passes its
algorithm needs and against a reference implementation (:mod:`harness.benchmark.refs`).
"""
