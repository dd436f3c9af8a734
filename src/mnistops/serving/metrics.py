"""The service's metrics, exposed by `prometheus_client` (its text format and escaping).

The hot path only adds to plain counters under one lock (`Metrics.observe`, a few
hundred nanoseconds); `prometheus_client` reads them when /metrics is scraped, through
`ServiceCollector`, rather than updating its own metric objects at every request.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""the text format every Prometheus version reads (what `generate_latest` writes)"""


def labelled(name: str, documentation: str, label: str, values: dict[str, float]) -> Metric:
    """A counter family with one sample per value of its one label."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in values.items():
        family.add_metric([value], count)
    return family


class Metrics:
    def __init__(self, timed: frozenset[str] = frozenset({"/predict"})) -> None:
        self.timed = timed
        """the paths whose latency the histogram takes: every way to ask for a prediction"""
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.predictions: Counter[int] = Counter()
        self.buckets = [0] * len(LATENCY_BUCKETS)
        self.latency_count = 0
        self.latency_sum = 0.0
        self.connections_timed_out = 0
        """connections cut because a request did not arrive whole in time (`connections`)"""
        self.connections_refused = 0
        """connections closed at once because the service had its most open"""

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] += 1
            if path in self.timed:
                self.latency_count += 1
                self.latency_sum += seconds
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.buckets[i] += 1

    def predicted(self, digits: list[int]) -> None:
        with self.lock:
            self.predictions.update(digits)

    def families(self, model_name: str, version: str | None, swaps: int) -> list[Metric]:
        """The service's own metric families, read under the lock."""
        with self.lock:
            requests = CounterMetricFamily(
                "mnistops_requests", "HTTP requests by path and status.", labels=["path", "status"]
            )
            for (path, status), n in sorted(self.requests.items()):
                requests.add_metric([path, str(status)], n)
            errors = sum(n for (_p, status), n in self.requests.items() if status >= 400)
            latency = HistogramMetricFamily(
                "mnistops_predict_seconds",
                "Latency of prediction requests: /predict, /invocations and V2's infer.",
            )
            latency.add_metric(
                [],
                [(str(b), n) for b, n in zip(LATENCY_BUCKETS, self.buckets, strict=True)]
                + [("+Inf", self.latency_count)],
                self.latency_sum,
            )
            predictions = labelled(
                "mnistops_predictions",
                "Predicted digits.",
                "digit",
                {str(digit): self.predictions[digit] for digit in range(10)},
            )
            cut = labelled(
                "mnistops_connections_cut",
                "Connections closed by the service: a request too slow to arrive, or one"
                " connection too many.",
                "why",
                {"slow": self.connections_timed_out, "full": self.connections_refused},
            )
        info = GaugeMetricFamily(
            "mnistops_model_info",
            "The model version that answers (1 while loaded).",
            labels=["name", "version"],
        )
        if version is not None:
            info.add_metric([model_name, version], 1)
        return [
            requests,
            CounterMetricFamily(
                "mnistops_request_errors", "HTTP requests answered with 4xx or 5xx.", errors
            ),
            latency,
            predictions,
            info,
            CounterMetricFamily(
                "mnistops_model_swaps", "Champion versions swapped in since start.", swaps
            ),
            cut,
        ]


class ServiceCollector(Collector):
    """Every family of /metrics, read when it is scraped: the service's and those of
    the other parts (the prediction log, /feedback), each from one of `sources`."""

    def __init__(self, *sources: Callable[[], Iterable[Metric]]) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source()


def exposition(*sources: Callable[[], Iterable[Metric]]) -> Callable[[], bytes]:
    """A function that renders the families of `sources` in Prometheus's text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(*sources))
    return lambda: generate_latest(registry)
