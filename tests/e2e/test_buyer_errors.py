"""Every error a buyer can get, through the official `openai` client as users run it
(default retries on): what can never succeed is a 4xx, answered once and not retried;
what is temporary is a 429/503 with Retry-After, which the client retries and then
reports. The server's own request counter shows how many attempts each took."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market

pytestmark = pytest.mark.slow


def _outcomes(m) -> dict[str, float]:
    text = httpx.get(m.base + "/metrics").text
    return {line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("agora_requests_total{")}


def _attempts(m, before: dict, status: str) -> int:
    return int(_outcomes(m).get(status, 0) - before.get(status, 0))


def test_error_classes_through_the_official_client_with_its_default_retries(tmp_path):
    with embedded_market(tmp_path, AGORA_RATE_LIMIT_REQUESTS_PER_MIN="40") as m:
        node = m.start_node("n")
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, timeout=30)  # max_retries=2, the default
        hi = [{"role": "user", "content": "hi"}]
        cases = [
            (openai.NotFoundError, "404", dict(model="no-such-model", messages=hi)),
            (openai.BadRequestError, "400", dict(model="tiny", messages=hi, extra_body={"routing": {"max_price": 1}})),
            (openai.BadRequestError, "400", dict(model="tiny", messages=hi, max_tokens=10**9)),
            (openai.BadRequestError, "400", dict(model="tiny", messages=hi, extra_body={
                "routing": {"min_tokens_per_s": 10**9}})),  # a target no node can ever meet: not retried
        ]
        for exc_type, status, args in cases:
            before = _outcomes(m)
            with pytest.raises(exc_type) as exc:
                c.chat.completions.create(**args)
            assert exc.value.body["message"] or exc.value.message
            assert _attempts(m, before, status) == 1, (status, args)  # answered once, never retried
        poor = m.agora("account", "create", "--credit", "5")
        before = _outcomes(m)
        with pytest.raises(openai.APIStatusError) as exc:
            openai.OpenAI(base_url=m.base + "/v1", api_key=poor, timeout=30).chat.completions.create(
                model="tiny", messages=hi, max_tokens=64)
        assert exc.value.status_code == 402 and _attempts(m, before, "402") == 1

        # temporary: the model is known but its only node is gone -> 503 + Retry-After, retried twice
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        m.procs.remove(node)
        deadline = time.monotonic() + 60
        while httpx.get(m.base + "/v1/models").json()["data"][0]["live_nodes"] and time.monotonic() < deadline:
            time.sleep(0.2)
        before = _outcomes(m)
        t0 = time.monotonic()
        with pytest.raises(openai.InternalServerError) as exc:
            c.chat.completions.create(model="tiny", messages=hi)
        assert exc.value.status_code == 503 and exc.value.response.headers["retry-after"] == "2"
        assert _attempts(m, before, "503") == 3 and time.monotonic() - t0 >= 4  # waited as told, twice

        # and a rate limit: 429 in OpenAI's body, retried after Retry-After, then reported
        limited = m.agora("account", "create", "--credit", str(10**9))
        lc = openai.OpenAI(base_url=m.base + "/v1", api_key=limited, timeout=30, max_retries=0)
        for _ in range(40):
            try:
                lc.models.list()  # not rate limited: the limit counts completions
                lc.chat.completions.create(model="no-such-model", messages=hi)
            except openai.NotFoundError:
                pass
        with pytest.raises(openai.RateLimitError) as exc:
            lc.chat.completions.create(model="no-such-model", messages=hi)
        assert exc.value.body["code"] == "rate_limit_exceeded" and int(exc.value.response.headers["retry-after"]) >= 1
