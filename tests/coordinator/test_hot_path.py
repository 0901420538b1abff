"""The hot path waits on nothing it need not: the work channel's read loop hands a receipt's
being stored, the next frames — another stream's tokens — are relayed at once."""

from __future__ import annotations

import asyncio
import threading
import time

from coordinator.work_channel import Channel, _Stream
from protocol import Done, Receipt, fresh_stamp


class FakeSocket:
    def __init__(self, frames: list[dict]):
        self.frames = frames

    async def receive_json(self):
        if not self.frames:
            await asyncio.sleep(3600)
        return self.frames.pop(0)


def test_tokens_of_another_stream_are_relayed_while_a_receipt_is_stored(runtime):
    release = threading.Event()

    def slow_accept(done, relayed, st):  # a receipt's transaction stuck behind a lock
        release.wait(10)
        raise RuntimeError("stored late")

    receipt = Receipt(node_id="n" * 64, **fresh_stamp(), request_id="req_a", model="tiny", prompt_tokens=3,
                      completion_tokens=1, commitment="00", finish_reason="length")
    frames = [Done(request_id="req_a", receipt=receipt).model_dump(mode="json"),
              {"type": "tokens", "request_id": "req_b", "start": 0, "token_ids": [5, 6], "logprobs": [-1, -2],
               "text": "ab"}]

    async def main():
        ch = Channel(FakeSocket(frames), runtime)
        ch.node_id = "n" * 64
        ch.streams = {"req_a": _Stream("req_a"), "req_b": _Stream("req_b")}
        ch._accept = slow_accept
        async with runtime.bus.subscribe("req:req_b") as sub:
            loop = asyncio.create_task(ch._read_loop())
            t0 = time.monotonic()
            msg = await sub.get(timeout=5)
            waited = time.monotonic() - t0
            assert "req_a" not in ch.streams and len(ch.tasks) == 1  # the receipt is still being stored
            release.set()
            loop.cancel()
            await asyncio.gather(*ch.tasks, return_exceptions=True)
        return msg, waited

    msg, waited = asyncio.run(main())
    assert msg["type"] == "tokens" and msg["token_ids"] == [5, 6] and msg["logprobs"] == [-1, -2]
    assert waited < 1.0  # not behind the receipt (held up to 10 s)


def test_reads_never_wait_for_sqlites_write_lock(runtime):
    """Auth, balances and listings read through `read_session`: while a long transaction holds
    SQLite's write lock, a buyer's API key still resolves at once (it used to queue behind it)."""
    from coordinator.account_service import create_account
    from coordinator.auth import account_for_key

    with runtime.session() as s:
        account, key = create_account(s, "buyer", 10**6)
    held, release = threading.Event(), threading.Event()

    def writer():
        with runtime.session() as s:  # BEGIN IMMEDIATE: holds the write lock until release
            s.get(type(account), account.id)
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert held.wait(5)
        t0 = time.monotonic()
        with runtime.read_session() as s:
            assert account_for_key(s, key).id == account.id
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        t.join()
