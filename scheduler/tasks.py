"""Celery tasks: thin wrappers over `scheduler.dispatch`. Idempotent (a dispatch round
only assigns requests still queued, a sweep only acts on what is overdue), acks_late,
retried with backoff only on named transient errors."""

from __future__ import annotations

import logging
import time

from celery.signals import task_failure, task_retry

from scheduler import metrics
from scheduler.celery_app import celery_app
from scheduler.dispatch import get_store, run_dispatch
from scheduler.errors import TransientStoreError

log = logging.getLogger(__name__)


@task_failure.connect(weak=False)
def _count_failure(sender=None, **_kw) -> None:
    metrics.TASK_FAILURES.labels(task=metrics.task_label(getattr(sender, "name", None))).inc()


@task_retry.connect(weak=False)
def _count_retry(sender=None, **_kw) -> None:
    metrics.TASK_RETRIES.labels(task=metrics.task_label(getattr(sender, "name", None))).inc()


@celery_app.task(
    name="agora.dispatch",
    acks_late=True,
    autoretry_for=(TransientStoreError,),
    retry_backoff=0.05,
    retry_backoff_max=2,
    max_retries=8,
)
def dispatch(window_ms: float = 2.0, policy: str | None = None) -> dict:
    """Drain the queue: wait a micro-batch window, then route everything queued at once."""
    store = get_store()
    if window_ms > 0:
        time.sleep(window_ms / 1000)
    clear = getattr(store, "clear_dispatch_flag", None)
    if clear is not None:
        clear()
    t0 = time.perf_counter()
    report = run_dispatch(store, policy)
    a = report.applied
    metrics.observe_dispatch(time.perf_counter() - t0, report.pending, a.assigned, a.rejected, a.deferred, a.skipped)
    if report.pending:
        log.debug("dispatch: %s", report)
    return {"pending": report.pending, "assigned": report.applied.assigned, "route_ms": report.route_ms}


@celery_app.task(name="agora.sweep", acks_late=True, autoretry_for=(TransientStoreError,), max_retries=3)
def sweep() -> dict:
    return get_store().sweep()


@celery_app.task(
    name="agora.settle",
    acks_late=True,
    autoretry_for=(TransientStoreError,),
    retry_backoff=0.05,
    retry_backoff_max=5,
    max_retries=10,
)
def settle(request_id: str) -> dict:
    """Pay one accepted receipt. Redelivery is harmless: a settled request returns the
    first result and moves no money."""
    t0 = time.perf_counter()
    result = get_store().settle(request_id)
    metrics.observe_settle(time.perf_counter() - t0, result.get("batch", 1))
    return result
