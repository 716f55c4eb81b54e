"""Prometheus metrics of the operator."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

RECONCILES = Counter("perennial_reconcile_total", "Reconciles by kind and result.", ["kind", "result"])
RECONCILE_SECONDS = Histogram(
    "perennial_reconcile_duration_seconds", "Reconcile duration by kind.", ["kind"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
)
TRAINING_RUNS = Counter("perennial_trainingruns_finished_total", "Finished TrainingRuns by outcome.", ["outcome"])
TRAINING_SECONDS = Histogram(
    "perennial_trainingrun_duration_seconds", "Wall time of finished TrainingRuns, start to completion.", buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
)
API_ERRORS = Counter("perennial_api_errors_total", "API errors that made a reconcile retry, by HTTP status (0: no answer).", ["code"])
STATUS_WRITES = Counter("perennial_status_writes_total", "Status writes by kind (none when nothing changed).", ["kind"])
QUEUE_DEPTH = Gauge("perennial_workqueue_depth", "Objects waiting for a reconcile.")
QUEUE_SECONDS = Histogram(
    "perennial_trainingrun_queue_seconds", "Time from TrainingRun creation to trainer start.", buckets=(1, 5, 15, 60, 300, 900, 3600, 14400)
)
# Continuous learning (controllers/learning.py).
FEEDBACK_NEW_RECORDS = Gauge("perennial_feedback_new_records", "Rated feedback records in no snapshot yet, per Deployment with continuous learning.",
                             ["namespace", "deployment"])
LEARNING_RUNS = Counter("perennial_learning_trainingruns_created_total", "TrainingRuns created from feedback snapshots, by trigger.", ["trigger"])
PROMOTIONS = Counter("perennial_adapter_promotion_decisions_total", "Promotion decisions written on learned Adapters, by reason.", ["reason"])
FEEDBACK_FULL_RESCANS = Counter("perennial_feedback_full_rescans_total", "Full rescans of a feedback store (every day directory listed).")
FEEDBACK_LATE_SEGMENTS = Counter("perennial_feedback_late_segments_total",
                                 "Feedback segments found by a full rescan where no tick looks (shipped later than the late-arrival window).")


class ConditionCollector:
    """`perennial_resources{kind, condition, status}`: how many objects are in each condition state."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: dict[tuple[str, str, str], dict[str, str]] = {}

    def observe(self, kind: str, namespace: str, name: str, conditions: Iterable[dict]) -> None:
        with self._lock:
            self._state[(kind, namespace, name)] = {c["type"]: c["status"] for c in conditions}

    def forget(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._state.pop((kind, namespace, name), None)

    def collect(self):
        family = GaugeMetricFamily("perennial_resources", "Custom resources by kind and condition status.", labels=["kind", "condition", "status"])
        counts: dict[tuple[str, str, str], int] = {}
        with self._lock:
            for (kind, _ns, _name), conds in self._state.items():
                for ctype, status in conds.items():
                    counts[(kind, ctype, status)] = counts.get((kind, ctype, status), 0) + 1
        for labels, value in sorted(counts.items()):
            family.add_metric(list(labels), value)
        yield family


CONDITIONS = ConditionCollector()
REGISTRY.register(CONDITIONS)


def start_server(port: int, registry: CollectorRegistry = REGISTRY, *, addr: str = "0.0.0.0") -> None:
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=registry)
