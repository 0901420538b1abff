"""The coordinator's FastAPI application."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from coordinator import liveness, metrics, replicas

from coordinator.body_limit import BodyLimit
from coordinator.bus import BusUnavailable
from coordinator.errors import Unavailable, install_error_handlers, install_openapi_errors
from coordinator.batch_runner import BatchRunner
from coordinator.file_store import make_file_store
from coordinator.routes import accounts, audits, batches, dashboard, nodes, openai_api, requests, seller, web_login
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings, get_settings

log = logging.getLogger(__name__)


async def _replica_beat(rt: Runtime) -> None:
    """This API process is alive (coordinator/replicas.py): its buyers' requests are its own."""
    while True:
        try:
            await run_in_threadpool(_beat_once, rt)
        except Exception:  # noqa: BLE001 - a database hiccup: the next beat tries again
            log.warning("replica heartbeat failed", exc_info=True)
        await asyncio.sleep(replicas.REPLICA_BEAT_S)


async def _flush_liveness(rt: Runtime) -> None:
    """Nodes heard on this process's work channels: one batched write per `FLUSH_S`."""
    while True:
        await asyncio.sleep(liveness.FLUSH_S)
        if not rt.liveness.pending():
            continue
        try:
            await run_in_threadpool(_flush_once, rt)
        except Exception:  # noqa: BLE001 - kept, written by the next flush
            log.warning("liveness flush failed", exc_info=True)


def _flush_once(rt: Runtime) -> None:
    with rt.session() as s:
        rt.liveness.flush(s)


def _beat_once(rt: Runtime) -> None:
    with rt.session() as s:
        replicas.beat(s, rt.replica_id)


def _replica_leave(rt: Runtime) -> None:
    try:
        with rt.session() as s:
            replicas.leave(s, rt.replica_id)
    except Exception:  # noqa: BLE001 - shutting down: the sweep forgets it later anyway
        log.warning("could not deregister replica %s", rt.replica_id)


GC_THRESHOLDS = (20_000, 20, 100)  # CPython's default: (700, 10, 10)


def tune_gc() -> None:
    """For a server process, before it serves. A coordinator holding thousands of work
    channels and the market view has millions of long-lived objects, and each full
    collection walks them all: at 10,000 connected nodes CPython's defaults paused the
    process for ~1 s every few seconds (`bench/fleet.py`). What start-up built is frozen
    (never walked again) and young objects are collected less often, so full collections
    become rare; memory of short-lived cycles is freed a little later. `AGORA_GC_THRESHOLDS`
    overrides (at 10,000 nodes, (20000, 2, 1000) gave heartbeat p99 45, 515 and 433 ms in three
    runs, against 368-515 ms: not adopted)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*gc_thresholds())


def gc_thresholds() -> tuple[int, ...]:
    """`GC_THRESHOLDS`, or `AGORA_GC_THRESHOLDS` ("20000,20,100") where an operator set it."""
    raw = os.environ.get("AGORA_GC_THRESHOLDS", "")
    try:
        values = tuple(int(x) for x in raw.split(",")) if raw else GC_THRESHOLDS
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        log.warning("AGORA_GC_THRESHOLDS=%r is not three positive integers; using %s", raw, GC_THRESHOLDS)
        return GC_THRESHOLDS
    return values


def create_app(settings: CoordinatorSettings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or (runtime.settings if runtime else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        app.state.settings = settings
        if settings.in_process_worker:
            rt.start_in_process_worker()
        beating = asyncio.create_task(_replica_beat(rt))
        flushing = asyncio.create_task(_flush_liveness(rt))
        runner = BatchRunner(rt, app.state.file_store) if settings.batch_runner else None  # batch_runner.py
        if runner is not None:
            runner.start()
        try:
            yield
        finally:
            beating.cancel()
            flushing.cancel()
            if runner is not None:
                await runner.stop()
            await run_in_threadpool(_replica_leave, rt)
            await rt.bus.close()
            if runtime is None:
                rt.stop()

    app = FastAPI(title="Agora coordinator", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.file_store = make_file_store(settings)  # Batch API files (file_store.py)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       paths={"/v1/files": settings.batch_file_max_bytes + 64 * 1024})  # + multipart framing
    install_error_handlers(app)
    install_openapi_errors(app)
    app.include_router(openai_api.router)
    app.include_router(batches.router)
    app.include_router(nodes.router)
    app.include_router(accounts.router)
    app.include_router(requests.router)
    app.include_router(seller.router)
    app.include_router(audits.router)
    app.include_router(dashboard.router)
    app.include_router(web_login.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        """Liveness: the process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["ops"])
    async def readyz():
        """Readiness: the database answers and the relay bus is connected (else 503, and a
        balancer sends buyers to another replica)."""
        rt = app.state.runtime

        def _db() -> None:
            with rt.session() as s:
                s.exec(select(1)).one()

        try:
            await run_in_threadpool(_db)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            raise Unavailable(f"database unreachable: {type(exc).__name__}") from exc
        try:
            await rt.bus.ensure_connected()
        except BusUnavailable as exc:
            raise Unavailable(f"relay bus unreachable: {exc}") from exc
        return {"ok": True, "replica": rt.replica_id}

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus_metrics():
        body = await run_in_threadpool(metrics.render, app.state.runtime)
        return Response(body, media_type="text/plain; version=0.0.4")

    return app
