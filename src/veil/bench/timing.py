"""Timing of the plaintext references, which take milliseconds and so need more than one call."""

from __future__ import annotations

import time
from collections.abc import Callable

PLAIN_REPEATS = 5


def best_of(fn: Callable[[], object], repeats: int = PLAIN_REPEATS) -> float:
    """Fastest of `repeats` timed calls of `fn` (seconds): one call of a millisecond-long plaintext step
    would measure the scheduler of a shared machine as much as the model."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
