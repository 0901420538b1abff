"""Entry point of a production scheduler worker: `celery -A coordinator.worker worker`
(or `agora worker`). Binds the scheduler's tasks to the coordinator's database, and serves
the worker's Prometheus metrics on `AGORA_WORKER_METRICS_PORT` (default 9101, 0: off).

`agora worker` runs Celery's `threads` pool: the tasks run in this one process, so one
registry holds everything they record. (Under `agora worker` the supervising parent serves
nothing; its Celery child does, and a restarted child binds the port again.)"""

from __future__ import annotations

from celery.signals import worker_init

from coordinator.runtime import Runtime
from coordinator.settings import get_settings

runtime = Runtime(get_settings())
app = runtime.celery


@worker_init.connect(weak=False)
def _serve_metrics(sender=None, **_kw) -> None:
    """Celery's worker is starting in this process: serve its metrics. The embedded in-process
    worker (`agora up`) never gets here: it shares the API's `GET /metrics`."""
    if runtime.settings.in_process_worker:
        return
    from coordinator.metrics import serve_worker_metrics

    serve_worker_metrics(runtime)
