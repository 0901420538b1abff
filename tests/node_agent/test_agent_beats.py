"""The agent's liveness on its work channel: a beat every interval, an ack asked for only
every BEAT_ACK_EVERY beats, and the signed HTTP heartbeat whenever an asked-for ack did
not come (a coordinator that does not answer beats still hears from the node in time)."""

from __future__ import annotations

import asyncio

import httpx

from node_agent.agent import BEAT_ACK_EVERY, NodeAgent
from node_agent.identity import Identity
from node_agent.settings import NodeSettings
from tests.node_agent.test_agent_chunks import FakeSocket


def _agent(acks: bool) -> tuple[NodeAgent, FakeSocket, list[str]]:
    agent = NodeAgent(NodeSettings(heartbeat_interval_s=0.01), engine=None, identity=Identity.generate(),
                      http=httpx.AsyncClient(base_url="http://127.0.0.1:9"))
    sock, sent = FakeSocket(), []
    agent._ws = sock
    agent.ready.set()
    real_send = sock.send

    async def send(data: str) -> None:
        await real_send(data)
        sent.append("beat")
        if acks and sock.frames[-1].get("ack"):
            agent._on_frame({"type": "beat_ack", "t": sock.frames[-1]["t"]})

    async def http_heartbeat() -> None:
        sent.append("http")

    sock.send = send
    agent.heartbeat_once = http_heartbeat
    return agent, sock, sent


async def _run(agent: NodeAgent, ticks: int) -> None:
    task = asyncio.create_task(agent._heartbeats())
    await asyncio.sleep(0.01 * ticks + 0.005)
    task.cancel()


def test_a_coordinator_that_acks_hears_beats_and_is_asked_every_few():
    agent, sock, sent = _agent(acks=True)
    asyncio.run(_run(agent, 3 * BEAT_ACK_EVERY))
    assert "http" not in sent and len(sock.frames) >= 2 * BEAT_ACK_EVERY
    asks = [i for i, f in enumerate(sock.frames) if f["ack"]]
    assert asks[:2] == [0, BEAT_ACK_EVERY]


def test_a_coordinator_that_never_acks_gets_an_http_heartbeat_every_other_interval():
    agent, sock, sent = _agent(acks=False)
    asyncio.run(_run(agent, 20))
    assert len(sent) >= 10
    assert all(a != b for a, b in zip(sent, sent[1:]))  # beat (asking), http, beat (asking), http, ...
    assert all(f["ack"] for f in sock.frames)
