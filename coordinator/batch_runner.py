"""Runs batches' lines on the market's idle capacity, in the API process.

Each line is a real market request: `completions.handle` admits it (hold), places it,
relays its tokens and acknowledges its delivery; settlement and audits treat it like any
other request. What makes it a batch line:

- **Idle capacity only.** A pending line starts only when no request of its model is
  queued and a node within its price cap has more than `batch_reserve_slots` free slots;
  one API process has at most `batch_max_in_flight` lines in flight. So a batch never
  takes a node's last free slots from interactive buyers, and never queues ahead of them
  by more than `batch_max_in_flight` requests.
- **The batch discount** (`batch_discount_pct`, d) comes out of the price cap the line is
  routed under: only nodes whose output price is within (100 - d)% of the dearest routable
  offer of the model (or the cheapest offers where none is), sorted by price. The buyer pays
  those nodes' own prices; no seller is paid less than it asked and no money is created.
- **Restart safety.** A line's request carries the idempotency key
  `batch:<batch id>:<line>:<attempt>`. A runner resuming a line (after a restart, or when it
  takes over the lease of a batch whose runner died) looks that key up first: a request
  that answered is replayed (charged once), one still running is waited for, one that ended
  without an answer (it charged nothing: the buyer pays only what its handler wrote) is
  tried again under the next attempt. An answer whose delivery was never acknowledged (its
  process died) is settled `unacked` like any other: the buyer is charged nothing for it, and
  the output file's `usage.cost_nano_usd` says so. The claim on a batch is a lease in the database
  (`batches.lease_owner`, `lease_until`), so any API replica may resume it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Awaitable, Callable

from sqlalchemy import func, or_, update
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from coordinator import batches
from coordinator.admission import find_keyed
from coordinator.batch_input import ENDPOINTS, BatchInput, parse
from coordinator.dispatch_store import ACTIVE
from coordinator.errors import APIError
from coordinator.file_store import FileMissing, FileStore
from coordinator.models import Account, Batch, BatchLine, InferenceRequest, RequestStatus
from coordinator.models.account import utcnow
from coordinator.runtime import Runtime

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # market requests per line that ended without an answer before the line fails
TRANSIENT = {409, 429, 500, 502, 503, 504}  # the line waits and is tried again
BUSY_TICK_S, IDLE_TICK_S = 0.05, 1.0
RETRY_AFTER_S = 1.0


@dataclass
class Outcome:
    kind: str  # done | failed | again
    status_code: int | None = None
    body: dict[str, Any] | None = None
    request_id: str | None = None


def line_key(batch_id: str, idx: int, attempt: int) -> str:
    return f"batch:{batch_id}:{idx}:{attempt}"


def price_cap(prices: list[int], discount_pct: int) -> int:
    """The output price a batch line may be routed at: (100 - d)% of the dearest offer, but
    never below the cheapest (the cheapest sellers still serve batches)."""
    return max(min(prices), max(prices) * (100 - discount_pct) // 100)


async def run_line(rt: Runtime, account: Account, kind: str, body: dict, key: str, routing: dict) -> Outcome:
    """One line through the market, once: its earlier request under `key` if there is one."""
    from coordinator.completions import handle  # the interactive path, reused whole

    def _prior():
        with rt.read_session() as s:
            return find_keyed(s, account, key)

    prior = await run_in_threadpool(_prior)
    if prior is not None:
        if prior.response is not None and prior.status.finished:
            # Answered: replayed, never bought again; its usage says what settlement charged (nothing
            # when the process that had to acknowledge its delivery died first: the platform paid the node)
            body = {**prior.response, "usage": {**(prior.response.get("usage") or {}), "cost_nano_usd": prior.cost or 0}}
            return Outcome("done", 200, body, prior.id)
        return Outcome("again", 409, {"error": {"message": f"request {prior.id} {prior.status.value}",
                                                "code": "retrying"}}, prior.id)
    schema = dict(ENDPOINTS.values())[kind]
    try:
        req = schema.model_validate({**body, "stream": False, "routing": routing})
        resp = await handle(rt, account, req, kind, key)
    except APIError as exc:
        return Outcome("again" if exc.status_code in TRANSIENT else "failed", exc.status_code, exc.body())
    return Outcome("done", 200, json.loads(resp.body), resp.headers.get("x-agora-request-id"))


Executor = Callable[[Runtime, Account, str, dict, str, dict], Awaitable[Outcome]]


class BatchRunner:
    def __init__(self, rt: Runtime, store: FileStore, execute: Executor = run_line):
        self.rt, self.store, self.execute = rt, store, execute
        self.settings = rt.settings
        self.owner = rt.replica_id
        self.inflight: dict[tuple[str, int], asyncio.Task] = {}
        self.not_before: dict[tuple[str, int], float] = {}
        self.inputs: dict[str, BatchInput] = {}
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.inflight.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                busy = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup: the next tick tries again
                log.warning("batch runner tick failed", exc_info=True)
                busy = False
            await asyncio.sleep(BUSY_TICK_S if busy else IDLE_TICK_S)

    async def tick(self) -> bool:
        """One pass over the batches this process holds; True while it holds any."""
        owned = await run_in_threadpool(self._claim)
        for bid in owned:
            await self._advance(bid)
        return bool(owned)

    # ------------------------------------------------------------------ lease
    def _claim(self) -> list[str]:
        now = utcnow()
        lease = timedelta(seconds=self.settings.batch_lease_s)
        with self.rt.read_session() as s:  # a read first: an idle market never takes the write lock here
            rows = s.exec(select(Batch.id, Batch.lease_owner, Batch.lease_until).where(
                col(Batch.status).in_(batches.RUNNING))).all()
        mine = [bid for bid, owner, until in rows if owner == self.owner and until is not None and until > now]
        renew = [bid for bid, owner, until in rows if owner is None or until is None or until <= now
                 or (owner == self.owner and until <= now + lease / 2)]
        if renew:
            with self.rt.session() as s:
                taken = s.exec(update(Batch).where(
                    col(Batch.id).in_(renew), col(Batch.status).in_(batches.RUNNING),
                    or_(Batch.lease_owner == self.owner, col(Batch.lease_owner).is_(None), Batch.lease_until <= now))
                    .values(lease_owner=self.owner, lease_until=now + lease).returning(Batch.id)).all()
            mine = sorted(set(mine) | {t[0] for t in taken})
        return mine

    # ------------------------------------------------------------------ one batch
    def _load(self, bid: str) -> tuple[Batch, Account, list[BatchLine]]:
        with self.rt.read_session() as s:
            b = s.get(Batch, bid)
            acct = s.get(Account, b.account_id)
            lines = s.exec(select(BatchLine).where(BatchLine.batch_id == bid,
                                                   col(BatchLine.state).in_(("pending", "running")))
                           .order_by(BatchLine.idx).limit(self.settings.batch_max_in_flight * 4 + len(self.inflight))
                           ).all()
        return b, acct, lines

    async def _advance(self, bid: str) -> None:
        b, acct, lines = await run_in_threadpool(self._load, bid)
        if b.status == "validating":
            await run_in_threadpool(self._validate, bid)
            return
        if b.status == "in_progress" and b.expired_at is None and utcnow() >= b.expires_at:
            await run_in_threadpool(self._expire, bid)
            return
        here = {idx for (batch, idx) in self.inflight if batch == bid}
        if b.status == "finalizing" or (not lines and not here):
            await run_in_threadpool(self._finalize, bid)
            self.inputs.pop(bid, None)
            return
        now = time.monotonic()
        waiting = [ln for ln in lines if ln.idx not in here and self.not_before.get((bid, ln.idx), 0) <= now]
        room = self.settings.batch_max_in_flight - len(self.inflight)
        resumed = [ln for ln in waiting if ln.state == "running"]  # a request may exist: never gated
        fresh = [ln for ln in waiting if ln.state == "pending"] \
            if b.status == "in_progress" and b.expired_at is None else []
        if room <= 0 or not (resumed or fresh):
            return
        body_of = self._input(b)
        unverified = bool((body_of.lines[0][1].get("routing") or {}).get("allow_unverified"))
        cap = self._cap(b.model, unverified)
        if cap is None:
            return
        allowance = await run_in_threadpool(self._idle_slots, b.model, cap, unverified) if fresh else 0
        start = resumed[:room] + fresh[:max(0, min(room - len(resumed), allowance))]
        if not start:
            return
        fresh_idx = [ln.idx for ln in start if ln.state == "pending"]
        if fresh_idx:
            await run_in_threadpool(self._mark_running, bid, fresh_idx)
        routing_base = {"sort": "price"}
        for ln in start:
            body = body_of.lines[ln.idx][1]
            buyer_cap = (body.get("routing") or {}).get("max_price")
            routing = {**(body.get("routing") or {}), **routing_base,
                       "max_price": cap if buyer_cap is None else min(cap, buyer_cap)}
            key = (bid, ln.idx)
            self.inflight[key] = asyncio.create_task(
                self._run(b, acct, ln.idx, ln.attempt, body, routing), name=f"batch-line-{bid}-{ln.idx}")

    def _input(self, b: Batch) -> BatchInput:
        got = self.inputs.get(b.id)
        if got is None:
            got = self.inputs[b.id] = parse(self.store.get(b.input_file_id), self.settings.batch_max_lines)
        return got

    def _cap(self, model: str, unverified: bool = False) -> int | None:
        prices = [c.offer.price_out for c in self.rt.market.candidates(model, allow_unverified=unverified)]
        return price_cap(prices, self.settings.batch_discount_pct) if prices else None

    def _idle_slots(self, model: str, cap: int, unverified: bool = False) -> int:
        """Lines that may start now: none while a request of the model is queued, else the
        free slots beyond the reserve on each node within the cap."""
        nodes = {c.node.id: c.node.max_concurrency for c in self.rt.market.candidates(model, allow_unverified=unverified)
                 if c.offer.price_out <= cap}
        if not nodes:
            return 0
        with self.rt.read_session() as s:
            queued = s.exec(select(func.count()).select_from(InferenceRequest).where(
                InferenceRequest.model == model, InferenceRequest.status == RequestStatus.QUEUED)).one()
            if queued:
                return 0
            busy = dict(s.exec(select(InferenceRequest.node_id, func.count()).where(
                col(InferenceRequest.node_id).in_(list(nodes)), col(InferenceRequest.status).in_(ACTIVE))
                .group_by(InferenceRequest.node_id)).all())
        reserve = self.settings.batch_reserve_slots
        return sum(max(0, cap_ - busy.get(nid, 0) - reserve) for nid, cap_ in nodes.items())

    async def _run(self, b: Batch, acct: Account, idx: int, attempt: int, body: dict, routing: dict) -> None:
        kind = ENDPOINTS[b.endpoint][0]
        try:
            outcome = await self.execute(self.rt, acct, kind, body, line_key(b.id, idx, attempt), routing)
            await run_in_threadpool(self._record, b.id, acct, idx, attempt, outcome)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the line stays running: the next pass resumes it by its key
            log.warning("batch %s line %d failed to run", b.id, idx, exc_info=True)
            self.not_before[(b.id, idx)] = time.monotonic() + RETRY_AFTER_S
        finally:
            self.inflight.pop((b.id, idx), None)

    # ------------------------------------------------------------------ writes
    def _validate(self, bid: str) -> None:
        with self.rt.session() as s:
            b = s.get(Batch, bid, with_for_update=True)
            if b.status != "validating":
                return
            try:
                got = parse(self.store.get(b.input_file_id), self.settings.batch_max_lines)
            except FileMissing:
                got = BatchInput()
                got.error(1, "the input file's content is gone", code="file_missing")
            if not got.errors and got.url != b.endpoint:
                got.error(1, f"the file's requests go to {got.url}, not the batch's endpoint {b.endpoint}",
                          code="mismatched_endpoint", param="endpoint")
            now = utcnow()
            if got.errors:
                b.status, b.failed_at, b.errors = "failed", now, got.errors
                b.lease_owner = b.lease_until = None
                return
            s.add_all([BatchLine(batch_id=bid, idx=i, custom_id=cid) for i, (cid, _) in enumerate(got.lines)])
            b.status, b.in_progress_at, b.model, b.total = "in_progress", now, got.model, len(got.lines)
            self.inputs[bid] = got

    def _expire(self, bid: str) -> None:
        with self.rt.session() as s:
            b = s.get(Batch, bid, with_for_update=True)
            if b.status != "in_progress" or b.expired_at is not None:
                return
            b.expired_at = utcnow()  # lines in flight finish first; then it ends `expired`
            batches.end_pending(s, b, "batch_expired", "the batch's completion window ran out before this "
                                "request started")

    def _mark_running(self, bid: str, idxs: list[int]) -> None:
        with self.rt.session() as s:
            s.exec(update(BatchLine).where(BatchLine.batch_id == bid, col(BatchLine.idx).in_(idxs),
                                           BatchLine.state == "pending").values(state="running"))

    def _record(self, bid: str, acct: Account, idx: int, attempt: int, o: Outcome) -> None:
        with self.rt.session() as s:
            b = s.get(Batch, bid, with_for_update=True)
            ln = s.get(BatchLine, (bid, idx), with_for_update=True)
            if ln is None or ln.state not in ("running", "pending") or ln.attempt != attempt:
                return  # recorded already (a replay of a line another runner finished)
            if o.kind == "again":
                self.not_before[(bid, idx)] = time.monotonic() + RETRY_AFTER_S
                prior = find_keyed(s, acct, line_key(bid, idx, attempt))
                if prior is not None and (not prior.status.finished or prior.response is not None):
                    # still on the market, or answered since run_line looked (an answer stored by a
                    # process that died, settled meanwhile): the next pass waits or replays it;
                    # never a new attempt for a line that has an answer
                    return
                ln.result, ln.status_code = o.body, o.status_code
                if prior is not None:
                    ln.attempt += 1  # that request ended unanswered and uncharged: a new one
                if ln.attempt < MAX_ATTEMPTS and b.status == "in_progress" and b.expired_at is None:
                    ln.state = "pending"  # waits for idle capacity again
                    s.add(ln)
                    return
                o = Outcome("failed", o.status_code, o.body, o.request_id)  # out of attempts, or cancelled/expired
            ln.state = "done" if o.kind == "done" else "failed"
            ln.status_code, ln.result, ln.request_id, ln.finished_at = o.status_code, o.body, o.request_id, utcnow()
            if o.kind == "done":
                b.completed += 1
            else:
                b.failed += 1
            s.add_all([ln, b])

    def _finalize(self, bid: str) -> None:
        with self.rt.session() as s:
            b = s.get(Batch, bid, with_for_update=True)
            if b.status not in ("in_progress", "finalizing", "cancelling"):
                return
            left = s.exec(select(func.count()).select_from(BatchLine).where(
                BatchLine.batch_id == bid, col(BatchLine.state).in_(("pending", "running")))).one()
            if left:
                return
            # Each answered line's usage must say what settlement charged: wait until every
            # line's request is settled (a live answer is recorded before its delivery is
            # acknowledged; if that process died first, it settles `unacked`, charged nothing).
            rids = [r for r in s.exec(select(BatchLine.request_id).where(
                BatchLine.batch_id == bid, BatchLine.state == "done")).all() if r]
            costs: dict[str, int] = {}
            for i in range(0, len(rids), 500):
                for rid, status, cost in s.exec(select(InferenceRequest.id, InferenceRequest.status,
                                                       InferenceRequest.cost).where(
                        col(InferenceRequest.id).in_(rids[i:i + 500]))).all():
                    if not status.finished:
                        return  # the next pass finalizes once it is settled
                    costs[rid] = cost or 0
            if b.status == "in_progress":
                b.status, b.finalizing_at = "finalizing", utcnow()
            batches.finalize(s, self.store, b, costs)
