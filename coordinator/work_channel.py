"""The work channel: one WebSocket a node agent opens to the coordinator (so it works
behind NAT). Assignments flow down; token chunks, receipts and errors flow up and are
relayed to the buyer over the bus. No Celery hop on the token path.

First frame from the node: a signed `ChannelHello`. Token chunks are accepted only for
requests assigned to this node; the coordinator keeps its own count and hash chain of
what it relayed, which the receipt must match to be paid.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime, timezone

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from sqlmodel import select

from coordinator.audits import maybe_select
from coordinator.verdicts import apply_result
from coordinator.bus import BusUnavailable
from coordinator.db import retry_transient, writes_first
from coordinator.errors import APIError
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import check_signed
from coordinator.runtime import Runtime
from coordinator.failover import fail_over
from coordinator.settlement import ReceiptRejected, Relayed, accept_receipt, fail_request
from coordinator.frames import assignment_frame
from protocol import ChannelHello, Done, TokenChunk, TokenCommitment, VerifyResult, WorkError

log = logging.getLogger(__name__)
MAX_PREFIX_KEYS = 1024  # per list in one beat (agents send at most 256)
HELLO_TIMEOUT_S = 10.0
FINGERPRINT_DUE = datetime(2000, 1, 1, tzinfo=timezone.utc)  # last_canary_at that makes a canary due now
BUYER_ERRORS = ("context_length_exceeded", "bad_request")  # a node's error codes that are the request's fault


class _Stream:
    """What the coordinator saw of one request on this channel."""

    def __init__(self, request_id: str):
        self.count = 0
        self.token_ids: list[int] = []
        self.logprobs: list[int] = []
        self.commitment = TokenCommitment(request_id)
        self.sent_at = time.monotonic()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self.lost = 0  # tokens the relay bus failed to carry
        self.text_bytes = 0  # relayed text, for chunks counted without token ids
        self.auditable = True  # every chunk had token ids and log-probs
        self.ids_known = True  # every chunk had token ids
        self.text = ""  # what was relayed, for a text-level failover


class Channel:
    def __init__(self, ws: WebSocket, rt: Runtime):
        self.ws, self.rt = ws, rt
        self.node_id = ""
        self.channel_id = secrets.token_hex(8)  # a node's newest channel wins (Node.channel_id)
        self.streams: dict[str, _Stream] = {}
        self.tasks: set[asyncio.Task] = set()  # receipts, errors and verdicts being handled
        self.send_lock = asyncio.Lock()

    async def run(self) -> None:
        await self.ws.accept()
        try:
            hello = ChannelHello.model_validate(await asyncio.wait_for(self.ws.receive_json(), HELLO_TIMEOUT_S))
            await run_in_threadpool(self._authenticate, hello)
        except (asyncio.TimeoutError, ValidationError, ValueError, APIError, WebSocketDisconnect) as exc:
            reason = exc.message if isinstance(exc, APIError) else f"bad hello: {type(exc).__name__}"
            await self._close(4401, reason)
            return
        self.node_id = hello.node_id
        await self.ws.send_json({"type": "welcome", "node_id": self.node_id})
        try:
            async with self.rt.bus.subscribe(f"node:{self.node_id}") as sub:
                # an older channel of this node, here or on another replica, closes itself
                await self.rt.bus.publish(f"node:{self.node_id}", {"type": "superseded", "channel_id": self.channel_id})
                for frame in await run_in_threadpool(self._pending_assignments):
                    await self._send_assignment(frame)
                self.rt.kick_dispatch()
                pump = asyncio.create_task(self._pump(sub))
                pinger = asyncio.create_task(self._ping_loop())
                try:
                    await self._read_loop()
                finally:
                    pump.cancel()
                    pinger.cancel()
        finally:
            # Not awaited: it must run even when this task is being cancelled (server
            # shutdown, a test client closing), where any further await would be skipped.
            asyncio.get_running_loop().run_in_executor(None, self._disconnected)

    # ------------------------------------------------------------------ setup
    def _authenticate(self, hello: ChannelHello) -> None:
        with self.rt.session() as s:
            node = s.get(Node, hello.node_id)
            if node is None:
                raise APIError("unknown node: register first")
            check_signed(s, hello, self.rt.settings)
            if node.banned:
                raise APIError("this node is banned")
            node.channel_connected = True
            node.channel_id = self.channel_id
            node.online, node.last_heartbeat_at = True, utcnow()  # the signed hello is a sign of life
            # A (re)connect may come with a swapped checkpoint: audit the next jobs at the
            # session rate, and check the model fingerprint with a canary at once.
            node.session_jobs = 0
            node.last_canary_at = FINGERPRINT_DUE
            s.add(node)

    def _pending_assignments(self) -> list[dict]:
        with self.rt.session() as s:
            rows = s.exec(select(InferenceRequest).where(
                InferenceRequest.node_id == self.node_id,
                InferenceRequest.status == RequestStatus.ASSIGNED)).all()
            return [assignment_frame(r) for r in rows]

    def _disconnected(self) -> None:
        """This connection is gone: its unfinished requests continue on other nodes (they
        cannot continue on another connection of the node: their tokens were counted here).
        The node stays connected if a newer channel of it is open."""
        moved, audits = [], []
        with self.rt.session() as s:
            for rid, st in list(self.streams.items()):
                outcome = fail_over(s, rid, self.node_id, st.token_ids if st.ids_known else None, count=st.count,
                                    text=st.text, reason="work channel lost", settings=self.rt.settings,
                                    logprobs=st.logprobs if st.auditable else None)
                if outcome:
                    moved.append((rid, st.count))
                if outcome.audit_id is not None:
                    audits.append(outcome.audit_id)
            node = s.get(Node, self.node_id, with_for_update=True) if self.node_id else None
            if node is not None and node.channel_id in (None, self.channel_id):
                node.channel_connected = False
                s.add(node)
        for rid, count in moved:
            self.rt.bus.publish_sync(f"req:{rid}", {"type": "failover", "node_id": self.node_id, "tokens": count})
        if moved:
            self.rt.kick_dispatch()
        for audit_id in audits:  # the sweep resends what cannot be sent now
            try:
                self.rt.dispatch_audit(audit_id)
            except Exception as exc:  # noqa: BLE001
                log.warning("audit %s not dispatched yet: %s", audit_id, exc)

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.send_json({"type": "refused", "reason": reason})
            await self.ws.close(code=code, reason=reason[:120])
        except Exception:  # the peer may be gone already
            pass

    # ------------------------------------------------------------------ downstream
    async def _send_assignment(self, frame: dict) -> None:
        if frame["request_id"] not in self.streams:
            self.streams[frame["request_id"]] = _Stream(frame["request_id"])
            async with self.send_lock:
                await self.ws.send_json(frame)

    async def _pump(self, sub) -> None:
        while True:
            msg = await sub.get()
            if msg.get("type") == "bus_restored":  # assignments published meanwhile were lost
                for frame in await run_in_threadpool(self._pending_assignments):
                    await self._send_assignment(frame)
            elif msg.get("type") == "superseded" and msg.get("channel_id") != self.channel_id:
                log.info("node %s opened a newer work channel; closing this one", self.node_id[:12])
                await self._close(4409, "superseded by a newer work channel of this node")
                return
            elif msg.get("type") == "notice":
                async with self.send_lock:
                    await self.ws.send_json(msg)
            elif msg.get("type") == "assign":
                await self._send_assignment(msg)
            elif msg.get("type") == "cancel" and msg.get("request_id") in self.streams:
                async with self.send_lock:
                    await self.ws.send_json(msg)
            elif msg.get("type") == "verify":
                async with self.send_lock:
                    await self.ws.send_json(msg)

    async def _ping_loop(self) -> None:
        """Measure the round trip to the node ourselves (a node's own claim could lie): at
        once, then every `rtt_probe_interval_s` (liveness comes from the node's beats)."""
        while True:
            async with self.send_lock:
                await self.ws.send_json({"type": "ping", "t": time.monotonic()})
            await asyncio.sleep(self.rt.settings.rtt_probe_interval_s)

    # ------------------------------------------------------------------ upstream
    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await self.ws.receive_json()
            except WebSocketDisconnect:
                return
            except ValueError:
                continue  # not JSON: ignore the frame
            kind = frame.get("type")
            try:
                if kind == "tokens":
                    await self._on_tokens(TokenChunk.model_validate(frame))
                # A frame that needs the database is handled off the read loop: the next
                # frame (another stream's tokens) never waits behind a receipt's transaction.
                # The stream leaves `streams` here, so a disconnect cannot fail it over twice.
                elif kind == "done":
                    done = Done.model_validate(frame)
                    st = self.streams.pop(done.request_id, None)
                    if st is not None and done.receipt.request_id == done.request_id:
                        self._background(self._on_done(done, st), kind)
                elif kind == "error":
                    err = WorkError.model_validate(frame)
                    st = self.streams.pop(err.request_id, None)
                    if st is not None:
                        self._background(self._on_error(err, st), kind)
                elif kind == "verify_result":
                    self._background(self._on_verify_result(VerifyResult.model_validate(frame)), kind)
                elif kind == "beat":  # liveness on the authenticated channel: noted, written in batches
                    self.rt.liveness.heard(self.node_id)
                    if "prefix_add" in frame or "prefix_drop" in frame:
                        self._prefix_report(frame)
                    if frame.get("ack", True):  # agents ask every few beats (older ones always)
                        async with self.send_lock:
                            await self.ws.send_text(f'{{"type":"beat_ack","t":{_number(frame.get("t"))}}}')
                elif kind == "pong" and isinstance(frame.get("t"), (int, float)):
                    rtt_ms = (time.monotonic() - frame["t"]) * 1000
                    if 0 <= rtt_ms < 60_000:
                        self.rt.liveness.heard(self.node_id, rtt_ms)
            except ValidationError as exc:
                log.warning("node %s sent a malformed %s frame: %s", self.node_id[:12], kind, exc)
            except Exception:  # one bad frame (or a database hiccup) must not drop the channel
                log.exception("node %s: handling a %s frame failed", self.node_id[:12], kind)

    def _prefix_report(self, frame: dict) -> None:
        """The node's word on which prefixes its cache still holds (node_agent/prefix_report.py):
        confirms or withdraws cache-affinity pairs (`PrefixMap.report`). Bounded and checked:
        a malformed report is ignored."""
        affinity = getattr(self.rt, "affinity", None)
        if affinity is None:
            return
        try:
            add = [bytes.fromhex(k) for k in frame.get("prefix_add", ())[:MAX_PREFIX_KEYS]]
            drop = [bytes.fromhex(k) for k in frame.get("prefix_drop", ())[:MAX_PREFIX_KEYS]]
        except (TypeError, ValueError):
            log.warning("node %s sent a malformed prefix report", self.node_id[:12])
            return
        affinity.report(self.node_id, add, drop, full=frame.get("prefix_full") is True)

    def _background(self, work, kind: str) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)

        def _done(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("node %s: handling a %s frame failed", self.node_id[:12], kind, exc_info=t.exception())

        task.add_done_callback(_done)

    async def _on_tokens(self, chunk: TokenChunk) -> None:
        st = self.streams.get(chunk.request_id)
        n = chunk.n
        if st is None or chunk.start != st.count:
            return  # not ours, or out of order: never relayed, never paid
        if chunk.token_ids is None:
            # Counted by the node's engine, not by ids: a token is at least one byte of text
            # (or the single end token), so a count beyond that is refused, never paid.
            st.text_bytes += len(chunk.text.encode("utf-8", "surrogatepass"))
            if st.count + n > st.text_bytes + 1:
                log.warning("node %s claimed %d tokens for %d bytes of text: chunk refused", self.node_id[:12],
                            st.count + n, st.text_bytes)
                return
        now = time.monotonic()
        if st.first_at is None:
            st.first_at = now
            self.rt.liveness.started(chunk.request_id)  # RUNNING, in the next batch (liveness.py)
        st.last_at = now
        st.commitment.update_chunk(chunk.token_ids, chunk.logprobs, chunk.text, n)
        st.count += n
        st.text += chunk.text
        if chunk.token_ids is not None and st.ids_known:
            st.token_ids.extend(chunk.token_ids)
            st.logprobs.extend(chunk.logprobs if chunk.logprobs is not None else [0] * n)
        else:
            st.ids_known = False
        if chunk.token_ids is None or chunk.logprobs is None:
            st.auditable = False  # no ids or no log-probs: nothing a verifier can check
        msg = {"type": "tokens", "node_id": self.node_id, "text": chunk.text, "start": chunk.start, "count": n,
               "token_ids": chunk.token_ids, "logprobs": chunk.logprobs}
        if chunk.top_logprobs is not None:  # asked for by the buyer (logprobs_format.py)
            msg["top_logprobs"] = [[alt.model_dump() for alt in alts] for alts in chunk.top_logprobs]
        try:
            await self.rt.bus.publish(f"req:{chunk.request_id}", msg)
        except BusUnavailable:
            # Relayed from the node but lost on the way: the node is paid for it, the buyer's
            # handler sees the gap (or the bus drop) and charges the buyer only what it got.
            if not st.lost:
                log.warning("request %s: relay bus down; tokens from %d on are lost", chunk.request_id, chunk.start)
            st.lost += n

    async def _on_done(self, done: Done, st: _Stream) -> None:
        rid = done.request_id
        relayed = Relayed(
            token_count=st.count, commitment=st.commitment.hex,
            seconds=(st.last_at - st.first_at) if st.first_at and st.last_at else 0.0,
            ttft_ms=(st.first_at - st.sent_at) * 1000 if st.first_at else None,
            concurrent_streams=len(self.streams) + 1,
        )
        try:
            accepted = await run_in_threadpool(retry_transient, lambda: self._accept(done, relayed, st))
        except (ReceiptRejected, APIError) as exc:
            message = exc.message if isinstance(exc, APIError) else str(exc)
            log.warning("receipt for %s rejected: %s", rid, message)
            if await run_in_threadpool(self._fail, rid, f"receipt rejected: {message}"):
                await self.rt.bus.publish(f"req:{rid}", {"type": "error", "status": 502, "code": "bad_receipt",
                                                         "message": "the node's receipt was rejected"})
            self.rt.kick_dispatch()
            return
        if accepted.fresh:
            # The buyer's handler learns the end and what its charge depends on; it writes the
            # last chunks and acknowledges what it delivered, which queues the settlement
            # (here instead, if the buyer's side has already acknowledged: it left earlier).
            if accepted.ready:
                await run_in_threadpool(self.rt.enqueue_settle, rid)
            try:
                await self.rt.bus.publish(f"req:{rid}", {
                    "type": "done", "node_id": self.node_id, "finish_reason": done.receipt.finish_reason,
                    "relayed": st.count, "quote": accepted.quote.to_dict()})
                self.rt.kick_dispatch()  # the node has a free slot again
            except BusUnavailable as exc:  # the buyer's handler has seen the bus drop and ended
                log.warning("request %s: receipt stored, but the relay is down: %s", rid, exc)
        if accepted.audit_id is not None:
            await run_in_threadpool(self.rt.dispatch_audit, accepted.audit_id)

    def _accept(self, done: Done, relayed: Relayed, st: _Stream):
        """Store the receipt and, in the same transaction, maybe pick the job for an audit
        (on the tokens the coordinator itself relayed)."""
        with writes_first(), self.rt.session() as s:  # the buyer's last chunks wait on it (db.writes_first)
            accepted = accept_receipt(s, done.receipt, self.node_id, relayed, self.rt.settings)
            if accepted.fresh:
                audit = maybe_select(s, s.get(InferenceRequest, done.request_id), s.get(Node, self.node_id),
                                     st.token_ids if st.auditable else [], st.logprobs, done.receipt.finish_reason,
                                     self.rt.settings, prompt_tokens=done.receipt.prompt_tokens, count_job=False)
                accepted.audit_id = audit.id if audit else None
        if accepted.fresh:  # committed: counted off this transaction, not on the node's hot row
            self.rt.job_counts.add(self.node_id, self.channel_id)
        return accepted

    async def _on_verify_result(self, result: VerifyResult) -> None:
        def _apply():
            with self.rt.session() as s:
                audit = apply_result(s, result, self.node_id, self.rt.settings)
                return None if audit is None else (audit.id, audit.status.value, audit.node_id)

        outcome = await run_in_threadpool(retry_transient, _apply)
        if outcome is not None:
            log.info("audit %s of node %s: %s", outcome[0], outcome[2][:12], outcome[1])

    def _fail(self, rid: str, reason: str) -> bool:
        with self.rt.session() as s:
            return fail_request(s, rid, reason, only_node=self.node_id)

    def _fail_over(self, rid: str, st: _Stream, reason: str):
        with self.rt.session() as s:
            return fail_over(s, rid, self.node_id, st.token_ids if st.ids_known else None, count=st.count,
                             text=st.text, reason=reason, settings=self.rt.settings,
                             logprobs=st.logprobs if st.auditable else None)

    async def _on_error(self, err: WorkError, st: _Stream) -> None:
        reason = f"{err.code}: {err.message}"
        if err.code in BUYER_ERRORS:  # the request itself is wrong: no other node would do better
            if await run_in_threadpool(self._fail, err.request_id, reason):
                await self.rt.bus.publish(f"req:{err.request_id}", {
                    "type": "error", "status": 400, "code": err.code, "message": err.message})
                self.rt.kick_dispatch()
            return
        # The node failed: the request continues on another node after what was delivered.
        outcome = await run_in_threadpool(self._fail_over, err.request_id, st, reason)
        log.warning("node %s failed request %s (%s): %s", self.node_id[:12], err.request_id, reason,
                    "failing over" if outcome.moved else "no further failover")
        if outcome.moved:
            await self.rt.bus.publish(f"req:{err.request_id}", {"type": "failover", "node_id": self.node_id,
                                                                 "tokens": st.count})
        elif outcome.failed or await run_in_threadpool(self._fail, err.request_id, reason):
            await self.rt.bus.publish(f"req:{err.request_id}", {
                "type": "error", "status": 502, "code": err.code, "message": err.message})
        if outcome.audit_id is not None:
            await run_in_threadpool(self.rt.dispatch_audit, outcome.audit_id)
        if outcome.excluded:
            await self.rt.bus.publish(f"node:{self.node_id}", {"type": "notice", "level": "error",
                                                               "message": outcome.excluded})
        self.rt.kick_dispatch()


def _number(x) -> str:
    """`x` as a JSON number (what the agent sent as its beat's time), else null."""
    return repr(float(x)) if isinstance(x, (int, float)) and not isinstance(x, bool) and x == x and abs(x) < 1e300 \
        else "null"
