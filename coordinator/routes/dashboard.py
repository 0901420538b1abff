"""The dashboard pages and their JSON.

Pages (HTML; `?fragment=1` returns only the live part the page re-fetches):
`/dashboard` market (operator), `/dashboard/nodes` and `/dashboard/nodes/{id}` (operator; a
seller sees its own node's page), `/dashboard/coach` (seller: its node; operator: `?node=`),
`/dashboard/usage` (buyer: its own; operator: `?account=`). JSON: `/dashboard.json`,
`/dashboard/coach.json`, `/dashboard/usage.json`. Who is asking comes from the session cookie
(`web_auth.py`; `routes/web_login.py` signs in), or for scripts the operator's admin token as
a bearer header. A browser without a session is sent to `/login`; a signed-in user asking
for what is not theirs gets 403.
"""

from __future__ import annotations

import hmac
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from sqlalchemy import func
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from coordinator import pages
from coordinator.coach import coach
from coordinator.dashboard import market_history, snapshot
from coordinator.errors import Forbidden, NotFound, Unauthorized
from coordinator.history import node_buckets
from coordinator.models import InferenceRequest, NodeOffer
from coordinator.models.account import utcnow
from coordinator.usage import usage
from coordinator.web_auth import COOKIE, Principal, principal_for

router = APIRouter(tags=["dashboard"])
WINDOWS = {"1h": 1, "6h": 6, "24h": 24, "7d": 168, "30d": 720}


def _principal(request: Request) -> Principal | None:
    settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        if settings.admin_token and hmac.compare_digest(token.strip().encode(), settings.admin_token.encode()):
            return Principal("operator")
        raise Forbidden("the dashboard's bearer token is the operator's admin token")
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    with request.app.state.runtime.read_session() as s:
        return principal_for(s, cookie)


async def _who(request: Request) -> Principal | None:
    return await run_in_threadpool(_principal, request)


def _html(request: Request, title: str, live: str, who: Principal) -> Response:
    if request.query_params.get("fragment"):
        return HTMLResponse(live, headers={"Cache-Control": "no-store"})
    label = who.role if who.subject is None else f"{who.role} {who.subject[:12]}"
    return HTMLResponse(pages.shell(title, live, role=who.role, who=label,
                                    refresh_s=request.app.state.settings.dashboard_refresh_s),
                        headers={"Cache-Control": "no-store"})


def _denied(request: Request, who: Principal | None, json: bool = False) -> Response:
    if who is None:
        if json or request.query_params.get("fragment"):
            raise Unauthorized("sign in at /login first")
        return RedirectResponse("/login", status_code=303)
    if json:
        raise Forbidden("this view is not yours")
    return HTMLResponse(pages.message("Not allowed", "This page is not yours. Signed in as " + who.role + ".",
                                      who.role), status_code=403)


def _read(request: Request, fn):
    rt = request.app.state.runtime

    def _do():
        with rt.read_session() as s:
            return fn(s, rt.settings)

    return run_in_threadpool(_do)


def _window(request: Request) -> str:
    w = request.query_params.get("window", "6h")
    return w if w in WINDOWS else "6h"


@router.get("/dashboard.json")
async def dashboard_json(request: Request):
    who = await _who(request)
    if who is None or who.role != "operator":
        return _denied(request, who, json=True)
    return await _read(request, snapshot)


@router.get("/dashboard", response_class=HTMLResponse)
async def market_page(request: Request):
    who = await _who(request)
    if who is None or who.role != "operator":
        return _denied(request, who)
    window = _window(request)

    def _do(s, settings):
        snap = snapshot(s, settings)
        models = sorted({n["model"] for n in snap["nodes"]})
        model = request.query_params.get("model") or None
        if model not in models:
            live = sorted({n["model"] for n in snap["nodes"] if n["routable"]})
            model = (live or models or [None])[0]
        hist = market_history(s, utcnow() - timedelta(hours=WINDOWS[window]), model)
        return pages.market(snap, hist, model, models, window)

    return _html(request, "Market", await _read(request, _do), who)


@router.get("/dashboard/nodes", response_class=HTMLResponse)
async def nodes_page(request: Request):
    who = await _who(request)
    if who is None or who.role != "operator":
        return _denied(request, who)
    return _html(request, "Nodes", await _read(request, lambda s, st: pages.nodes_table(snapshot(s, st))), who)


@router.get("/dashboard/nodes/{node_id}", response_class=HTMLResponse)
async def node_page(node_id: str, request: Request):
    who = await _who(request)
    if who is None or not who.may_see_node(node_id):
        return _denied(request, who)
    window = _window(request)

    def _do(s, settings):
        if s.exec(select(NodeOffer.id).where(NodeOffer.node_id == node_id)).first() is None:
            raise NotFound(f"no node {node_id}")
        snap = snapshot(s, settings)
        offers = [n for n in snap["nodes"] if n["id"] == node_id]
        return pages.node_page(offers, node_buckets(s, node_id, utcnow() - timedelta(hours=WINDOWS[window])))

    return _html(request, "Node", await _read(request, _do), who)


def _coach_node(request: Request, who: Principal) -> str:
    if who.role == "seller":
        return who.subject or ""
    node = request.query_params.get("node")
    if not node:
        raise NotFound("name the node: ?node=<id>")
    return node


@router.get("/dashboard/coach.json")
async def coach_json(request: Request):
    who = await _who(request)
    if who is None or who.role not in ("operator", "seller"):
        return _denied(request, who, json=True)
    node_id = _coach_node(request, who)
    return JSONResponse(await _read(request, lambda s, st: _coach(s, st, node_id)))


def _coach(s, settings, node_id: str) -> dict:
    try:
        return coach(s, settings, node_id)
    except LookupError:
        raise NotFound(f"no node {node_id}") from None


@router.get("/dashboard/coach", response_class=HTMLResponse)
async def coach_page(request: Request):
    who = await _who(request)
    if who is None or who.role not in ("operator", "seller"):
        return _denied(request, who)
    node_id = _coach_node(request, who)
    live = await _read(request, lambda s, st: pages.coach(_coach(s, st, node_id)))
    return _html(request, "Coach", live, who)


def _usage_account(request: Request, who: Principal) -> str:
    if who.role == "buyer":
        asked = request.query_params.get("account")
        if asked and asked != who.subject:
            raise Forbidden("a buyer sees only its own usage")
        return who.subject or ""
    return request.query_params.get("account") or ""


def _usage(s, settings, account_id: str) -> dict:
    if not account_id:  # the operator without ?account=: the busiest buyer of the last day
        row = s.exec(select(InferenceRequest.account_id, func.count()).where(
            col(InferenceRequest.created_at) >= utcnow() - timedelta(days=1))
            .group_by(InferenceRequest.account_id).order_by(func.count().desc()).limit(1)).first()
        account_id = row[0] if row else ""
    return usage(s, account_id)


@router.get("/dashboard/usage.json")
async def usage_json(request: Request):
    who = await _who(request)
    if who is None or who.role not in ("operator", "buyer"):
        return _denied(request, who, json=True)
    account = _usage_account(request, who)
    return JSONResponse(await _read(request, lambda s, st: _usage(s, st, account)))


@router.get("/dashboard/usage", response_class=HTMLResponse)
async def usage_page(request: Request):
    who = await _who(request)
    if who is None or who.role not in ("operator", "buyer"):
        return _denied(request, who)
    try:
        account = _usage_account(request, who)
    except Forbidden:
        return _denied(request, who)
    live = await _read(request, lambda s, st: pages.usage(_usage(s, st, account)))
    return _html(request, "Usage", live, who)
