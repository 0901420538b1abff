"""The Celery app. Broker chosen by settings: in-process `memory://` (embedded default,
worker thread in the coordinator process) or Redis / RabbitMQ (production)."""

from __future__ import annotations

from celery import Celery

celery_app = Celery("agora", include=["scheduler.tasks"])

SWEEP_INTERVAL_S = 2.0


def configure(broker_url: str, *, queue: str = "agora", sweep_interval_s: float = SWEEP_INTERVAL_S) -> Celery:
    transport_options = {}
    if broker_url.startswith("memory://"):
        # kombu's in-memory transport polls; this one is woken by each message (inproc_broker.py)
        from kombu.transport import TRANSPORT_ALIASES

        TRANSPORT_ALIASES["memory"] = "scheduler.inproc_broker:Transport"
    celery_app.conf.update(
        broker_url=broker_url,
        broker_transport_options=transport_options,
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,  # a task lost with its worker is redelivered
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_redirect_stdouts=False,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker outage is waited out, never a reason to exit
        task_default_queue=queue,
        beat_schedule={
            "agora-sweep": {"task": "agora.sweep", "schedule": sweep_interval_s, "options": {"queue": queue}},
        },
    )
    return celery_app
