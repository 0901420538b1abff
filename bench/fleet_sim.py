"""Simulated node agents for bench/fleet.py: real identities, the real protocol, no engine.

One asyncio process holds the whole fleet. Each node: its own Ed25519 key (node_agent's
`Identity`), a signed `Registration`, one work channel (websockets, as the agent's client:
permessage-deflate, keepalive pings every 20 s) opened with a signed `ChannelHello`, `pong`
for every `ping`, and an immediate `bad_request` work error for every assignment (noting
when it arrived). Heartbeats come from one scheduler task: each node at its own phase of
the interval, either a signed HTTP `Heartbeat` (mode "http") or a `beat` frame on its
channel (mode "channel"). HTTP goes through a small raw HTTP/1.1 keep-alive pool (httpx
would cost the simulator more CPU than the coordinator it measures).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import random
import time
from collections.abc import Callable

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from node_agent.agent import BEAT_ACK_EVERY  # the agent's own rule
from node_agent.identity import Identity
from protocol import ChannelHello, Heartbeat, ModelOffer, Registration, fresh_stamp

MODEL = "fleet-sim"
PROBE = "fleet-probe:"
HTTP_TIMEOUT_S = 10.0  # the agent's httpx timeout
KEEPALIVE_S = 4.0  # uvicorn closes an idle keep-alive connection after 5 s


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


class RawHTTP:
    """Minimal HTTP/1.1 POST over a pool of keep-alive connections (at most `max_conns`)."""

    def __init__(self, host: str, port: int, max_conns: int):
        self.host, self.port = host, port
        self.sem = asyncio.Semaphore(max_conns)
        self.idle: collections.deque = collections.deque()
        self.opened = 0

    def _take(self):
        now = time.monotonic()
        while self.idle and now - self.idle[0][2] > KEEPALIVE_S:
            self.idle.popleft()[1].close()
        return self.idle.pop()[:2] if self.idle else None

    async def post(self, path: str, body: bytes, timeout: float = HTTP_TIMEOUT_S) -> tuple[int, bytes]:
        """The timeout covers the wait for a connection too (like the agent's: connect + request)."""
        async def go():
            async with self.sem:
                return await self._post(path, body)

        return await asyncio.wait_for(go(), timeout)

    async def _post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()
        for attempt in range(2):
            conn = self._take()
            reused = conn is not None
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
                self.opened += 1
            r, w = conn
            keep = False
            try:
                w.write(head + body)
                try:
                    raw = await r.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    if reused and attempt == 0:  # the server closed it meanwhile: a fresh one
                        continue
                    raise
                lines = raw.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if "content-length" in headers:
                    data = await r.readexactly(int(headers["content-length"]))
                    keep = headers.get("connection", "").lower() != "close"
                else:
                    data = await r.read()
                return status, data
            finally:
                if keep:
                    self.idle.append((r, w, time.monotonic()))
                else:
                    w.close()
        raise ConnectionError("unreachable")

    def close(self) -> None:
        while self.idle:
            self.idle.pop()[1].close()


class SimNode:
    __slots__ = ("beats", "ever_connected", "http_busy", "identity", "idx", "node_id", "phase", "task", "ws")

    def __init__(self, idx: int, identity: Identity, phase: float):
        self.idx, self.identity, self.node_id = idx, identity, identity.public_key_hex
        self.ws = None
        self.http_busy = False
        self.task: asyncio.Task | None = None
        self.phase = phase
        self.ever_connected = False
        self.beats = 0  # channel beats sent (every BEAT_ACK_EVERY-th asks for an ack, like the agent)


class ModeStats:
    def __init__(self) -> None:
        self.lat_ms: list[float] = []
        self.sent = 0
        self.answered = 0
        self.beats = 0  # every beat due in the window (channel: those that ask for no ack too)
        self.errors: collections.Counter = collections.Counter()
        self.late = 0  # http: the node's previous heartbeat still in flight when the next was due


class Fleet:
    def __init__(self, *, n: int, base: str, interval_s: float, http_conns: int, deflate: bool,
                 ws_ping_interval: float, log: Callable[[str], None]):
        self.n, self.base, self.interval = n, base, interval_s
        host_port = base.split("://", 1)[1]
        self.host, self.port = host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])
        self.ws_url = f"ws://{host_port}/v1/nodes/channel"
        self.http = RawHTTP(self.host, self.port, http_conns)
        self.deflate, self.ws_ping = deflate, (ws_ping_interval or None)
        self.log = log
        self.nodes: list[SimNode] = []
        self.connected = 0
        self.connect_errors: collections.Counter = collections.Counter()
        self.first_attempts = 0
        self.channel_drops = 0
        self.channel_drops_in_window = 0
        self.assigned: dict[str, float] = {}
        self.mode: str | None = None
        self.stats: dict[str, ModeStats] = {}
        self.w0, self.w1 = math.inf, math.inf
        self.lags: list[float] = []
        self._beater: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None
        self._bg: set[asyncio.Task] = set()
        self.closing = False

    # ------------------------------------------------------------------ setup
    def make_identities(self) -> None:
        rnd = random.Random(7)
        self.nodes = [SimNode(i, Identity.generate(), rnd.random() * self.interval) for i in range(self.n)]

    def registration(self, node: SimNode) -> bytes:
        offer = ModelOffer(model=MODEL, price_in=100_000_000 + node.idx % 97 * 1_000_000,
                           price_out=200_000_000 + node.idx % 89 * 1_000_000, tokens_per_s=50.0 + node.idx % 50,
                           tokens_per_s_b1=20.0, ttft_ms=50.0, max_context=2048, dtype="float32",
                           token_ids=True, logprobs=True, can_verify=True)
        reg = Registration(node_id=node.node_id, **fresh_stamp(), models=[offer], region="us-east",
                           max_concurrency=4, engine="sim", benchmark={}, name=f"sim-{node.idx}",
                           operator=f"sim-op-{node.idx}")
        return reg.sign(node.identity).model_dump_json().encode()

    async def register_all(self, concurrency: int) -> dict:
        errors: collections.Counter = collections.Counter()
        done = 0
        sem = asyncio.Semaphore(concurrency)
        last = time.monotonic()

        async def one(node: SimNode) -> None:
            nonlocal done, last
            async with sem:
                for attempt in range(3):
                    try:
                        status, body = await self.http.post("/v1/nodes/register", self.registration(node), 60)
                        if status == 200:
                            break
                        key = f"http_{status}"
                        if status != 429 and status < 500:
                            errors[key + ": " + body.decode(errors="replace")[:120]] += 1
                            break
                        errors[key] += 1
                    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                        errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.5 * (attempt + 1))
            done += 1
            if time.monotonic() - last > 5:
                last = time.monotonic()
                self.log(f"registered {done}/{self.n}")

        t = time.monotonic()
        await asyncio.gather(*(one(nd) for nd in self.nodes))
        self.log(f"registered {self.n} in {time.monotonic() - t:.1f}s ({dict(errors) or 'no errors'})")
        return dict(errors)

    async def connect_all(self, concurrency: int, timeout: float = 900, stall_s: float = 60) -> None:
        """Open every node's channel (at most `concurrency` handshakes at once); stop waiting
        when none has opened for `stall_s` (the rest keep trying in the background)."""
        sem = asyncio.Semaphore(concurrency)
        for nd in self.nodes:
            nd.task = asyncio.create_task(self._node_main(nd, sem))
        t, last = time.monotonic(), time.monotonic()
        best, best_at = 0, time.monotonic()
        while self.first_attempts < self.n and time.monotonic() - t < timeout:
            await asyncio.sleep(0.2)
            if self.connected > best:
                best, best_at = self.connected, time.monotonic()
            elif time.monotonic() - best_at > stall_s:
                self.log(f"no channel opened for {stall_s:g}s: going on with {self.connected}")
                break
            if time.monotonic() - last > 5:
                last = time.monotonic()
                self.log(f"channels open {self.connected}/{self.n} ({dict(self.connect_errors) or 'no errors'})")
        self.log(f"channels open {self.connected}/{self.n} in {time.monotonic() - t:.1f}s "
                 f"({dict(self.connect_errors) or 'no errors'})")

    async def _node_main(self, nd: SimNode, sem: asyncio.Semaphore) -> None:
        delay, first = 0.5, True
        while not self.closing:
            ws = None
            try:
                async with sem:
                    ws = await connect(self.ws_url, max_size=2**24, ping_interval=self.ws_ping,
                                       ping_timeout=60, open_timeout=120, close_timeout=1,
                                       compression="deflate" if self.deflate else None)
                    hello = ChannelHello(node_id=nd.node_id, **fresh_stamp()).sign(nd.identity)
                    await ws.send(hello.model_dump_json())
                    welcome = json.loads(await asyncio.wait_for(ws.recv(), 120))
                if welcome.get("type") != "welcome":
                    self.connect_errors[f"refused: {str(welcome.get('reason'))[:80]}"] += 1
                    await ws.close()
                else:
                    nd.ws, nd.ever_connected = ws, True
                    self.connected += 1
                    if first:
                        first = False
                        self.first_attempts += 1
                    delay = 0.5
                    try:
                        async for raw in ws:
                            await self._on_frame(nd, ws, raw)
                    finally:
                        nd.ws = None
                        self.connected -= 1
                        if not self.closing:
                            self.channel_drops += 1
                            if self.w0 <= time.monotonic() <= self.w1:
                                self.channel_drops_in_window += 1
            except asyncio.CancelledError:
                raise
            except (TimeoutError, OSError, WebSocketException, ValueError) as exc:
                self.connect_errors[type(exc).__name__] += 1
            if first:
                first = False
                self.first_attempts += 1
            if self.closing:
                return
            await asyncio.sleep(delay + random.random() * delay / 2)
            delay = min(delay * 2, 30)

    async def _on_frame(self, nd: SimNode, ws, raw) -> None:
        f = json.loads(raw)
        kind = f.get("type")
        if kind == "beat_ack":
            t, now = f.get("t"), time.monotonic()
            st = self.stats.get("channel")
            if st is not None and isinstance(t, (int, float)) and self.w0 <= t <= self.w1:
                st.answered += 1
                st.lat_ms.append((now - t) * 1000)
        elif kind == "ping":
            await ws.send(json.dumps({"type": "pong", "t": f.get("t")}))
        elif kind == "assign":
            now = time.monotonic()
            msgs = f.get("messages") or []
            text = str(msgs[-1].get("content", "")) if msgs else str(f.get("prompt") or "")
            if PROBE in text:
                self.assigned[text.split(PROBE, 1)[1].split()[0]] = now
            await ws.send(json.dumps({"type": "error", "request_id": f.get("request_id"), "code": "bad_request",
                                      "message": "sim"}))
        elif kind == "verify":
            await ws.send(json.dumps({"type": "verify_result", "audit_id": f.get("audit_id"),
                                      "error": "sim: this node does not verify"}))
        elif kind == "refused":
            self.connect_errors[f"refused: {str(f.get('reason'))[:80]}"] += 1

    # ------------------------------------------------------------------ liveness
    def start_mode(self, mode: str, interval_s: float | None = None) -> None:
        """Beat in `mode` from now on (each node at its phase of the interval), replacing the
        beats before."""
        self.stop_mode()
        self.mode = mode
        self.stats[mode] = ModeStats()
        self._beater = asyncio.create_task(self._beat_loop(mode, interval_s or self.interval))

    def stop_mode(self) -> None:
        if self._beater is not None:
            self._beater.cancel()
        self.mode, self._beater = None, None

    def open_window(self) -> None:
        self.w0, self.w1 = time.monotonic(), math.inf
        self.channel_drops_in_window = 0
        self.lags = []

    def close_window(self) -> None:
        self.w1 = time.monotonic()

    async def _beat_loop(self, mode: str, interval: float) -> None:
        order = sorted(self.nodes, key=lambda nd: nd.phase)
        st = self.stats[mode]
        t0, scale = time.monotonic(), interval / self.interval
        k = 0
        while True:
            base = t0 + k * interval
            for nd in order:
                due = base + nd.phase * scale
                delay = due - time.monotonic()
                if delay > 0.002:
                    await asyncio.sleep(delay)
                in_window = self.w0 <= due <= self.w1
                if mode == "channel":
                    ws = nd.ws
                    ask = nd.beats % BEAT_ACK_EVERY == 0
                    nd.beats += 1
                    if in_window:
                        st.beats += 1
                    in_window = in_window and ask  # round trips are measured on the beats that ask
                    if in_window:
                        st.sent += 1
                    if ws is None:
                        if in_window:
                            st.errors["no_channel"] += 1
                        continue
                    try:
                        await ws.send(json.dumps({"type": "beat", "t": due, "ack": ask}))
                    except (OSError, WebSocketException) as exc:
                        if in_window:
                            st.errors[f"beat_send_{type(exc).__name__}"] += 1
                else:
                    if nd.http_busy:  # the agent awaits its heartbeat: this one is late
                        if in_window:
                            st.late += 1
                        continue
                    if in_window:
                        st.sent += 1
                    nd.http_busy = True
                    task = asyncio.create_task(self._http_beat(nd, due, st))
                    self._bg.add(task)
                    task.add_done_callback(self._bg.discard)
            k += 1

    async def _http_beat(self, nd: SimNode, due: float, st: ModeStats) -> None:
        in_window = self.w0 <= due <= self.w1
        try:
            body = Heartbeat(node_id=nd.node_id, **fresh_stamp()).sign(nd.identity).model_dump_json().encode()
            status, data = await self.http.post("/v1/nodes/heartbeat", body)
            if in_window:
                if status == 200:
                    st.answered += 1
                    st.lat_ms.append((time.monotonic() - due) * 1000)
                else:
                    try:
                        code = json.loads(data).get("error", {}).get("code")
                    except (ValueError, AttributeError):
                        code = None
                    st.errors[f"http_{status}" + (f"_{code}" if code else "")] += 1
        except TimeoutError:
            if in_window:
                st.errors["http_timeout_10s"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            if in_window:
                st.errors[f"http_{type(exc).__name__}"] += 1
        finally:
            nd.http_busy = False

    def window_stats(self, mode: str) -> dict:
        """Round trips of the beats due in the window. A beat never answered (refused, timed
        out, no ack) counts in the percentiles as the agent's timeout, HTTP_TIMEOUT_S: where
        more than 1% were, p99 is that bound (`censored`: the real figure is at least it)."""
        st = self.stats[mode]
        errors = dict(st.errors)
        unanswered = st.sent - st.answered - sum(st.errors.values())
        if unanswered > 0:
            errors["beat_not_acked" if mode == "channel" else "http_still_in_flight"] = unanswered
        detail = dict(errors)
        if st.late:  # the agent would have sent these late: they show as fewer beats per second
            detail["http_skipped_previous_in_flight"] = st.late
        failed = max(0, st.sent - st.answered)
        lat = st.lat_ms + [HTTP_TIMEOUT_S * 1000] * failed
        return {"sent": st.sent, "answered": st.answered, "beats": st.beats or st.answered, "p50_ms": r2(pct(lat, 50)),
                "p99_ms": r2(pct(lat, 99)), "max_ms": r2(max(lat) if lat else None),
                "censored": failed > 0.01 * max(1, st.sent),
                "errors": sum(errors.values()), "error_detail": detail}

    def window_summary(self, mode: str) -> str:
        st = self.stats[mode]
        return (f"{st.answered}/{st.sent} beats answered, p99 {r2(pct(st.lat_ms, 99))} ms, "
                f"errors {dict(st.errors) or 0}, late {st.late}, channels {self.connected}, "
                f"sim loop lag p99 {self.loop_lag_p99_ms()} ms")

    # ------------------------------------------------------------------ event-loop lag
    def start_lag_monitor(self) -> None:
        async def monitor():
            while True:
                t = time.monotonic()
                await asyncio.sleep(0.05)
                if self.w0 <= t <= self.w1:
                    self.lags.append((time.monotonic() - t - 0.05) * 1000)

        self._lag_task = asyncio.create_task(monitor())

    def loop_lag_p99_ms(self) -> float | None:
        return r2(pct(self.lags, 99))

    # ------------------------------------------------------------------ buyers
    async def live_nodes(self, client) -> int | None:
        try:
            resp = await client.get("/v1/models", timeout=60)
            return sum(m["live_nodes"] for m in resp.json()["data"] if m["id"] == MODEL)
        except Exception:  # noqa: BLE001
            return None

    async def wait_live(self, client, timeout: float) -> int | None:
        deadline, live = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            live = await self.live_nodes(client)
            if live is not None and live >= self.connected:
                break
            await asyncio.sleep(1.0)
        self.log(f"live nodes {live} (channels open {self.connected})")
        return live

    async def route_probes(self, client, count: int, budget_s: float) -> dict:
        routed, answered = [], []
        errors: collections.Counter = collections.Counter()
        t_end, sent = time.monotonic() + budget_s, 0
        for i in range(count + 1):  # the first one warms up (not counted)
            if i > 1 and time.monotonic() > t_end:
                break
            sent += 1 if i else 0
            marker = f"{time.monotonic_ns():x}"
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"{PROBE}{marker} hello"}],
                    "max_tokens": 8, "temperature": 0}
            t0 = time.monotonic()
            try:
                resp = await client.post("/v1/chat/completions", json=body, timeout=60)
            except Exception as exc:  # noqa: BLE001
                if i:
                    errors[f"buyer_{type(exc).__name__}"] += 1
                continue
            t1 = time.monotonic()
            at = self.assigned.pop(marker, None)
            if i == 0:
                continue
            if at is None:
                errors[f"buyer_not_routed_{resp.status_code}"] += 1
            else:
                routed.append((at - t0) * 1000)
            code = None
            try:
                code = resp.json().get("error", {}).get("code")
            except (ValueError, AttributeError):
                pass
            if resp.status_code == 400 and code == "bad_request":
                answered.append((t1 - t0) * 1000)
            elif at is not None:
                errors[f"buyer_{resp.status_code}_{code}"] += 1
            await asyncio.sleep(0.02)
        return {"p50_ms": r2(pct(routed, 50)), "p99_ms": r2(pct(routed, 99)), "answer_p50_ms": r2(pct(answered, 50)),
                "sent": sent, "routed": len(routed),
                "errors": sum(errors.values()), "error_detail": dict(errors)}

    # ------------------------------------------------------------------ teardown
    async def close(self) -> None:
        self.closing = True
        self.stop_mode()
        for t in (self._lag_task, *self._bg):
            if t is not None:
                t.cancel()
        for nd in self.nodes:
            if nd.ws is not None:
                with contextlib.suppress(Exception):  # closing anyway
                    nd.ws.transport.abort()
            if nd.task is not None:
                nd.task.cancel()
        await asyncio.gather(*(nd.task for nd in self.nodes if nd.task is not None), return_exceptions=True)
        self.http.close()
