"""Prometheus metrics: counters kept by the processes that see the events, and queue gauges
read from the database at scrape time.

With PROMETHEUS_MULTIPROC_DIR set (scripts/run sets it), the web server's processes and the push
workers write their counters to files there and /metrics adds them up; without it, each process
reports its own counters.
"""

import os
from collections.abc import Iterator

from django.utils import timezone
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from uploads import selectors

UPLOADS_ACCEPTED = Counter("uploadsvc_uploads_accepted", "Uploads accepted and queued")
UPLOADS_REFUSED = Counter(
    "uploadsvc_uploads_refused", "Uploads refused, by HTTP status", ["status"]
)
UPLOAD_BYTES = Counter("uploadsvc_upload_bytes", "Bytes of accepted uploads")
PUSH_ATTEMPTS = Counter(
    "uploadsvc_push_attempts",
    "Push attempts by outcome: succeeded, pending (will retry), failed, released (by a worker"
    " that stopped, to be pushed again), claim-lost (not recorded: the"
    " task was taken over, cancelled or deleted meanwhile)",
    ["outcome"],
)
PUSH_DURATION = Histogram(
    "uploadsvc_push_duration_seconds",
    "Time to push one file into its instance",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
)


class QueueCollector(Collector):
    """Queue state straight from the database, so every scrape sees the truth."""

    def collect(self) -> Iterator[Metric]:
        summary = selectors.queue_summary()
        tasks = GaugeMetricFamily("uploadsvc_tasks", "Upload tasks by status", labels=["status"])
        for status, count in summary["counts"].items():
            tasks.add_metric([status], count)
        yield tasks
        oldest = summary["oldest_pending_at"]
        age = (timezone.now() - oldest).total_seconds() if oldest else 0.0
        yield GaugeMetricFamily(
            "uploadsvc_oldest_pending_age_seconds", "Age of the oldest pending task", value=age
        )
        yield GaugeMetricFamily(
            "uploadsvc_tasks_waiting_retry",
            "Pending tasks that already failed at least once",
            value=summary["waiting_for_retry"],
        )
        seen = GaugeMetricFamily(
            "uploadsvc_worker_last_seen_age_seconds",
            "Seconds since each push worker's last heartbeat",
            labels=["worker"],
        )
        now = timezone.now()
        for beat in selectors.worker_heartbeats():
            seen.add_metric([beat.worker_id], (now - beat.last_seen_at).total_seconds())
        yield seen


QUEUE_COLLECTOR = QueueCollector()


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(QUEUE_COLLECTOR)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY) + generate_latest(_QUEUE_ONLY), CONTENT_TYPE_LATEST


_QUEUE_ONLY = CollectorRegistry()
_QUEUE_ONLY.register(QUEUE_COLLECTOR)
