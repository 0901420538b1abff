"""FastAPI dependencies shared by the routes."""

from __future__ import annotations

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from coordinator.auth import account_for_key, bearer_token
from coordinator.errors import NotFound, Unauthorized
from coordinator.models import Account, Node
from coordinator.node_registry import check_signed
from coordinator.runtime import Runtime
from protocol import Signed


def runtime(request: Request) -> Runtime:
    return request.app.state.runtime


async def current_account(request: Request) -> Account:
    rt: Runtime = request.app.state.runtime
    key = bearer_token(request)
    account = rt.keys.get(key)
    if account is not None:
        return account

    def _lookup():
        with rt.read_session() as s:
            return account_for_key(s, key)

    account = await run_in_threadpool(_lookup)
    if account is None:
        raise Unauthorized("invalid API key")
    rt.keys.put(key, account)
    return account


def verify_signed(rt: Runtime, msg: Signed, *, must_exist: bool = True) -> None:
    """Check a node's signed message (signature, timestamp, nonce) and record its nonce in a
    transaction of its own that commits whatever happens next: a request refused later (a
    402, a 403) still burns its nonce, so the same signed bytes can never be replayed. Call
    it in a worker thread before the request's own session."""
    with rt.session() as s:
        if must_exist and s.get(Node, msg.node_id) is None:
            raise NotFound("unknown node: register first")
        check_signed(s, msg, rt.settings)
    rt.limiter.node_message(msg.node_id)  # counted once authentic: a forger cannot exhaust it
