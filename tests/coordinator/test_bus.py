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


def test_redis_bus_tells_subscribers_of_an_outage_and_recovers_by_itself(own_redis):
    """Redis killed under a live subscription: the subscriber hears `bus_lost` at once
    (messages may be missing), subscribing meanwhile fails fast, and once Redis is back
    the bus reconnects, resubscribes and says `bus_restored`; messages flow again."""
    from coordinator.bus import BusUnavailable

    bus = RedisBus(own_redis.url, "t:")

    async def main():
        async with bus.subscribe("req:1") as sub:
            await bus.publish("req:1", {"i": 1})
            assert await sub.get(2) == {"i": 1}
            own_redis.kill()
            assert await sub.get(5) == {"type": "bus_lost"}
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(BusUnavailable):
                async with bus.subscribe("req:2"):
                    pass
            with pytest.raises(BusUnavailable):
                await bus.publish("req:1", {"i": 2})
            assert asyncio.get_running_loop().time() - t0 < 5  # refused quickly, not hung
            assert not bus.healthy
            own_redis.start()
            assert await sub.get(10) == {"type": "bus_restored"}
            assert bus.healthy
            await bus.publish("req:1", {"i": 3})
            assert await sub.get(2) == {"i": 3}
            async with bus.subscribe("req:2") as other:  # new subscriptions work again
                await bus.publish("req:2", {"i": 4})
                assert await other.get(2) == {"i": 4}
        await bus.close()

    asyncio.run(main())


def test_publishes_right_after_redis_restarts_are_not_lost(own_redis):
    """Connections pooled before a Redis restart are dead; the first publishes after the bus
    came back must still arrive (a lost `done` left a buyer's stream hanging)."""
    bus = RedisBus(own_redis.url, "t:")

    async def main():
        async with bus.subscribe("req:1") as sub:
            await asyncio.gather(*(bus.publish("req:1", {"i": i}) for i in range(8)))  # several pooled connections
            assert sorted([(await sub.get(2))["i"] for _ in range(8)]) == list(range(8))
            own_redis.kill()
            assert await sub.get(5) == {"type": "bus_lost"}
            own_redis.start()
            assert await sub.get(10) == {"type": "bus_restored"}
            await asyncio.gather(*(bus.publish("req:1", {"i": i}) for i in range(8, 16)))
            assert sorted([(await sub.get(2))["i"] for _ in range(8)]) == list(range(8, 16))
            for i in range(16, 20):
                await asyncio.to_thread(bus.publish_sync, "req:1", {"i": i})
                assert await sub.get(2) == {"i": i}
        await bus.close()

    asyncio.run(main())


def test_redis_bus_skips_client_setinfo_for_old_servers(redis_url):
    """Redis before 7.2 refuses CLIENT SETINFO, which redis-py sends on connect by default."""
    bus = RedisBus(redis_url, "t:")
    for client in (bus._sync, bus._async):
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs.get("lib_name") is None and kwargs.get("lib_version") is None
    asyncio.run(bus.close())
