"""Log-probs in OpenAI's shapes from relayed `tokens` messages, and n choices relayed
together: interleaved SSE chunks with their index, each choice acknowledged for exactly
what it was written, the usage the sum of the choices'; a failing choice costs the buyer
nothing for the others' unwritten work."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator.choices import collect_many, sse_many
from coordinator.delivery import Delivery
from coordinator.errors import UpstreamFailed
from coordinator.logprobs_format import UNKNOWN, LogprobsBuilder
from protocol import LOGPROB_SCALE
from protocol.commitment import NO_LOGPROB
from tests.coordinator.test_relay_stream import QUOTE, FakeStream, done


def tok(start, tid, text, lp, top=None, node="n1"):
    msg = {"type": "tokens", "node_id": node, "start": start, "token_ids": [tid], "count": 1, "text": text,
           "logprobs": [lp]}
    if top is not None:
        msg["top_logprobs"] = [[{"token_id": i, "text": t, "logprob": v} for i, t, v in top]]
    return msg


def test_chat_logprobs_convert_the_fixed_point_values_and_sort_alternatives():
    b = LogprobsBuilder("chat", 2)
    part = b.part(tok(0, 5, "Hé", -1234, top=[(9, "x", -25_000), (5, "Hé", -1234), (7, "y", -30_000)]))
    entry = part["content"][0]
    assert entry["token"] == "Hé" and entry["logprob"] == -1234 / LOGPROB_SCALE
    assert entry["bytes"] == list("Hé".encode())
    assert [(a["token"], a["logprob"]) for a in entry["top_logprobs"]] == [("Hé", -0.1234), ("x", -2.5)]
    b.part(tok(1, 6, "!", NO_LOGPROB))
    assert b.whole()["content"][1]["logprob"] == UNKNOWN  # a node that sent none: OpenAI's floor, never a made-up value
    assert b.whole()["refusal"] is None


def test_completion_logprobs_keep_offsets_and_streamed_parts_add_up_to_the_whole():
    b = LogprobsBuilder("completion", 1, text_offset=4)
    parts = [b.part(tok(0, 1, "ab", -10, top=[(1, "ab", -10)])), b.part(tok(1, 2, "c", -20, top=[(3, "d", -5)]))]
    whole = b.whole()
    assert whole == {"tokens": ["ab", "c"], "token_logprobs": [-0.001, -0.002],
                     "top_logprobs": [{"ab": -0.001}, {"d": -0.0005}], "text_offset": [4, 6]}
    assert sum((p["tokens"] for p in parts), []) == whole["tokens"]
    assert LogprobsBuilder("completion", 0).part(tok(0, 1, "a", -1))["top_logprobs"] is None  # logprobs=0


def _msg(start, text="x", node="n1"):
    return {"type": "tokens", "node_id": node, "start": start, "token_ids": [start], "count": 1, "text": text,
            "logprobs": [-100]}


def _events(out):
    return [json.loads(c[len(b"data: "):]) for c in out if c != b"data: [DONE]\n\n"]


def test_n_streamed_choices_interleave_with_their_index_and_each_is_acknowledged():
    a = FakeStream([_msg(1, "b"), done(2)])
    b = FakeStream([_msg(1, "y"), _msg(2, "z"), done(3)])
    builders = [LogprobsBuilder("chat", 0), None]

    async def main():
        return [c async for c in sse_many([a, b], [_msg(0, "a"), _msg(0, "x")], "tiny", "chat", True, builders)]

    out = asyncio.run(main())
    events = _events(out)
    text = {0: "", 1: ""}
    for ev in events:
        for ch in ev["choices"]:
            text[ch["index"]] += ch["delta"].get("content") or ""
            assert (ch["logprobs"] is not None) == (ch["index"] == 0 and bool(ch["delta"].get("content")))
    assert text == {0: "ab", 1: "xyz"}
    assert a.finished == [(2, Delivery.COMPLETE)] and b.finished == [(3, Delivery.COMPLETE)]
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["cost_nano_usd"] == QUOTE.buyer_cost(2, Delivery.COMPLETE) + QUOTE.buyer_cost(3, Delivery.COMPLETE)
    assert out[-1] == b"data: [DONE]\n\n"


def test_a_failing_choice_ends_the_stream_and_the_others_pay_only_what_was_written():
    a = FakeStream([_msg(1), {"type": "error", "status": 502, "message": "node died"}])
    b = FakeStream([_msg(1), _msg(2), done(3)])

    async def main():
        return [c async for c in sse_many([a, b], [_msg(0), _msg(0)], "tiny", "chat", False, [None, None])]

    events = _events(asyncio.run(main()))
    assert events[-1]["error"]["message"] == "node died"
    assert a.finished == []  # failed at the node: unpaid, nothing to acknowledge
    assert len(b.finished) == 1 and b.finished[0][1] in (None, Delivery.COMPLETE)


def test_whole_n_choices_are_answered_together_or_the_error_charges_none():
    a, b = FakeStream([_msg(1, "b"), done(2)]), FakeStream([done(1)])
    body, counts = asyncio.run(collect_many([a, b], [_msg(0, "a"), _msg(0, "x")], "tiny", "completion", [None, None]))
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, "ab"), (1, "x")] and counts == [2, 1]
    assert body["usage"]["completion_tokens"] == 3 and body["usage"]["prompt_tokens"] == 2 * QUOTE.prompt_tokens
    assert a.finished == [(2, Delivery.COMPLETE)] and b.finished == [(1, Delivery.COMPLETE)]

    ok, bad = FakeStream([done(1)]), FakeStream([{"type": "error", "status": 502, "message": "gone"}])
    with pytest.raises(UpstreamFailed):
        asyncio.run(collect_many([ok, bad], [_msg(0), _msg(0)], "tiny", "chat", [None, None]))
    assert ok.finished == [(0, None)]  # its answer never reached the buyer: it pays nothing for it


def test_a_replayed_stream_of_n_choices_sends_every_choice_with_its_index():
    from coordinator import openai_format as fmt
    from coordinator.completions import _answer
    from coordinator.schemas import ChatCompletionRequest

    whole = fmt.whole_of("chat", "req_1", "tiny", 1, [fmt.choice("chat", "ab", "stop", index=0),
                                                      fmt.choice("chat", "cd", "length", index=1)],
                         fmt.usage(2, 4, 10), "n1")
    body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], n=2, stream=True)

    async def main():
        return [c async for c in _answer(whole, body, "chat", {}).body_iterator]

    events = _events(asyncio.run(main()))
    got = {}
    for ev in events:
        for ch in ev["choices"]:
            got.setdefault(ch["index"], ["", None])
            got[ch["index"]][0] += ch["delta"].get("content") or ""
            got[ch["index"]][1] = ch["finish_reason"] or got[ch["index"]][1]
    assert got == {0: ["ab", "stop"], 1: ["cd", "length"]}
