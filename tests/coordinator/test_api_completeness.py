"""What the official client can send is served or refused by name (issue 16 item 3), in
process: unsupported parameters are 400s naming them, `user`/`metadata` are bounded and kept
on the request record, log-prob requests go only to nodes that report log-probs, and the n
holds of `n` > 1 are placed together or not at all."""

from __future__ import annotations

import openai
import pytest
from sqlmodel import select

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.models import InferenceRequest
from coordinator.placement import choose
from coordinator.schemas import ChatCompletionRequest
from pricing.ledger import Ledger, LedgerHold, total_balance
from tests.coordinator.test_routability import _seller

MSG = [{"role": "user", "content": "hi"}]


def _official(client, key) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


@pytest.fixture
def key(client, runtime):
    _seller(client, runtime, connected=False)  # known model, no live node: admission answers 503 at once
    with runtime.session() as s:
        _, key = create_account(s, "buyer", 10**12)
    return key


REFUSED_CHAT = [
    ("tools", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
    ("tool_choice", dict(tool_choice="required")),
    ("functions", dict(functions=[{"name": "f", "parameters": {}}])),
    ("function_call", dict(function_call="auto")),
    ("response_format", dict(response_format={"type": "json_object"})),
    ("frequency_penalty", dict(frequency_penalty=0.5)),
    ("presence_penalty", dict(presence_penalty=-1.0)),
    ("logit_bias", dict(logit_bias={"50256": -100})),
    ("audio", dict(audio={"voice": "alloy", "format": "wav"})),
    ("modalities", dict(modalities=["text", "audio"])),
    ("parallel_tool_calls", dict(parallel_tool_calls=False)),
    ("prediction", dict(prediction={"type": "content", "content": "x"})),
    ("messages[0].content[1]", dict(messages=[{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])),
    ("messages[0].content[0]", dict(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}])),
    ("top_logprobs", dict(top_logprobs=3)),  # without logprobs: true
    ("reasoning_effort", dict(reasoning_effort="high")),  # unknown to this market: refused, not ignored
]


@pytest.mark.parametrize("param,args", REFUSED_CHAT, ids=[p for p, _ in REFUSED_CHAT])
def test_every_unsupported_chat_parameter_is_a_400_naming_it(client, runtime, key, param, args):
    c = _official(client, key)
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(**{"model": "tiny", "messages": MSG, "max_tokens": 4, **args})
    err = exc.value.body
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0] in err["message"] or "content parts" in err["message"]
    with runtime.session() as s:  # refused before admission: no request, no hold
        assert s.exec(select(InferenceRequest)).first() is None


REFUSED_COMPLETION = [("suffix", dict(suffix="end")), ("best_of", dict(best_of=3)), ("echo", dict(echo=True)),
                      ("logit_bias", dict(logit_bias={"1": 5})), ("frequency_penalty", dict(frequency_penalty=1))]


@pytest.mark.parametrize("param,args", REFUSED_COMPLETION, ids=[p for p, _ in REFUSED_COMPLETION])
def test_every_unsupported_completion_parameter_is_a_400_naming_it(client, key, param, args):
    with pytest.raises(openai.BadRequestError) as exc:
        _official(client, key).completions.create(model="tiny", prompt="x", max_tokens=4, **args)
    assert exc.value.body["param"] == param


def test_harmless_and_neutral_values_are_accepted(runtime, client, key):
    """Defaults a client may send explicitly, and parameters that change nothing, pass the
    refusal check: admission then finds no live node (a 503), where a refusal would be a 400."""
    c = _official(client, key)
    with pytest.raises(openai.APIStatusError) as exc:
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, frequency_penalty=0, presence_penalty=0,
                                  logit_bias={}, response_format={"type": "text"}, tool_choice="none",
                                  modalities=["text"], store=False, service_tier="auto", user="u1")
    assert exc.value.status_code == 503  # admitted, then no node took it: not refused


def test_user_and_metadata_are_bounded(client, key):
    c = _official(client, key)
    for args, param in ((dict(user="u" * 257), "user"),
                        (dict(metadata={f"k{i}": "v" for i in range(17)}), "metadata"),
                        (dict(metadata={"k" * 65: "v"}), "metadata"),
                        (dict(metadata={"k": "v" * 513}), "metadata"),
                        (dict(n=9), "n"), (dict(n=0), "n")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, **args)
        assert exc.value.body["param"] == param, exc.value.body


def test_user_and_metadata_are_kept_on_the_request_record(runtime, client):
    _seller(client, runtime)
    with runtime.session() as s:
        account, _ = create_account(s, "b", 10**12)
        body = ChatCompletionRequest(model="tiny", messages=MSG, max_tokens=4, user="end-user-7",
                                     metadata={"job": "nightly", "team": "search"})
        rid = admit(s, account, body, "chat", runtime.settings).request.id
    with runtime.session() as s:
        req = s.get(InferenceRequest, rid)
        assert (req.buyer_user, req.buyer_metadata) == ("end-user-7", {"job": "nightly", "team": "search"})


def test_log_prob_requests_go_only_to_nodes_that_report_them(runtime, client):
    runtime.settings.allow_unverified_nodes = True
    cheap = _seller(client, runtime, price_out=10, logprobs=False)  # cheaper, but reports no log-probs
    full = _seller(client, runtime, price_out=200_000_000)

    def placed(**args):
        with runtime.session() as s:
            account, _ = create_account(s, "b", 10**12)
            body = ChatCompletionRequest(model="tiny", messages=MSG, max_tokens=4, routing={"allow_unverified": True},
                                         **args)
            req = admit(s, account, body, "chat", runtime.settings).request
            node = choose(s, req, runtime.settings)
            s.rollback()
            return node

    assert placed() == cheap.public_key_hex  # a buyer who accepts unverified nodes gets the cheap one
    assert placed(logprobs=True) == full.public_key_hex  # ... unless it asks for log-probs


def test_log_probs_with_no_capable_node_are_refused_naming_why(runtime, client):
    runtime.settings.allow_unverified_nodes = True
    _seller(client, runtime, logprobs=False)
    with runtime.session() as s:
        _, key = create_account(s, "buyer", 10**12)
    with pytest.raises(openai.APIStatusError) as exc:
        _official(client, key).chat.completions.create(model="tiny", messages=MSG, max_tokens=4, logprobs=True,
                                                       extra_body={"routing": {"allow_unverified": True}})
    assert exc.value.status_code == 503 and "log-probs" in exc.value.message


def test_n_choices_are_held_together_or_not_at_all(runtime, client):
    """n=3 whose three holds the balance cannot cover: one 402 for the total, no hold left
    pending, nothing moved; n=3 it can cover: three holds (one per choice), all pending."""
    _seller(client, runtime)
    with runtime.session() as s:
        account, key = create_account(s, "buyer", 0)
        one = admit(s, account, ChatCompletionRequest(model="tiny", messages=MSG, max_tokens=100), "chat",
                    runtime.settings, hold=False).request.hold_amount
        s.rollback()
    with runtime.session() as s:
        account, key = create_account(s, "poor", 2 * one + one // 2)
    c = _official(client, key)
    with pytest.raises(openai.APIStatusError) as exc:
        c.chat.completions.create(model="tiny", messages=MSG, max_tokens=100, n=3)
    assert exc.value.status_code == 402 and "3 choices" in exc.value.message
    with runtime.session() as s:
        assert s.exec(select(LedgerHold)).all() == []
        assert Ledger(s).balance(account.ledger_account_id) == 2 * one + one // 2
        assert total_balance(s) == 0
