"""Redis (the Celery broker and the token relay) killed for 5 seconds under streaming load,
on the production path: PostgreSQL, `agora serve`, `agora worker --beat`, two node agents,
buyers on the official `openai` client with its default retries.

After the outage: every buyer got its whole stream or a clean error, none waited more than
30 s; nobody paid for a token it did not receive, or twice; the books sum to zero; no hold
is left open; and the market serves again within 10 s of Redis coming back."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

from tests.chaos.oracle import assert_books_closed, charged_text, greedy_token_texts, production_env
from tests.e2e.market import Market, settled_balance

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

MESSAGES = [{"role": "user", "content": "tell me about the market"}]
MAX_TOKENS = 64
BUYERS = 6


def _env(home, pg_url: str, redis_url: str) -> dict[str, str]:
    return production_env(home, pg_url, redis_url, assign_timeout_s="10", token_timeout_s="8", delivery_ack_timeout_s="20",
                          canary_interval_s="0")


class Buyer(threading.Thread):
    def __init__(self, base: str, key: str):
        super().__init__(daemon=True)
        self.client = openai.OpenAI(base_url=base + "/v1", api_key=key, timeout=60)  # default retries on
        self.text, self.rid, self.usage, self.error = "", None, None, None
        self.started = self.ended = 0.0

    def run(self) -> None:
        self.started = time.monotonic()
        try:
            stream = self.client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                stream_options={"include_usage": True})
            for chunk in stream:
                self.rid = chunk.id
                if chunk.usage is not None:
                    self.usage = chunk.usage
                elif chunk.choices:
                    self.text += chunk.choices[0].delta.content or ""
        except openai.APIError as exc:
            self.error = exc
        finally:
            self.ended = time.monotonic()


def test_redis_killed_mid_stream(tmp_path, pg_url, own_redis):
    reference = greedy_token_texts(MESSAGES, MAX_TOKENS)
    m = Market(home=tmp_path, env=_env(tmp_path, pg_url, own_redis.url))
    try:
        m.agora("migrate")
        m.start_coordinator()
        m.start_worker()
        m.start_node("node-a", extra=("--max-tokens-per-s", "20", "--operator", "a"))
        m.start_node("node-b", extra=("--max-tokens-per-s", "20", "--operator", "b"))
        m.wait_live("tiny", 2)
        key = m.agora("account", "create", "--credit", str(10**9))
        auth = {"Authorization": f"Bearer {key}"}

        buyers = [Buyer(m.base, key) for _ in range(BUYERS)]
        for b in buyers:
            b.start()
        time.sleep(1.5)  # streams are flowing
        own_redis.kill()
        time.sleep(5)
        own_redis.start()
        back = time.monotonic()
        for b in buyers:
            b.join(timeout=60)

        # nobody hangs: a whole stream or a clean error, well within 30 s
        for b in buyers:
            assert not b.is_alive() and b.ended - b.started <= 30, (b.ended - b.started, b.error)
            assert (b.usage is None) == (b.error is not None), (b.usage, b.error)
        interrupted = [b for b in buyers if b.error is not None]
        assert interrupted, "the outage interrupted no stream: the test proves nothing"

        # the market serves again within 10 s of Redis coming back
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, timeout=20, max_retries=0)
        while True:
            try:
                answer = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
                break
            except openai.APIError:
                assert time.monotonic() - back < 10, m.tail()
                time.sleep(0.2)
        assert time.monotonic() - back <= 10 and answer.usage.completion_tokens == 8

        settled_balance(m.base, key, timeout=60)  # every hold settled or released
        for b in buyers:
            assert reference and "".join(reference).startswith(b.text)  # what it got is the answer, no hole
            if b.rid is None:  # refused before its first token (and retried away, or failed): unpaid
                continue
            req = httpx.get(f"{m.base}/v1/requests/{b.rid}", headers=auth).json()
            charged = req["completion_tokens"] or 0
            if b.usage is not None:  # a whole stream: charged exactly what it was told
                assert charged == b.usage.completion_tokens and req["cost_nano_usd"] == \
                    b.usage.model_extra["cost_nano_usd"]
            else:  # interrupted: charged at most for the text it received
                assert b.text.startswith(charged_text(reference, charged)), (charged, b.text, req)
                assert (req["cost_nano_usd"] or 0) < req["hold_nano_usd"]

        assert_books_closed(pg_url)
    finally:
        m.stop()
