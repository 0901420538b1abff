"""Entry point of a production scheduler worker: `celery -A coordinator.worker worker`
(or `agora worker`). Binds the scheduler's tasks to the coordinator's database."""

from __future__ import annotations

from coordinator.runtime import Runtime
from coordinator.settings import get_settings

runtime = Runtime(get_settings())
app = runtime.celery
