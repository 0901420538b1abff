"""The response cache's parts without a market: what is cacheable, the exact key, the two
stores (TTL, the size bound, shared across replicas in Redis), the fill rule (failed or
interrupted answers are never kept) and the ledger's cache charge."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from coordinator import response_cache as rc
from coordinator.cache_store import MemoryStore, RedisStore
from coordinator.completions import _collect, _sse
from coordinator.errors import APIError, BadRequest, RelayInterrupted
from coordinator.models import Account
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.settings import CoordinatorSettings
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.errors import InsufficientFunds
from tests.coordinator.test_relay_stream import FakeStream, done, tokens

MSGS = [{"role": "user", "content": "hello"}]


def chat(**over) -> ChatCompletionRequest:
    return ChatCompletionRequest(**{"model": "tiny", "messages": MSGS, "max_tokens": 8, "temperature": 0, **over})


def test_only_deterministic_single_choice_requests_without_logprobs_are_cacheable():
    assert rc.cacheable(chat())
    assert rc.cacheable(chat(temperature=0.8, seed=7))  # sampled, but seeded
    assert not rc.cacheable(chat(temperature=0.8))
    assert not rc.cacheable(chat(n=2))
    assert not rc.cacheable(chat(logprobs=True))
    assert not rc.cacheable(CompletionRequest(model="tiny", prompt="x", temperature=0, logprobs=2))


@pytest.mark.parametrize("change", [
    {"max_tokens": 9}, {"temperature": 0, "seed": 1}, {"top_p": 0.5}, {"top_k": 3}, {"stop": ["\n"]},
    {"model": "tiny-2"}, {"messages": [{"role": "user", "content": "hello!"}]},
    {"messages": [{"role": "system", "content": "hello"}]}, {"routing": {"region": "eu-west"}},
    {"routing": {"max_price": 5}}, {"routing": {"quantization": ["int8"]}}, {"some_new_field": 1},
])
def test_any_field_that_can_change_the_answer_changes_the_key(change):
    assert rc.cache_key("acct_a", chat(**change), "chat") != rc.cache_key("acct_a", chat(), "chat")


def test_the_key_holds_the_account_and_the_kind_but_not_streaming_or_user_metadata():
    key = rc.cache_key("acct_a", chat(), "chat")
    assert rc.cache_key("acct_b", chat(), "chat") != key
    assert rc.cache_key("acct_a", chat(), "completion") != key
    assert rc.cache_key("acct_a", chat(stream=True, stream_options={"include_usage": True}), "chat") == key
    assert rc.cache_key("acct_a", chat(user="u1", metadata={"job": "x"}), "chat") == key


def test_the_header_overrides_the_accounts_default_and_a_bad_value_is_a_400_naming_it():
    on, off = Account(id="a", name="a", ledger_account_id=1, response_cache=True), \
        Account(id="b", name="b", ledger_account_id=2)
    assert (rc.mode_of(on, None), rc.mode_of(off, None)) == ("use", "skip")
    assert (rc.mode_of(on, "skip"), rc.mode_of(off, " Use ")) == ("skip", "use")
    with pytest.raises(BadRequest) as exc:
        rc.mode_of(on, "always")
    assert exc.value.param == "X-Agora-Cache" and exc.value.status_code == 400


def test_the_price_is_per_request_plus_per_million_tokens_floored():
    s = CoordinatorSettings(response_cache_price_per_request=1000, response_cache_price_per_mtok=3_000_000)
    assert rc.price_of(s, 7) == 1000 + 21
    assert rc.price_of(CoordinatorSettings(), 10**6) == 0  # free by default


# ------------------------------------------------------------------ stores
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_memory_store_expires_entries_after_the_ttl():
    clock = Clock()
    store = MemoryStore(entries=10, ttl_s=60, clock=clock)
    store.put("k", b"v")
    clock.t += 59.9
    assert store.get("k") == b"v"
    clock.t += 0.2
    assert store.get("k") is None and len(store) == 0


def test_memory_store_evicts_the_oldest_written_beyond_its_bound():
    store = MemoryStore(entries=3, ttl_s=60, clock=Clock())
    for k in "abc":
        store.put(k, k.encode())
    store.put("a", b"a2")  # written again: now the newest
    store.put("d", b"d")
    assert [store.get(k) for k in "abcd"] == [b"a2", None, b"c", b"d"]


@pytest.fixture
def redis_store(redis_url, redis_prefix):
    def make(**kw):
        return RedisStore(redis_url, redis_prefix, kw.get("entries", 10), kw.get("ttl_s", 60))

    yield make
    import redis

    r = redis.Redis.from_url(redis_url)
    for k in r.scan_iter(f"{redis_prefix}*"):
        r.delete(k)


def test_redis_store_is_shared_by_replicas_bounded_and_expires(redis_store):
    one, two = redis_store(entries=3, ttl_s=0.5), redis_store(entries=3, ttl_s=0.5)
    one.put("a", b"1")
    assert two.get("a") == b"1"  # another API replica reads what this one wrote
    for k in "bcd":
        two.put(k, k.encode())
    assert one.get("a") is None and [one.get(k) for k in "bcd"] == [b"b", b"c", b"d"]  # oldest evicted
    assert len(one) == 3
    time.sleep(0.6)
    assert one.get("d") is None
    one.put("e", b"e")
    assert len(one) == 1  # the index forgets expired entries too


def test_a_redis_that_is_down_is_a_miss_and_a_dropped_write_never_an_error():
    store = RedisStore("redis://127.0.0.1:1/0", "x:", 10, 60)
    assert store.get("k") is None
    store.put("k", b"v")


# ------------------------------------------------------------------ which answers are kept
def _rt(**over):
    s = CoordinatorSettings(**over)
    return types.SimpleNamespace(settings=s, response_cache=MemoryStore(s.response_cache_entries, 60))


def _stream(rt, messages):
    st = FakeStream(messages)
    st.rt, st.keep = rt, rc.Keep("k", "acct_a")
    return st


def _run_sse(stream, first):
    async def main():
        return [c async for c in _sse(stream, first, "tiny", "chat", False, False)]

    return asyncio.run(main())


def test_a_completed_answer_is_kept_whole_and_streamed_or_not():
    rt = _rt()
    _run_sse(_stream(rt, [tokens(2, [3], text="c"), done(3)]), tokens(0, [1, 2], text="ab"))
    entry = json.loads(rt.response_cache.get("k"))
    assert entry["account"] == "acct_a" and entry["body"]["choices"][0]["message"]["content"] == "abc"
    assert entry["body"]["usage"]["completion_tokens"] == 3
    rt2 = _rt()
    asyncio.run(_collect(_stream(rt2, [done(2)]), tokens(0, [1, 2], text="ab"), "tiny", "chat", False))
    assert json.loads(rt2.response_cache.get("k"))["body"]["choices"][0]["message"]["content"] == "ab"


def test_failed_interrupted_or_abandoned_answers_are_never_kept():
    rt = _rt()
    error = {"type": "error", "status": 502, "message": "the node failed"}
    _run_sse(_stream(rt, [tokens(2, [3]), error]), tokens(0, [1, 2]))  # the node failed mid-stream
    _run_sse(_stream(rt, [tokens(2, [3]), RelayInterrupted("lost")]), tokens(0, [1, 2]))
    with pytest.raises(APIError):
        asyncio.run(_collect(_stream(rt, [error]), tokens(0, [1]), "tiny", "chat", False))
    with pytest.raises(RelayInterrupted):
        asyncio.run(_collect(_stream(rt, [RelayInterrupted("lost")]), tokens(0, [1]), "tiny", "chat", False))
    stream = _stream(rt, [tokens(2, [3]), tokens(3, [4]), done(4)])

    async def hang_up():  # the buyer leaves after the first chunk
        gen = _sse(stream, tokens(0, [1, 2]), "tiny", "chat", False, False)
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(hang_up())
    assert [d for _, d in stream.finished] == [None]  # the buyer left
    assert rt.response_cache.get("k") is None and len(rt.response_cache) == 0


def test_an_answer_over_the_entry_bound_or_with_an_error_finish_is_not_kept():
    rt = _rt(response_cache_entry_bytes=256)
    whole = {"id": "r", "choices": [{"finish_reason": "stop", "message": {"content": "x" * 300}}]}
    asyncio.run(rc.fill(rt, rc.Keep("big", "a"), whole))
    asyncio.run(rc.fill(rt, rc.Keep("err", "a"), {"id": "r", "choices": [{"finish_reason": "error"}]}))
    assert len(rt.response_cache) == 0
    whole["choices"][0]["message"]["content"] = "x"
    asyncio.run(rc.fill(rt, rc.Keep("ok", "a"), whole))
    assert rt.response_cache.get("ok") is not None


# ------------------------------------------------------------------ money
def test_the_cache_charge_moves_buyer_money_to_the_platform_once(runtime):
    with runtime.session() as s:
        led = Ledger(s)
        buyer = led.open_account(AccountKind.BUYER, ref="acct_x").id
        led.deposit(buyer, 1000, idempotency_key="d")
        assert led.charge(buyer, 300, kind="cache", idempotency_key="cache:r1", request_ref="r1") == 700
        assert led.charge(buyer, 300, kind="cache", idempotency_key="cache:r1", request_ref="r1") == 700  # replay
        with pytest.raises(InsufficientFunds):
            led.charge(buyer, 701, kind="cache", idempotency_key="cache:r2", request_ref="r2")
        assert led.balance(buyer) == 700 and led.system_balance(AccountKind.PLATFORM_FEES) == 300
        assert total_balance(s) == 0


def test_the_operator_turns_an_accounts_cache_default_on_and_off_with_the_cli(tmp_path, capsys):
    from coordinator.cli import cmd_account
    from coordinator.db import make_engine, session_scope

    db = ["--database-url", f"sqlite:///{tmp_path / 'a.db'}"]
    assert cmd_account(["create", *db]) == 0
    account_id = capsys.readouterr().err.split()[1]

    def flag() -> bool:
        with session_scope(make_engine(db[1])) as s:
            return s.get(Account, account_id).response_cache

    assert flag() is False
    assert cmd_account(["cache", account_id, "on", "--json", *db]) == 0
    assert json.loads(capsys.readouterr().out) == {"account_id": account_id, "response_cache": True}
    assert flag() is True
    assert cmd_account(["cache", account_id, "off", *db]) == 0 and flag() is False
    assert cmd_account(["cache", "acct_nope", "on", *db]) == 1


def test_market_history_counts_a_hit_as_a_request_but_not_its_tokens_as_work_done(runtime):
    from datetime import timedelta

    from coordinator.account_service import create_account
    from coordinator.history import minute_of, record
    from coordinator.models import InferenceRequest, MarketMinute, RequestStatus
    from coordinator.models.account import utcnow
    from sqlmodel import select

    start = minute_of(utcnow()) - timedelta(minutes=1)
    with runtime.session() as s:
        account, _ = create_account(s, "b")
        for rid, cached in (("req_made", False), ("req_hit", True)):
            s.add(InferenceRequest(id=rid, account_id=account.id, model="tiny", kind="chat",
                                   status=RequestStatus.COMPLETED, prompt_tokens_est=5, max_tokens=8, prompt_tokens=5,
                                   completion_tokens=8, cost=10, cached=cached, created_at=start,
                                   finished_at=start + timedelta(seconds=10)))
    with runtime.session() as s:
        record(s, runtime.settings, now=start + timedelta(minutes=1, seconds=30))
        row = s.exec(select(MarketMinute).where(MarketMinute.minute == start)).one()
        assert (row.requests, row.completed, row.prompt_tokens, row.completion_tokens) == (2, 2, 5, 8)
