"""The service's metrics in Prometheus's text format (exposition format 0.0.4)."""

from __future__ import annotations

import threading
from collections import Counter

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
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
            if path == "/predict":
                self.latency_count += 1
                self.latency_sum += seconds
                for i, bound in enumerate(LATENCY_BUCKETS):
                    if seconds <= bound:
                        self.buckets[i] += 1

    def predicted(self, digits: list[int]) -> None:
        with self.lock:
            self.predictions.update(digits)

    def render(self, model_name: str, version: str | None, swaps: int) -> str:
        with self.lock:
            lines = [
                "# HELP mnistops_requests_total HTTP requests by path and status.",
                "# TYPE mnistops_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'mnistops_requests_total{{path="{path}",status="{status}"}} {n}')
            errors = sum(n for (_p, status), n in self.requests.items() if status >= 400)
            lines += [
                "# HELP mnistops_request_errors_total HTTP requests answered with 4xx or 5xx.",
                "# TYPE mnistops_request_errors_total counter",
                f"mnistops_request_errors_total {errors}",
                "# HELP mnistops_predict_seconds Latency of /predict requests.",
                "# TYPE mnistops_predict_seconds histogram",
            ]
            for bound, n in zip(LATENCY_BUCKETS, self.buckets, strict=True):
                lines.append(f'mnistops_predict_seconds_bucket{{le="{bound}"}} {n}')
            lines += [
                f'mnistops_predict_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"mnistops_predict_seconds_sum {self.latency_sum:.6f}",
                f"mnistops_predict_seconds_count {self.latency_count}",
                "# HELP mnistops_predictions_total Predicted digits.",
                "# TYPE mnistops_predictions_total counter",
            ]
            for digit in range(10):
                lines.append(
                    f'mnistops_predictions_total{{digit="{digit}"}} {self.predictions[digit]}'
                )
            lines += [
                "# HELP mnistops_model_info The model version that answers (1 while loaded).",
                "# TYPE mnistops_model_info gauge",
            ]
            if version is not None:
                lines.append(f'mnistops_model_info{{name="{model_name}",version="{version}"}} 1')
            lines += [
                "# HELP mnistops_model_swaps_total Champion versions swapped in since start.",
                "# TYPE mnistops_model_swaps_total counter",
                f"mnistops_model_swaps_total {swaps}",
                "# HELP mnistops_connections_cut_total Connections closed by the service:"
                " a request too slow to arrive, or one connection too many.",
                "# TYPE mnistops_connections_cut_total counter",
                f'mnistops_connections_cut_total{{why="slow"}} {self.connections_timed_out}',
                f'mnistops_connections_cut_total{{why="full"}} {self.connections_refused}',
            ]
        return "\n".join(lines) + "\n"
