"""The buyer's side of a request: admit, queue, then relay the node's tokens back.

Errors that happen before the first token (no route, node refused, timeouts) are returned
as proper HTTP errors even for streaming requests: the SSE response starts only once the
first token (or the end) has arrived. A buyer who disconnects mid-stream cancels the
request at the node, which then settles only the tokens delivered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import update
from starlette.concurrency import run_in_threadpool

from coordinator import metrics
from coordinator import openai_format as fmt
from coordinator.admission import admit, body_hash, find_keyed
from coordinator.bus import Subscription
from coordinator.errors import APIError, Conflict, NoCapacity, UpstreamFailed
from coordinator.models import Account, InferenceRequest, RequestStatus
from coordinator.runtime import Runtime
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.failover import fail_over
from coordinator.settlement import fail_request

log = logging.getLogger(__name__)


def _error_from(msg: dict) -> APIError:
    status = int(msg.get("status", 502))
    cls = NoCapacity if status == 503 else UpstreamFailed
    err = cls(msg.get("message", "the request failed"), code=msg.get("code"))
    err.status_code = status
    if status == 400:
        err.type = "invalid_request_error"
    return err


class RequestStream:
    """Events of one request from the bus, with the timeouts that apply to each phase.

    A node that sends no token within `token_timeout_s` is failed over: the request goes
    back to the queue and continues on another node after the tokens already relayed.
    Tokens from a node the request has left are dropped, so the buyer sees one stream.
    """

    MAX_FAILOVERS = 3

    def __init__(self, rt: Runtime, rid: str, sub: Subscription):
        self.rt, self.rid, self.sub = rt, rid, sub
        self.node_id: str | None = None
        self.segment_ids: list[int] = []
        self.failovers = 0

    @property
    def assigned(self) -> bool:
        return self.node_id is not None

    async def next(self) -> dict:
        s = self.rt.settings
        while True:
            timeout = s.token_timeout_s if self.assigned else s.assign_timeout_s
            try:
                msg = await self.sub.get(timeout=timeout)
            except asyncio.TimeoutError:
                if self.assigned and self.failovers < self.MAX_FAILOVERS:
                    await self._fail_over()
                    continue
                if await self._give_up():
                    phase = "a token" if self.assigned else "a node with free capacity"
                    raise NoCapacity(f"timed out waiting for {phase}; nothing was charged") from None
                continue
            kind = msg["type"]
            if kind == "assigned":
                self.node_id, self.segment_ids = msg["node_id"], []
                continue
            if kind == "failover":
                if msg.get("node_id") == self.node_id:
                    self.node_id, self.segment_ids = None, []
                    self.failovers += 1
                continue
            if kind == "tokens":
                if self.node_id is not None and msg.get("node_id") != self.node_id:
                    continue  # late tokens from a node this request has left
                self.segment_ids.extend(msg["token_ids"])
            return msg

    async def _fail_over(self) -> None:
        node_id, ids = self.node_id, list(self.segment_ids)

        def _do() -> bool:
            with self.rt.session() as s:
                return fail_over(s, self.rid, node_id, ids)

        if await run_in_threadpool(_do):
            log.warning("request %s: node %s stalled; failing over after %d tokens", self.rid,
                        node_id[:12], len(ids))
            await self.rt.bus.publish(f"node:{node_id}", {"type": "cancel", "request_id": self.rid})
            await self.rt.bus.publish(f"req:{self.rid}", {"type": "failover", "node_id": node_id})
            await run_in_threadpool(self.rt.trigger_dispatch)

    async def _give_up(self) -> bool:
        def _fail() -> bool:
            with self.rt.session() as s:
                return fail_request(s, self.rid, "timed out", status=RequestStatus.FAILED)

        failed = await run_in_threadpool(_fail)
        if failed and self.node_id:
            await self.rt.bus.publish(f"node:{self.node_id}", {"type": "cancel", "request_id": self.rid})
        return failed

    async def cancel(self) -> None:
        if self.node_id:
            await self.rt.bus.publish(f"node:{self.node_id}", {"type": "cancel", "request_id": self.rid})
        else:  # not yet assigned: end it here and release the hold
            def _cancel() -> bool:
                with self.rt.session() as s:
                    return fail_request(s, self.rid, "cancelled by the buyer", status=RequestStatus.CANCELLED)

            await run_in_threadpool(_cancel)


def _replay(prior: InferenceRequest, body, kind: str):
    """The first answer to a request sent again with the same Idempotency-Key."""
    if prior.payload.get("idempotency_hash") != body_hash(body, kind):
        raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_conflict")
    if not prior.status.finished:
        raise Conflict("the request with this Idempotency-Key is still in progress", code="idempotency_conflict")
    if prior.response is None:
        raise Conflict(f"the request with this Idempotency-Key ended {prior.status.value}"
                       f"{': ' + prior.error if prior.error else ''}; send a new key to retry",
                       code="idempotency_conflict")
    headers = {"X-Agora-Request-Id": prior.id, "X-Agora-Replay": "true"}
    if not body.stream:
        return JSONResponse(prior.response, headers=headers)
    whole = prior.response
    choice = whole["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]

    async def _one():
        yield fmt.sse(fmt.chunk(kind, prior.id, whole["model"], whole["created"], text=text, first=True))
        yield fmt.sse(fmt.chunk(kind, prior.id, whole["model"], whole["created"],
                                finish_reason=choice["finish_reason"]))
        if body.stream_options and body.stream_options.include_usage:
            yield fmt.sse(fmt.usage_chunk(kind, prior.id, whole["model"], whole["created"], whole["usage"]))
        yield fmt.sse("[DONE]")

    return StreamingResponse(_one(), media_type="text/event-stream", headers=headers)


async def handle(rt: Runtime, account: Account, body: ChatCompletionRequest | CompletionRequest, kind: str,
                 idempotency_key: str | None = None):
    def _admit():
        with rt.session() as s:
            if idempotency_key:
                prior = find_keyed(s, account, idempotency_key)
                if prior is not None:
                    return prior, True
            return admit(s, account, body, kind, rt.settings, idempotency_key).request, False

    started = time.monotonic()
    try:
        request, replayed = await run_in_threadpool(_admit)
    except APIError as exc:
        metrics.REQUESTS.labels(outcome=str(exc.status_code)).inc()
        raise
    if replayed:
        return _replay(request, body, kind)
    stream_keyed = idempotency_key is not None
    sub = rt.bus.subscribe(f"req:{request.id}")
    await sub.__aenter__()
    try:
        await run_in_threadpool(rt.trigger_dispatch)
        stream = RequestStream(rt, request.id, sub)
        first = await stream.next()
        if first["type"] == "error":
            raise _error_from(first)
    except BaseException as exc:
        await sub.__aexit__(None, None, None)
        metrics.REQUESTS.labels(outcome=str(getattr(exc, "status_code", "error"))).inc()
        raise
    metrics.TTFT.observe(time.monotonic() - started)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(stream, first, body.model, kind, include_usage, stream_keyed),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Agora-Request-Id": request.id})
    try:
        return await _collect(stream, first, body.model, kind, stream_keyed)
    finally:
        await sub.__aexit__(None, None, None)


async def _remember(rt: Runtime, rid: str, body: dict) -> None:
    """Keep the whole answer of a keyed request so that a replay can return it."""
    def _save():
        with rt.session() as s:
            s.exec(update(InferenceRequest).where(InferenceRequest.id == rid).values(response=body))

    await run_in_threadpool(_save)


async def _collect(stream: RequestStream, msg: dict, model: str, kind: str, keyed: bool) -> JSONResponse:
    parts: list[str] = []
    created = fmt.now()
    while msg["type"] == "tokens":
        parts.append(msg["text"])
        metrics.TOKENS.inc(len(msg["token_ids"]))
        msg = await stream.next()
    if msg["type"] == "error":
        metrics.REQUESTS.labels(outcome=str(msg.get("status", 502))).inc()
        raise _error_from(msg)
    metrics.REQUESTS.labels(outcome="200").inc()
    body = fmt.whole(kind, stream.rid, model, created, "".join(parts), msg["finish_reason"],
                     msg["usage"], msg.get("node_id"))
    if keyed:
        await _remember(stream.rt, stream.rid, body)
    return JSONResponse(body, headers={"X-Agora-Request-Id": stream.rid})


async def _sse(stream: RequestStream, msg: dict, model: str, kind: str, include_usage: bool,
               keyed: bool) -> AsyncIterator[bytes]:
    created = fmt.now()
    first = True
    finished = False
    parts: list[str] = []
    try:
        while msg["type"] == "tokens":
            parts.append(msg["text"])
            metrics.TOKENS.inc(len(msg["token_ids"]))
            if msg["text"] or first:
                yield fmt.sse(fmt.chunk(kind, stream.rid, model, created, text=msg["text"], first=first))
                first = False
            msg = await stream.next()
        finished = True
        metrics.REQUESTS.labels(outcome=str(msg.get("status", 502)) if msg["type"] == "error" else "200").inc()
        if msg["type"] == "error":
            yield fmt.sse({"error": _error_from(msg).body()["error"]})
        else:
            yield fmt.sse(fmt.chunk(kind, stream.rid, model, created, first=first,
                                    finish_reason=msg["finish_reason"]))
            if include_usage:
                yield fmt.sse(fmt.usage_chunk(kind, stream.rid, model, created, msg["usage"]))
            if keyed:
                await _remember(stream.rt, stream.rid, fmt.whole(
                    kind, stream.rid, model, created, "".join(parts), msg["finish_reason"], msg["usage"],
                    msg.get("node_id")))
        yield fmt.sse("[DONE]")
    except APIError as exc:
        finished = True
        yield fmt.sse({"error": exc.body()["error"]})
        yield fmt.sse("[DONE]")
    finally:
        if not finished:  # the buyer went away mid-stream
            await stream.cancel()
        await stream.sub.__aexit__(None, None, None)
