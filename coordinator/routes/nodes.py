"""Routes for node agents: registration, signed heartbeats, the work channel."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, WebSocket
from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from coordinator import node_registry
from coordinator.models import Node, NodeOffer, NodeOfferPublic, NodePublic
from coordinator.routability import reasons
from coordinator.routes.deps import runtime, verify_signed
from coordinator.runtime import Runtime
from coordinator.work_channel import Channel
from protocol import Heartbeat, Registration

router = APIRouter(prefix="/v1/nodes", tags=["nodes"])


@router.post("/register")
async def register(reg: Registration, request: Request, rt: Runtime = Depends(runtime)):
    await run_in_threadpool(rt.limiter.registration, request.client.host if request.client else "unknown")
    await run_in_threadpool(verify_signed, rt, reg, must_exist=False)

    def _do():
        with rt.session() as s:
            node = node_registry.register(s, reg, rt.settings, verified=True)
            return {"node_id": node.id, "heartbeat_interval_s": rt.settings.heartbeat_interval_s,
                    "signature_window_s": rt.settings.signature_window_s}

    return await run_in_threadpool(_do)


@router.post("/heartbeat")
async def heartbeat(hb: Heartbeat, rt: Runtime = Depends(runtime)):
    await run_in_threadpool(verify_signed, rt, hb)

    def _do():
        with rt.session() as s:
            node_registry.heartbeat(s, hb, rt.settings, verified=True)
        return {"ok": True}

    return await run_in_threadpool(_do)


@router.get("")
async def list_nodes(rt: Runtime = Depends(runtime)) -> list[NodePublic]:
    def _do():
        with rt.read_session() as s:
            nodes = s.exec(select(Node).order_by(Node.registered_at)).all()
            offers = s.exec(select(NodeOffer)).all()
            why = reasons(s, rt.settings, list(nodes))
            out = []
            for n in nodes:
                pub = NodePublic.model_validate(n, update={
                    "online": node_registry.is_live(n, rt.settings), "routable": why[n.id] is None,
                    "not_routable_because": why[n.id],
                    "offers": [_offer_public(o) for o in offers if o.node_id == n.id]})
                out.append(pub)
            return out

    return await run_in_threadpool(_do)


def _offer_public(o: NodeOffer) -> NodeOfferPublic:
    return NodeOfferPublic.model_validate(o)


@router.websocket("/channel")
async def channel(ws: WebSocket):
    await Channel(ws, ws.app.state.runtime).run()
