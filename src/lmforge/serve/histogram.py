"""A Prometheus-style histogram: fixed upper bounds, cumulative counts, a sum and a count. The engine
observes on its own thread; /metrics reads a snapshot."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Histogram:
    """Counts of observations at or below each bound (Prometheus' `le`), plus their sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict[str, Any]:
        """{"buckets": [(upper bound, cumulative count), ..., (inf, count)], "sum": ..., "count": ...}."""
        counts, cumulative, total = list(self.counts), [], 0
        for bound, c in zip((*self.buckets, float("inf")), counts):
            total += c
            cumulative.append((bound, total))
        return {"buckets": cumulative, "sum": self.sum, "count": total}
