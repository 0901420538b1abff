"""Process-local Prometheus instruments of the scheduler (dispatch rounds, settle batches,
task failures), on the registry every Agora process exposes.

Only `prometheus_client` is imported here: the scheduler must not import the coordinator.
The coordinator adds its own instruments to `REGISTRY` (`coordinator/metrics.py`) and the
series it reads from the database at scrape time, so an API process (`GET /metrics`) and a
worker (its metrics port) each expose everything they record. An embedded `agora up` runs its
Celery worker in the API process, on this same registry.

Label values are bounded: task names of our own tasks only, never a request, account or
node id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

DISPATCH_BATCH = Histogram("agora_dispatch_batch_size", "Queued requests one dispatch round routed",
                           buckets=_SIZES, registry=REGISTRY)
DISPATCH_SECONDS = Histogram("agora_dispatch_seconds", "Time of one dispatch round (load the queue and the "
                             "offers, route, store), its micro-batch window excluded", buckets=_FAST, registry=REGISTRY)
DISPATCH_RESULTS = Counter("agora_dispatch_requests_total", "What dispatch rounds did with the requests they "
                           "routed", ["result"], registry=REGISTRY)
SETTLE_BATCH = Histogram("agora_settle_batch_size", "Accepted receipts one settle task paid (one ledger batch)",
                         buckets=_SIZES, registry=REGISTRY)
SETTLE_SECONDS = Histogram("agora_settle_seconds", "Time of one settle task's ledger batch", buckets=_FAST,
                           registry=REGISTRY)
TASK_FAILURES = Counter("agora_task_failures_total", "Celery tasks that failed for good (an unexpected error, "
                        "or retries exhausted)", ["task"], registry=REGISTRY)
TASK_RETRIES = Counter("agora_task_retries_total", "Celery task retries after a transient error", ["task"],
                       registry=REGISTRY)

TASKS = ("agora.dispatch", "agora.settle", "agora.sweep")


def task_label(name: str | None) -> str:
    """A task's name as a label value: ours by name, anything else as `other`."""
    return name if name in TASKS else "other"


def observe_dispatch(seconds: float, pending: int, assigned: int, rejected: int, deferred: int,
                     skipped: int) -> None:
    if not pending:
        return  # an empty round (the queue was drained by another) is not a batch
    DISPATCH_BATCH.observe(pending)
    DISPATCH_SECONDS.observe(seconds)
    for result, n in (("assigned", assigned), ("rejected", rejected), ("deferred", deferred), ("skipped", skipped)):
        if n:
            DISPATCH_RESULTS.labels(result=result).inc(n)


def observe_settle(seconds: float, batch: int) -> None:
    SETTLE_BATCH.observe(batch)
    SETTLE_SECONDS.observe(seconds)


for _t in TASKS:  # present from the start (0), so that rate() and alerts see them before the first failure
    TASK_FAILURES.labels(task=_t)
    TASK_RETRIES.labels(task=_t)
for _r in ("assigned", "rejected", "deferred", "skipped"):
    DISPATCH_RESULTS.labels(result=_r)
