"""The buyer's side of a request: admit, queue, then relay the node's tokens back.

Errors that happen before the first token (no route, node refused, timeouts) are returned
as proper HTTP errors even for streaming requests: the SSE response starts only once the
first token (or the end) has arrived. The handler counts the tokens it actually writes
to the buyer and acknowledges that count when the buyer's side ends (`delivery.py`):
settlement charges exactly that, and the `usage` it reports is the same number. A buyer
who disconnects mid-stream cancels the request at the node.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import Future
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import update
from starlette.concurrency import run_in_threadpool

from coordinator import metrics, response_cache
from coordinator import openai_format as fmt
from coordinator.affinity import prefix_chain
from coordinator.admission import body_hash, find_keyed, new_request_id
from coordinator.bus import BusUnavailable, Subscription
from coordinator.choices import collect_many, error_from as _error_from, gather_one, sse_many, usage_of as _usage
from coordinator.delivery import Delivery
from coordinator.endings import Ending, acknowledged
from coordinator.errors import APIError, BadRequest, Conflict, NoCapacity, RelayInterrupted, Unavailable
from coordinator.models import Account, InferenceRequest, RequestStatus
from coordinator.runtime import Runtime
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.failover import fail_over
from coordinator.frames import assignment_frame
from coordinator.logprobs_format import LogprobsBuilder, builder_for
from coordinator.intake import admit_and_place
from coordinator.settlement import fail_request
from coordinator.unsupported import refuse_unsupported

log = logging.getLogger(__name__)


class RequestStream:
    """Events of one request from the bus, with the timeouts that apply to each phase.

    A node that sends no first token within `first_token_timeout_s`, or no next token within
    `token_timeout_s`, is failed over: the request goes back to the queue and continues on
    another node after the tokens already relayed.
    Tokens from a node the request has left are dropped, so the buyer sees one stream.

    Every token chunk carries its offset in its node's stream; the stream checks them, and
    the count the node's `done` (and a failover) says was relayed, against what arrived. A
    gap, or the relay bus dropping, raises `RelayInterrupted`: the buyer gets a clean error
    at once instead of a stream with a hole, and pays only for what it was written.
    """

    MAX_FAILOVERS = 3

    def __init__(self, rt: Runtime, rid: str, sub: Subscription):
        self.rt, self.rid, self.sub = rt, rid, sub
        self.node_id: str | None = None
        self.left: set[str] = set()  # nodes this request failed over from
        self.failovers = 0
        self.prompt: tuple[str, dict] | None = None  # (model, payload): recorded for cache affinity
        self.keep: response_cache.Keep | None = None  # where the response cache keeps the answer
        self._new_segment()

    def _new_segment(self) -> None:
        """What arrived from the current node: a count, the ids (None once a chunk came
        without them) and the text."""
        self.segment_count = 0
        self.segment_ids: list[int] | None = []
        self.segment_logprobs: list[int] | None = []  # None once a chunk came without them
        self.segment_text = ""

    @property
    def assigned(self) -> bool:
        return self.node_id is not None

    def _broken(self, why: str) -> RelayInterrupted:
        log.warning("request %s: relay interrupted (%s)", self.rid, why)
        return RelayInterrupted(f"the stream was interrupted inside the market ({why}); you are charged only "
                                "for the tokens you received; retry the request")

    async def next(self) -> dict:
        s = self.rt.settings
        while True:
            if not self.assigned:
                timeout = s.assign_timeout_s
            else:  # a long prompt's prefill is not a stall: the first token has its own limit
                timeout = s.token_timeout_s if self.segment_count else s.first_token_timeout_s
            try:
                msg = await self.sub.get(timeout=timeout)
            except asyncio.TimeoutError:
                if self.assigned and self.failovers < self.MAX_FAILOVERS:
                    await self._fail_over(timeout)
                    continue
                if await self._give_up():
                    phase = "a token" if self.assigned else "a node with free capacity"
                    raise NoCapacity(f"timed out waiting for {phase}; nothing was charged") from None
                continue
            kind = msg["type"]
            if kind == "bus_lost":
                raise self._broken("relay connection lost")
            if kind == "bus_restored":
                continue
            if kind == "assigned":
                if self.node_id is not None and self.node_id == msg["node_id"]:
                    continue  # its first tokens overtook the assignment (two publishers): keep them
                self.node_id = msg["node_id"]
                self._new_segment()
                self.left.discard(self.node_id)
                continue
            if kind == "failover":
                if msg.get("node_id") == self.node_id:
                    if msg.get("tokens", self.segment_count) != self.segment_count:
                        raise self._broken(f"{msg['tokens'] - self.segment_count} tokens lost before a failover")
                    self.left.add(self.node_id)
                    self.node_id = None
                    self._new_segment()
                    self.failovers += 1
                continue
            if kind in ("tokens", "done") and (msg.get("node_id") in self.left or (
                    self.node_id is not None and msg.get("node_id") != self.node_id)):
                continue  # late tokens (or a receipt) from a node this request has left
            if kind == "tokens":
                self.node_id = msg.get("node_id", self.node_id)
                start = msg.get("start", self.segment_count)
                if start < self.segment_count:
                    continue  # a duplicate
                if start > self.segment_count:
                    raise self._broken(f"tokens {self.segment_count}..{start - 1} never arrived")
                self.segment_count += msg["count"]
                self.segment_text += msg["text"]
                if msg.get("token_ids") is None or self.segment_ids is None:
                    self.segment_ids = None
                else:
                    self.segment_ids.extend(msg["token_ids"])
                if msg.get("logprobs") is None or self.segment_logprobs is None:
                    self.segment_logprobs = None
                else:
                    self.segment_logprobs.extend(msg["logprobs"])
            elif kind == "done" and msg.get("relayed", self.segment_count) != self.segment_count:
                raise self._broken(f"{msg['relayed'] - self.segment_count} final tokens never arrived")
            return msg

    async def _fail_over(self, timeout_s: float) -> None:
        node_id, count, text = self.node_id, self.segment_count, self.segment_text
        ids = None if self.segment_ids is None else list(self.segment_ids)
        lps = None if self.segment_logprobs is None else list(self.segment_logprobs)

        def _do():
            with self.rt.session() as s:
                return fail_over(s, self.rid, node_id, ids, count=count, text=text, logprobs=lps,
                                 reason=f"no token for {timeout_s:.0f}s", settings=self.rt.settings)

        outcome = await run_in_threadpool(_do)
        if outcome.audit_id is not None:  # the stalled node's part of the stream is audited too
            await run_in_threadpool(self.rt.dispatch_audit, outcome.audit_id)
        if outcome:
            log.warning("request %s: node %s stalled; failing over after %d tokens", self.rid, node_id[:12], count)
            await self.rt.bus.publish(f"node:{node_id}", {"type": "cancel", "request_id": self.rid})
            await self.rt.bus.publish(f"req:{self.rid}", {"type": "failover", "node_id": node_id, "tokens": count})
            await run_in_threadpool(self.rt.kick_dispatch)

    async def _give_up(self) -> bool:
        def _fail() -> bool:
            with self.rt.session() as s:
                return fail_request(s, self.rid, "timed out", status=RequestStatus.FAILED)

        failed = await run_in_threadpool(_fail)
        if failed and self.node_id:
            await self.rt.bus.publish(f"node:{self.node_id}", {"type": "cancel", "request_id": self.rid})
        return failed

    def finish(self, written: int, delivery: Delivery | None) -> Future:
        """The buyer's side is over: say what it was written (settlement charges that, see
        `delivery.py`); `delivery` None means the buyer left. Work not yet assigned is
        cancelled and its hold released; work a node is doing is acknowledged, and cancelled
        at the node unless it completed. Written in a worker thread together with the other
        requests that end meanwhile (`endings.py`), not awaited, so it completes even while
        the handler's task is being cancelled; the future returned resolves once written
        (`acknowledged`)."""
        done = self.rt.endings.add(Ending(self.rid, written, delivery), loop=asyncio.get_running_loop())
        affinity = getattr(self.rt, "affinity", None)
        if affinity is not None and delivery is Delivery.COMPLETE and self.node_id and self.prompt:
            # the node has this prompt's prefixes in its KV cache now (affinity.py): a dict update
            affinity.record(prefix_chain(*self.prompt), self.node_id)
        return done


def _cancel_unsent(rt: Runtime, rid: str) -> None:
    with rt.session() as s:
        fail_request(s, rid, "the market could not pass the request on", status=RequestStatus.CANCELLED)


def _replay(prior: InferenceRequest, body, kind: str):
    """The first answer to a request sent again with the same Idempotency-Key."""
    if prior.payload.get("idempotency_hash") != body_hash(body, kind):
        raise Conflict("this Idempotency-Key was used with a different request", code="idempotency_conflict")
    if prior.response is None and not prior.status.finished:
        raise Conflict("the request with this Idempotency-Key is still in progress", code="idempotency_conflict")
    if prior.response is None:
        raise Conflict(f"the request with this Idempotency-Key ended {prior.status.value}"
                       f"{': ' + prior.error if prior.error else ''}; send a new key to retry",
                       code="idempotency_conflict")
    return _answer(prior.response, body, kind, {"X-Agora-Request-Id": prior.id, "X-Agora-Replay": "true"})


def _answer(whole: dict, body, kind: str, headers: dict):
    """A whole answer known in advance (a replay, a cache hit), whole or as one SSE stream."""
    if not body.stream:
        return JSONResponse(whole, headers=headers)

    async def _one():
        for choice in whole["choices"]:  # n > 1: each choice in turn, with its index
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            i = choice.get("index", 0)
            yield fmt.sse(fmt.chunk(kind, whole["id"], whole["model"], whole["created"], text=text, first=True,
                                    logprobs=choice.get("logprobs"), index=i))
            yield fmt.sse(fmt.chunk(kind, whole["id"], whole["model"], whole["created"],
                                    finish_reason=choice["finish_reason"], index=i))
        if body.stream_options and body.stream_options.include_usage:
            yield fmt.sse(fmt.usage_chunk(kind, whole["id"], whole["model"], whole["created"], whole["usage"]))
        yield fmt.sse("[DONE]")

    return StreamingResponse(_one(), media_type="text/event-stream", headers=headers)


async def handle(rt: Runtime, account: Account, body: ChatCompletionRequest | CompletionRequest, kind: str,
                 idempotency_key: str | None = None, cache: str | None = None):
    started = time.monotonic()
    refuse_unsupported(body)  # parameters no node here honours: a 400 naming them (unsupported.py)
    if idempotency_key:
        def _find():
            with rt.read_session() as s:
                return find_keyed(s, account, idempotency_key)

        prior = await run_in_threadpool(_find)
        if prior is not None:
            return _replay(prior, body, kind)
    hit, keep = await response_cache.consult(rt, account, body, kind, cache, idempotency_key, started)
    if hit is not None:  # served without a node (response_cache.py)
        return _answer(hit.body, body, kind, hit.headers)
    # Rate limits first: refusing costs a Redis round trip (in memory: nothing), nothing more.
    # Each of the n choices is its own request on the market (choices.py).
    n = body.n
    if n > rt.settings.max_choices:
        raise BadRequest(f"n={n} is more choices than this market serves per request ({rt.settings.max_choices})",
                         param="n")
    rids = [new_request_id() for _ in range(n)]
    weight = body.prompt_bytes() + (body.requested_max_tokens() or rt.settings.default_max_tokens)
    for k, rid in enumerate(rids):
        limits = (account.id, weight, rid)
        if not (rt.limiter.admit(*limits) if rt.limiter.in_memory else await run_in_threadpool(rt.limiter.admit, *limits)):
            for earlier in rids[:k]:
                await run_in_threadpool(rt.limiter.release, account.id, earlier)
            metrics.REQUESTS.labels(outcome="429").inc()
            raise rt.limiter.concurrency_refusal()
    # Listen before the request exists: nothing published for it can be missed, and a
    # relay that is down refuses the request before any money is held.
    subs: list[Subscription] = []
    try:
        for rid in rids:
            sub = rt.bus.subscribe(f"req:{rid}")
            await sub.__aenter__()
            sub.on_close = functools.partial(rt.limiter.release, account.id, rid)  # the concurrency slot
            subs.append(sub)
    except BusUnavailable as exc:
        for sub in subs:
            sub.close()
        for rid in rids[len(subs):]:
            await run_in_threadpool(rt.limiter.release, account.id, rid)
        metrics.REQUESTS.labels(outcome="503").inc()
        raise Unavailable("the market's relay is reconnecting; retry shortly") from exc

    streams: list[RequestStream] = []
    current = 0  # the choice whose first message is awaited
    try:
        requests, replayed, placed = await run_in_threadpool(admit_and_place, rt, account, body, kind, rids,
                                                              idempotency_key)
        if replayed:
            for sub in subs:
                sub.close()
            return _replay(requests[0], body, kind)
        for request, sub in zip(requests, subs):
            stream = RequestStream(rt, request.id, sub)
            stream.prompt = (request.model, request.payload)
            streams.append(stream)
        if n == 1:
            streams[0].keep = keep
        try:
            for request, node in zip(requests, placed):
                if node:
                    metrics.observe_queue_wait(request.created_at, request.assigned_at, inline=True)
                    await rt.bus.publish(f"node:{node}", assignment_frame(request))
                    await rt.bus.publish(f"req:{request.id}", {"type": "assigned", "node_id": node})
            if not all(placed):  # others wait, or no node is free: the Celery micro-batch routes the queue in order
                await run_in_threadpool(rt.trigger_dispatch)
        except BusUnavailable as exc:
            for request in requests:  # never reached a node: release the holds now
                await run_in_threadpool(_cancel_unsent, rt, request.id)
            streams = []
            raise Unavailable("the market cannot dispatch work right now; nothing was charged; retry shortly") from exc
        firsts = []
        for current, stream in enumerate(streams):
            first = await stream.next()
            if first["type"] == "error":
                raise _error_from(first)
            firsts.append(first)
    except BaseException as exc:
        for k, stream in enumerate(streams):
            if k != current:  # the others are cancelled: nothing was written to the buyer
                stream.finish(0, None)
            elif isinstance(exc, RelayInterrupted):
                stream.finish(0, Delivery.RELAY_BROKEN)
            elif not isinstance(exc, APIError):
                stream.finish(0, None)
        for sub in subs:
            sub.close()
        metrics.REQUESTS.labels(outcome=str(getattr(exc, "status_code", "error"))).inc()
        raise
    metrics.TTFT.observe(time.monotonic() - started)
    stream_keyed = idempotency_key is not None
    builders = [builder_for(body, kind) for _ in streams]
    headers = {"X-Agora-Request-Id": requests[0].id}
    if n > 1:
        headers["X-Agora-Choice-Request-Ids"] = ",".join(r.id for r in requests)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _sse(streams[0], firsts[0], body.model, kind, include_usage, stream_keyed, builders[0]) if n == 1 else \
            sse_many(streams, firsts, body.model, kind, include_usage, builders,
                     functools.partial(_remember, rt, requests[0].id) if stream_keyed else None)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
    try:
        if n == 1:
            return await _collect(streams[0], firsts[0], body.model, kind, stream_keyed, builders[0])
        whole, _ = await collect_many(streams, firsts, body.model, kind, builders)
        metrics.REQUESTS.labels(outcome="200").inc()
        if stream_keyed:
            await _remember(rt, requests[0].id, whole)
        return JSONResponse(whole, headers=headers)
    finally:
        for sub in subs:
            sub.close()


async def _remember(rt: Runtime, rid: str, body: dict) -> None:
    """Keep the whole answer of a keyed request so that a replay can return it."""
    def _save():
        with rt.session() as s:
            s.exec(update(InferenceRequest).where(InferenceRequest.id == rid).values(response=body))

    await run_in_threadpool(_save)


async def _keep(stream: RequestStream, body: dict, keyed: bool) -> None:
    """A completed answer: for replays of its Idempotency-Key, and for the response cache."""
    keep = getattr(stream, "keep", None)
    if keep is not None:
        await response_cache.fill(stream.rt, keep, body)
    if keyed:
        await _remember(stream.rt, stream.rid, body)


async def _collect(stream: RequestStream, msg: dict, model: str, kind: str, keyed: bool,
                   lp: LogprobsBuilder | None = None) -> JSONResponse:
    created = fmt.now()
    try:
        text, count, msg = await gather_one(stream, msg, lp)  # on failure it has finished the stream
    except APIError as exc:
        metrics.REQUESTS.labels(outcome=str(exc.status_code)).inc()
        raise
    metrics.REQUESTS.labels(outcome="200").inc()
    body = fmt.whole(kind, stream.rid, model, created, text, msg["finish_reason"],
                     _usage(msg, count), msg.get("node_id"), lp.whole() if lp is not None else None)
    await _keep(stream, body, keyed)
    await acknowledged(stream.finish(count, Delivery.COMPLETE))  # the body states its cost: charged so first
    return JSONResponse(body, headers={"X-Agora-Request-Id": stream.rid})


async def _sse(stream: RequestStream, msg: dict, model: str, kind: str, include_usage: bool,
               keyed: bool, lp: LogprobsBuilder | None = None) -> AsyncIterator[bytes]:
    """The SSE body. `written` counts the tokens whose chunk the server has handed to the
    buyer's connection (a chunk counts once the response resumes this generator after
    it); that, and nothing the node sent beyond it, is what the buyer pays for."""
    created = fmt.now()
    first = True
    ended = False  # the buyer's side ended as it should (answer, error or interruption)
    written = pending = 0
    parts: list[str] = []
    last = None
    try:
        while msg["type"] == "tokens":
            parts.append(msg["text"])
            pending += msg["count"]
            metrics.TOKENS.inc(msg["count"])
            last = metrics.observe_gap(last, msg["count"])
            part = lp.part(msg) if lp is not None else None
            if msg["text"] or first or part:
                yield fmt.sse(fmt.chunk(kind, stream.rid, model, created, text=msg["text"], first=first, logprobs=part))
                first = False
                written, pending = written + pending, 0
            msg = await stream.next()
        metrics.REQUESTS.labels(outcome=str(msg.get("status", 502)) if msg["type"] == "error" else "200").inc()
        if msg["type"] == "error":  # the request failed unpaid
            ended = True
            yield fmt.sse({"error": _error_from(msg).body()["error"]})
        else:
            yield fmt.sse(fmt.chunk(kind, stream.rid, model, created, first=first,
                                    finish_reason=msg["finish_reason"]))
            written, pending = written + pending, 0
            ended = True
            done = stream.finish(written, Delivery.COMPLETE)
            if include_usage:
                await acknowledged(done)
                yield fmt.sse(fmt.usage_chunk(kind, stream.rid, model, created, _usage(msg, written)))
            if keyed or getattr(stream, "keep", None):
                await _keep(stream, fmt.whole(
                    kind, stream.rid, model, created, "".join(parts), msg["finish_reason"], _usage(msg, written),
                    msg.get("node_id"), lp.whole() if lp is not None else None), keyed)
        yield fmt.sse("[DONE]")
    except RelayInterrupted as exc:
        ended = True
        stream.finish(written, Delivery.RELAY_BROKEN)
        metrics.REQUESTS.labels(outcome="503").inc()
        yield fmt.sse({"error": exc.body()["error"]})
        yield fmt.sse("[DONE]")
    except APIError as exc:  # timed out: failed unpaid
        ended = True
        yield fmt.sse({"error": exc.body()["error"]})
        yield fmt.sse("[DONE]")
    finally:
        if not ended:  # the buyer went away mid-stream
            stream.finish(written, None)
        stream.sub.close()
