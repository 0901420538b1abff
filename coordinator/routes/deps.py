"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from coordinator.auth import account_for_key, bearer_token
from coordinator.errors import Unauthorized
from coordinator.models import Account
from coordinator.runtime import Runtime


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def current_account(request: Request) -> Account:
    rt: Runtime = request.app.state.runtime
    key = bearer_token(request)

    def _lookup():
        with rt.session() as s:
            return account_for_key(s, key)

    account = await run_in_threadpool(_lookup)
    if account is None:
        raise Unauthorized("invalid API key")
    return account
