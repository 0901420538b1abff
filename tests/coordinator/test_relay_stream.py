"""The buyer's handler: it notices lost tokens instead of streaming a hole, and it counts
exactly what it wrote to the buyer (what settlement then charges)."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future

import pytest

from coordinator.completions import RequestStream, _collect, _sse
from coordinator.delivery import Delivery, Quote
from coordinator.errors import RelayInterrupted

QUOTE = Quote(7, ((100_000_000, 200_000_000, 6),), hold=10**9)


class FakeSub:
    def __init__(self, messages):
        self.queue = list(messages)
        self.closed = False

    async def get(self, timeout=None):
        if not self.queue:
            raise asyncio.TimeoutError
        return self.queue.pop(0)

    def close(self):
        self.closed = True


def tokens(start, ids, node="n1", text="x"):
    return {"type": "tokens", "node_id": node, "start": start, "token_ids": ids, "count": len(ids), "text": text}


def done(relayed, node="n1"):
    return {"type": "done", "node_id": node, "finish_reason": "length", "relayed": relayed,
            "quote": QUOTE.to_dict()}


def _drain(runtime, messages):
    async def main():
        stream = RequestStream(runtime, "req_t", FakeSub(messages))
        got = []
        while True:
            msg = await stream.next()
            got.append(msg)
            if msg["type"] == "done":
                return got

    return asyncio.run(main())


@pytest.mark.parametrize("messages,why", [
    ([tokens(0, [1, 2]), tokens(3, [4])], "never arrived"),  # token 2 lost in the relay
    ([tokens(0, [1, 2]), done(5)], "final tokens never arrived"),  # the tail lost
    ([tokens(0, [1]), {"type": "bus_lost"}], "relay connection lost"),
    ([{"type": "assigned", "node_id": "n1"}, tokens(0, [1]),
      {"type": "failover", "node_id": "n1", "tokens": 3}], "lost before a failover"),
])
def test_lost_tokens_interrupt_the_stream_instead_of_leaving_a_hole(runtime, messages, why):
    with pytest.raises(RelayInterrupted, match=why) as exc:
        _drain(runtime, messages)
    assert exc.value.status_code == 503 and exc.value.headers == {"Retry-After": "1"}


def test_duplicates_and_tokens_from_a_node_left_behind_are_dropped(runtime):
    got = _drain(runtime, [
        {"type": "assigned", "node_id": "n1"}, tokens(0, [1, 2]), tokens(0, [1, 2]),  # a duplicate
        {"type": "failover", "node_id": "n1", "tokens": 2}, tokens(2, [3], node="n1"),  # late, old node
        {"type": "assigned", "node_id": "n2"}, tokens(0, [9], node="n2"), {"type": "bus_restored"},
        done(1, node="n2")])
    assert [m["token_ids"] for m in got if m["type"] == "tokens"] == [[1, 2], [9]]


def test_first_tokens_that_overtake_their_assignment_are_kept(runtime):
    # The worker publishes the assignment to the node, then "assigned" to the buyer; a fast
    # node's tokens (published by the API process holding its channel) can arrive first.
    got = _drain(runtime, [tokens(0, [1, 2]), {"type": "assigned", "node_id": "n1"}, tokens(2, [3, 4]), done(4)])
    assert [m["token_ids"] for m in got if m["type"] == "tokens"] == [[1, 2], [3, 4]]


class FakeStream:
    def __init__(self, messages):
        self.rid, self.rt = "req_t", None
        self.sub = FakeSub([])
        self.messages = list(messages)
        self.finished = []
        self.ack = Future()  # the ending's write (endings.py): already done unless a test holds it
        self.ack.set_result(True)

    async def next(self):
        msg = self.messages.pop(0)
        if isinstance(msg, Exception):
            raise msg
        return msg

    def finish(self, written, delivery):
        self.finished.append((written, delivery))
        return self.ack


def _chunks(messages, first, read=None):
    """Run the SSE body; read `read` chunks then hang up (None: read everything)."""
    stream = FakeStream(messages)

    async def main():
        gen = _sse(stream, first, "tiny", "chat", True, False)
        out = []
        async for chunk in gen:
            out.append(chunk)
            if read is not None and len(out) == read:
                await gen.aclose()
                break
        return out

    return stream, asyncio.run(main())


def test_a_complete_stream_acknowledges_every_token_and_reports_what_will_be_charged():
    stream, out = _chunks([tokens(2, [3, 4]), tokens(4, [5], text=""), tokens(5, [6]), done(6)], tokens(0, [1, 2]))
    assert stream.finished == [(6, Delivery.COMPLETE)]
    usage = json.loads(out[-2][len(b"data: "):])["usage"]
    assert usage["completion_tokens"] == 6 and usage["cost_nano_usd"] == QUOTE.buyer_cost(6, Delivery.COMPLETE)
    assert out[-1] == b"data: [DONE]\n\n"


def test_a_buyer_who_hangs_up_is_acknowledged_only_the_chunks_it_was_written():
    # chunks: [1,2] [3,4] [5] ... the buyer takes three and hangs up while the third is out
    stream, out = _chunks([tokens(2, [3, 4]), tokens(4, [5]), tokens(5, [6]), done(6)], tokens(0, [1, 2]), read=3)
    assert len(out) == 3
    assert stream.finished == [(4, None)]  # the first two chunks were handed over; the third not known to be


def test_an_interrupted_relay_ends_with_a_clean_error_and_acknowledges_what_was_written():
    stream, out = _chunks([tokens(2, [3]), RelayInterrupted("lost")], tokens(0, [1, 2]))
    assert stream.finished == [(3, Delivery.RELAY_BROKEN)]
    assert json.loads(out[-2][len(b"data: "):])["error"]["code"] == "relay_interrupted"
    assert out[-1] == b"data: [DONE]\n\n"


def test_the_usage_chunk_waits_until_the_ending_is_written():
    # A process killed after sending the usage but before writing the ending would settle
    # the request unacknowledged (charged nothing) while the buyer was told its cost.
    stream = FakeStream([tokens(2, [3]), done(3)])
    stream.ack = Future()

    async def main():
        gen = _sse(stream, tokens(0, [1, 2]), "tiny", "chat", True, False)
        out = [await gen.__anext__() for _ in range(3)]  # two token chunks and the finish chunk
        nxt = asyncio.ensure_future(gen.__anext__())  # the finish chunk was handed over: acknowledged
        await asyncio.sleep(0.2)
        assert stream.finished == [(3, Delivery.COMPLETE)]
        assert not nxt.done()  # no usage while the ending is not in the database
        stream.ack.set_result(True)
        out.append(await asyncio.wait_for(nxt, 2))
        return out

    out = asyncio.run(main())
    assert json.loads(out[-1][len(b"data: "):])["usage"]["completion_tokens"] == 3


def test_a_whole_answer_is_returned_only_once_its_ending_is_written():
    stream = FakeStream([tokens(2, [3]), done(3)])
    stream.ack = Future()

    async def main():
        answer = asyncio.ensure_future(_collect(stream, tokens(0, [1, 2]), "tiny", "chat", False))
        await asyncio.sleep(0.2)
        assert stream.finished == [(3, Delivery.COMPLETE)] and not answer.done()
        stream.ack.set_result(True)
        return await asyncio.wait_for(answer, 2)

    body = json.loads(asyncio.run(main()).body)
    assert body["usage"]["completion_tokens"] == 3
