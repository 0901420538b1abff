"""The coordinator's FastAPI application."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Response
from starlette.concurrency import run_in_threadpool

from coordinator import metrics

from coordinator.body_limit import BodyLimit
from coordinator.errors import install_error_handlers, install_openapi_errors
from coordinator.routes import accounts, audits, dashboard, nodes, openai_api, requests, seller
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings, get_settings


def create_app(settings: CoordinatorSettings | None = None, runtime: Runtime | None = None) -> FastAPI:
    settings = settings or (runtime.settings if runtime else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime or Runtime(settings)
        app.state.runtime = rt
        app.state.settings = settings
        if settings.in_process_worker:
            rt.start_in_process_worker()
        try:
            yield
        finally:
            await rt.bus.close()
            if runtime is None:
                rt.stop()

    app = FastAPI(title="Agora coordinator", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    install_openapi_errors(app)
    app.include_router(openai_api.router)
    app.include_router(nodes.router)
    app.include_router(accounts.router)
    app.include_router(requests.router)
    app.include_router(seller.router)
    app.include_router(audits.router)
    app.include_router(dashboard.router)

    @app.get("/healthz", tags=["ops"])
    async def healthz():
        return {"ok": True}

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def prometheus_metrics():
        body = await run_in_threadpool(metrics.render, app.state.runtime)
        return Response(body, media_type="text/plain; version=0.0.4")

    return app
