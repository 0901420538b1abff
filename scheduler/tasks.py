"""Celery tasks: thin wrappers over `scheduler.dispatch`. Idempotent (a dispatch round
only assigns requests still queued, a sweep only acts on what is overdue), acks_late,
retried with backoff only on named transient errors."""

from __future__ import annotations

import logging
import time

from scheduler.celery_app import celery_app
from scheduler.dispatch import get_store, run_dispatch
from scheduler.errors import TransientStoreError

log = logging.getLogger(__name__)


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
    report = run_dispatch(store, policy)
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
    return get_store().settle(request_id)
