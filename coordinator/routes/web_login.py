"""Signing in to the dashboards: `GET/POST /login` (the operator's admin token or a buyer's
API key, typed into a form: never in a URL), `GET /login/link/{token}` (a single-use link,
from `agora up` or a seller's signed request), `POST /logout`. A sign-in sets an HTTP-only,
SameSite=Strict cookie; the `Secure` flag follows the request's scheme. The browser's routes
(forms, redirects, HTML) are left out of the OpenAPI schema; the seller's JSON route is in it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from coordinator import pages
from coordinator.models import Node
from coordinator.routes.deps import runtime, verify_signed
from coordinator.runtime import Runtime
from coordinator.web_auth import (COOKIE, Principal, end_session, issue_link, principal_for_credential,
                                  redeem_link, start_session)
from protocol import AccountQuery

router = APIRouter(tags=["dashboard"])


def _signed_in(request: Request, principal: Principal, token: str, settings) -> Response:
    resp = RedirectResponse(principal.home, status_code=303)
    resp.set_cookie(COOKIE, token, max_age=int(settings.web_session_s), httponly=True, samesite="strict",
                    secure=request.url.scheme == "https", path="/")
    return resp


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
async def login_form():
    return HTMLResponse(pages.login(), headers={"Cache-Control": "no-store"})


@router.post("/login", include_in_schema=False)
async def login(request: Request, credential: str = Form(default="", max_length=512),
                rt: Runtime = Depends(runtime)):
    def _do():
        rt.limiter.sign_in(request.client.host if request.client else "?")
        with rt.session() as s:
            who = principal_for_credential(s, credential, rt.settings)
            return (who, start_session(s, who, rt.settings)) if who else (None, None)

    who, token = await run_in_threadpool(_do)
    if who is None:
        return HTMLResponse(pages.login("That is neither the operator's token nor a valid API key."), status_code=401)
    return _signed_in(request, who, token, rt.settings)


@router.get("/login/link/{token}", include_in_schema=False)
async def login_link(token: str, request: Request, rt: Runtime = Depends(runtime)):
    def _do():
        with rt.session() as s:
            return redeem_link(s, token, rt.settings)

    got = await run_in_threadpool(_do)
    if got is None:
        return HTMLResponse(pages.login("This sign-in link was used already or has expired."), status_code=401)
    return _signed_in(request, got[0], got[1], rt.settings)


@router.post("/logout", include_in_schema=False)
async def logout(request: Request, rt: Runtime = Depends(runtime)):
    def _do():
        with rt.session() as s:
            end_session(s, request.cookies.get(COOKIE))

    await run_in_threadpool(_do)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


@router.post("/v1/nodes/me/dashboard-link", tags=["sellers"])
async def seller_link(q: AccountQuery, request: Request, rt: Runtime = Depends(runtime)):
    """A node, by its signed message, asks for a single-use link to its coach page."""
    await run_in_threadpool(verify_signed, rt, q)

    def _do():
        with rt.session() as s:
            node = s.get(Node, q.node_id)
            return issue_link(s, Principal("seller", node.id), rt.settings)

    token = await run_in_threadpool(_do)
    return {"url": f"{str(request.base_url).rstrip('/')}/login/link/{token}",
            "expires_in_s": rt.settings.login_link_s}
