"""The relay bus: in-memory (embedded) and Redis (across processes), same behaviour."""

from __future__ import annotations

import asyncio
import threading

import pytest

from coordinator.bus import InMemoryBus, RedisBus


def _buses(request):
    if request.param == "memory":
        return InMemoryBus()
    return RedisBus(request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix"))


@pytest.fixture(params=["memory", "redis"])
def bus(request):
    return _buses(request)


def test_publish_reaches_every_subscriber_of_the_channel_only(bus):
    async def main():
        async with bus.subscribe("req:1") as a, bus.subscribe("req:1") as b, bus.subscribe("req:2") as other:
            await bus.publish("req:1", {"type": "tokens", "text": "hi"})
            assert await a.get(2) == {"type": "tokens", "text": "hi"}
            assert await b.get(2) == {"type": "tokens", "text": "hi"}
            with pytest.raises(asyncio.TimeoutError):
                await other.get(0.2)
        await bus.close()

    asyncio.run(main())


def test_publish_sync_from_another_thread_preserves_order(bus):
    async def main():
        async with bus.subscribe("node:x") as sub:
            t = threading.Thread(target=lambda: [bus.publish_sync("node:x", {"i": i}) for i in range(50)])
            t.start()
            got = [(await sub.get(5))["i"] for _ in range(50)]
            t.join()
            assert got == list(range(50))
        await bus.close()

    asyncio.run(main())


def test_flags_are_set_once_until_cleared_or_expired(bus):
    assert bus.set_flag("dispatch", 0.3)
    assert not bus.set_flag("dispatch", 0.3)
    bus.clear_flag("dispatch")
    assert bus.set_flag("dispatch", 0.05)
    import time

    time.sleep(0.1)
    assert bus.set_flag("dispatch", 0.3)
    bus.clear_flag("dispatch")
    asyncio.run(bus.close())
