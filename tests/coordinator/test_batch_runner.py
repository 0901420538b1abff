"""The batch runner: lines run through the market's request path under deterministic
idempotency keys, so a runner that dies mid-batch and another that takes over its lease
lose no line and charge none twice; cancel and idle-capacity gating. The market request
itself is `completions.handle` replaced by a fake that records one charged request per call
(the real path is covered end to end in tests/e2e/test_batch_e2e.py)."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from sqlmodel import select

from coordinator import completions
from coordinator.app import create_app
from coordinator.batch_runner import BatchRunner, line_key, price_cap
from coordinator.db import create_all, make_engine
from coordinator.file_store import make_file_store
from coordinator.models import Batch, BatchLine, InferenceRequest, RequestStatus
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from tests.coordinator.test_audits import _node
from tests.coordinator.test_batch_api import _client, _key, _line, _upload


class FakeMarket:
    """`completions.handle` stand-in: each call is one charged request (a row with its key);
    lines in `hang` never answer (the process dies mid-request); in `answer_then_hang` the
    answer is stored but the runner never hears of it."""

    def __init__(self, rt, hang=(), answer_then_hang=()):
        self.rt, self.hang, self.answer_then_hang, self.calls = rt, set(hang), set(answer_then_hang), []

    async def __call__(self, rt, account, body, kind, key):
        idx = int(key.split(":")[2])
        self.calls.append(key)
        rid = f"req_{len(self.calls):04d}_{idx}"
        answer = {"id": rid, "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": f"answer {idx}"}, "finish_reason": "stop"}], "usage": {}}
        done = idx not in self.hang
        with rt.session() as s:
            s.add(InferenceRequest(id=rid, account_id=account.id, model=body.model, kind=kind, idempotency_key=key,
                                   prompt_tokens_est=1, max_tokens=4, cost=7 if done else None,
                                   status=RequestStatus.COMPLETED if done else RequestStatus.RUNNING,
                                   response=answer if done else None))
        if idx in self.hang or idx in self.answer_then_hang:
            await asyncio.Event().wait()
        return JSONResponse(answer, headers={"X-Agora-Request-Id": rid})


@pytest.fixture
def market(settings, runtime, monkeypatch):
    settings.batch_runner = False  # the tests drive runners themselves
    settings.batch_lease_s = 0.3
    settings.batch_reserve_slots = 0
    _node(runtime, "seller")  # max_concurrency 4
    with TestClient(create_app(runtime=runtime)) as c:
        yield c


def _batch(client, runtime, n: int) -> str:
    oc = _client(client, _key(runtime))
    f = _upload(oc, [_line(i) for i in range(n)])
    return oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id


def _drive(runner: BatchRunner, until, ticks: int = 400):
    async def main():
        for _ in range(ticks):
            await runner.tick()
            await asyncio.sleep(0.01)
            if until():
                break
        await runner.stop()

    asyncio.run(main())


def _status(runtime, bid) -> Batch:
    with runtime.session() as s:
        return s.get(Batch, bid)


def _charged(runtime) -> dict[int, int]:
    """Charged requests per line index."""
    with runtime.session() as s:
        rows = s.exec(select(InferenceRequest.idempotency_key).where(InferenceRequest.cost == 7)).all()
    out: dict[int, int] = {}
    for key in rows:
        out[int(key.split(":")[2])] = out.get(int(key.split(":")[2]), 0) + 1
    return out


def test_a_batch_runs_every_line_once_and_writes_openai_output(market, runtime, monkeypatch):
    fake = FakeMarket(runtime)
    monkeypatch.setattr(completions, "handle", fake)
    bid = _batch(market, runtime, 6)
    runner = BatchRunner(runtime, make_file_store(runtime.settings))
    _drive(runner, lambda: _status(runtime, bid).status == "completed")
    b = _status(runtime, bid)
    assert b.status == "completed" and (b.total, b.completed, b.failed) == (6, 6, 0)
    assert b.in_progress_at and b.finalizing_at and b.completed_at and b.error_file_id is None
    assert _charged(runtime) == {i: 1 for i in range(6)}
    with pytest.raises(openai.NotFoundError):  # another account: not its file
        _client(market, _key(runtime)).files.content(b.output_file_id)
    out = [json.loads(x) for x in make_file_store(runtime.settings).get(b.output_file_id).decode().splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(6)]
    assert all(o["response"]["status_code"] == 200 and o["error"] is None for o in out)
    assert out[2]["response"]["body"]["choices"][0]["message"]["content"] == "answer 2"


def test_a_runner_that_dies_mid_batch_is_replaced_and_no_line_is_lost_or_charged_twice(market, runtime,
                                                                                        monkeypatch):
    settings = runtime.settings
    settings.batch_max_in_flight = 3
    first = FakeMarket(runtime, hang={1}, answer_then_hang={2})
    monkeypatch.setattr(completions, "handle", first)
    bid = _batch(market, runtime, 8)
    dead = BatchRunner(runtime, make_file_store(settings))
    dead.owner = "replica-dead"

    def stuck():  # line 0 and others done; lines 1 and 2 in flight forever
        with runtime.session() as s:
            lines = s.exec(select(BatchLine).where(BatchLine.batch_id == bid)).all()
        return sum(ln.state == "done" for ln in lines) >= 5
    _drive(dead, stuck)  # then the process "dies": its tasks are gone, its lease runs out
    assert _status(runtime, bid).status == "in_progress"
    with runtime.session() as s:  # the sweep ends the dead replica's unanswered request (charged nothing)
        r = s.exec(select(InferenceRequest).where(InferenceRequest.idempotency_key == line_key(bid, 1, 0))).one()
        r.status = RequestStatus.FAILED
    second = FakeMarket(runtime)
    monkeypatch.setattr(completions, "handle", second)
    _drive(BatchRunner(runtime, make_file_store(settings)), lambda: _status(runtime, bid).status == "completed")
    b = _status(runtime, bid)
    assert (b.status, b.completed, b.failed) == ("completed", 8, 0)
    assert _charged(runtime) == {i: 1 for i in range(8)}  # every line exactly once
    assert line_key(bid, 2, 0) not in second.calls  # its answer was stored: replayed, not bought again
    assert line_key(bid, 1, 1) in second.calls  # its first request ended unanswered: a second attempt
    with runtime.session() as s:
        lines = s.exec(select(BatchLine).where(BatchLine.batch_id == bid).order_by(BatchLine.idx)).all()
    assert [ln.state for ln in lines] == ["done"] * 8 and lines[1].attempt == 1


def test_cancel_ends_lines_not_started_and_lets_in_flight_ones_finish(market, runtime, monkeypatch):
    runtime.settings.batch_max_in_flight = 2

    class Slow(FakeMarket):
        async def __call__(self, rt, account, body, kind, key):
            await asyncio.sleep(0.3)
            return await super().__call__(rt, account, body, kind, key)

    monkeypatch.setattr(completions, "handle", Slow(runtime))
    key = _key(runtime)
    oc = _client(market, key)
    f = _upload(oc, [_line(i) for i in range(6)])
    bid = oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h").id
    runner = BatchRunner(runtime, make_file_store(runtime.settings))

    async def main():
        while True:
            await runner.tick()
            if len(runner.inflight) == 2:
                break
            await asyncio.sleep(0.01)
        oc.batches.cancel(bid)  # two lines are in flight
        for _ in range(300):
            await runner.tick()
            await asyncio.sleep(0.01)
            if _status(runtime, bid).status == "cancelled":
                break
        await runner.stop()

    asyncio.run(main())
    b = oc.batches.retrieve(bid)
    assert b.status == "cancelled" and b.cancelled_at is not None
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 4)
    assert _charged(runtime) == {0: 1, 1: 1}
    done = [json.loads(x) for x in oc.files.content(b.output_file_id).content.decode().splitlines()]
    errors = [json.loads(x) for x in oc.files.content(b.error_file_id).content.decode().splitlines()]
    assert [d["custom_id"] for d in done] == ["req-0", "req-1"]
    assert [e["custom_id"] for e in errors] == [f"req-{i}" for i in range(2, 6)]
    assert all(e["response"] is None and e["error"]["code"] == "batch_cancelled" for e in errors)


def test_lines_start_only_on_idle_capacity(market, runtime):
    runner = BatchRunner(runtime, make_file_store(runtime.settings))
    runtime.settings.batch_reserve_slots = 1
    assert runner._idle_slots("tiny", 10**12) == 3  # 4 slots, one kept for interactive buyers
    assert runner._idle_slots("tiny", 1) == 0  # no node within the price cap
    from tests.coordinator.test_routability import _admit
    _admit(runtime, 10**9, max_tokens=8)  # an interactive request waits in the queue
    assert runner._idle_slots("tiny", 10**12) == 0


def test_the_batch_discount_caps_the_price_lines_are_routed_at():
    assert price_cap([100, 200, 400], 50) == 200  # only the cheaper half of the range
    assert price_cap([300, 400], 50) == 300  # never below the cheapest seller
    assert price_cap([400], 0) == 400


def test_an_input_that_does_not_match_the_endpoint_fails_the_batch(market, runtime):
    oc = _client(market, _key(runtime))
    f = _upload(oc, [_line(0)])
    bid = oc.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h").id
    _drive(BatchRunner(runtime, make_file_store(runtime.settings)), lambda: _status(runtime, bid).status == "failed")
    b = oc.batches.retrieve(bid)
    assert b.status == "failed" and b.failed_at and b.errors.data[0].code == "mismatched_endpoint"


@pytest.mark.postgres
def test_two_runners_on_postgresql_share_a_batch_through_the_lease(tmp_path, pg_url, monkeypatch):
    settings = CoordinatorSettings(home=tmp_path, database_url=pg_url, run_worker_in_process=False,
                                   batch_runner=False, batch_lease_s=5, batch_reserve_slots=0)
    engine = make_engine(pg_url)
    create_all(engine)
    rt = Runtime(settings, engine=engine)
    try:
        _node(rt, "seller")
        fake = FakeMarket(rt)
        monkeypatch.setattr(completions, "handle", fake)
        with TestClient(create_app(runtime=rt)) as c:
            bid = _batch(c, rt, 10)
            a, b = BatchRunner(rt, make_file_store(settings)), BatchRunner(rt, make_file_store(settings))
            b.owner = "other-replica"

            async def main():
                for _ in range(400):
                    await asyncio.gather(a.tick(), b.tick())
                    await asyncio.sleep(0.01)
                    if _status(rt, bid).status == "completed":
                        break
                await asyncio.gather(a.stop(), b.stop())

            asyncio.run(main())
        assert _status(rt, bid).completed == 10
        assert _charged(rt) == {i: 1 for i in range(10)}
    finally:
        rt.stop()


def test_the_output_says_what_settlement_charged_not_what_the_live_answer_quoted():
    """A line answered just before its process died is settled `unacked` (charged nothing):
    its output usage must say 0, not the quote its live answer carried."""
    from coordinator.batches import _line_json
    from coordinator.models import Batch, BatchLine
    b = Batch(id="batch_x", account_id=1, input_file_id="file-x", endpoint="/v1/chat/completions",
              completion_window="24h")
    body = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5, "cost_nano_usd": 11100}}
    ln = BatchLine(batch_id=b.id, idx=0, custom_id="c0", state="done", status_code=200, result=body, request_id="req_a")
    assert _line_json(b, ln, {"req_a": 0})["response"]["body"]["usage"]["cost_nano_usd"] == 0
    assert _line_json(b, ln, {"req_a": 11100})["response"]["body"]["usage"] == body["usage"]
    assert _line_json(b, ln)["response"]["body"]["usage"]["cost_nano_usd"] == 11100  # no settlement figures: as answered
