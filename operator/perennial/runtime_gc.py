"""Garbage-collector settings of the long-running processes: the operator and the embedded control plane.

Both hold thousands of long-lived containers (the informer cache, the control plane's store: parsed JSON objects)
and allocate many short-lived ones per request (headers, parsed bodies, futures), few of which form cycles. With
CPython's defaults (a young collection every 700 net container allocations) collections ran ~250 times per 1,000
converged objects in each process and took 0.1-0.2 s of the operator's ~0.9 s of CPU for them
(benchmarks/operator_scale.py, gc callbacks). Here, once started: what the imports and setup made is moved out of
the collector's sight (`gc.freeze`, as Instagram's and Django's servers do: it is never garbage) and the young
generation is collected every `YOUNG_THRESHOLD` net allocations (the older generations keep their default ratios),
so cycles are still reclaimed, ~14x less often.
"""

from __future__ import annotations

import gc

#: Net container allocations between two young-generation collections (CPython's default: 700).
YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """Freeze what exists now (imports, setup) and collect the young generation every `YOUNG_THRESHOLD`
    allocations. Call once a process has started, not from a library (it is process-wide)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
