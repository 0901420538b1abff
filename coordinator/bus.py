"""The message bus between API replicas, the scheduler and node channels.

Channels carry small JSON dicts: `node:<id>` (assignments and cancels for a node's work
channel) and `req:<id>` (token chunks and the end of one request, for the buyer's
handler). In-memory within one process (embedded default); Redis pub/sub across
processes and replicas (production). Tokens never pass through Celery.
"""

from __future__ import annotations

import abc
import asyncio
import json
import threading
from collections import defaultdict
from typing import Any


class Subscription:
    def __init__(self, bus: "Bus", channel: str):
        self.bus, self.channel = bus, channel
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()

    def _deliver(self, message: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; raises TimeoutError after `timeout` seconds without one."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def __aenter__(self) -> "Subscription":
        await self.bus._add(self)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.bus._remove(self)


class Bus(abc.ABC):
    def subscribe(self, channel: str) -> Subscription:
        return Subscription(self, channel)

    @abc.abstractmethod
    async def publish(self, channel: str, message: dict[str, Any]) -> None: ...

    @abc.abstractmethod
    def publish_sync(self, channel: str, message: dict[str, Any]) -> None:
        """From synchronous code (Celery tasks), any thread."""

    @abc.abstractmethod
    def set_flag(self, key: str, ttl_s: float) -> bool:
        """Set `key` for `ttl_s` seconds if unset; True if this call set it."""

    @abc.abstractmethod
    def clear_flag(self, key: str) -> None: ...

    @abc.abstractmethod
    async def _add(self, sub: Subscription) -> None: ...

    @abc.abstractmethod
    async def _remove(self, sub: Subscription) -> None: ...

    async def close(self) -> None:
        return None


class InMemoryBus(Bus):
    def __init__(self) -> None:
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = threading.Lock()
        self._flags: dict[str, float] = {}

    async def _add(self, sub: Subscription) -> None:
        with self._lock:
            self._subs[sub.channel].add(sub)

    async def _remove(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.channel)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[sub.channel]

    def publish_sync(self, channel: str, message: dict[str, Any]) -> None:
        with self._lock:
            targets = list(self._subs.get(channel, ()))
        for sub in targets:
            try:
                sub._deliver(message)
            except RuntimeError:  # its event loop is closed: the subscriber is gone
                pass

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        self.publish_sync(channel, message)

    def set_flag(self, key: str, ttl_s: float) -> bool:
        import time

        now = time.monotonic()
        with self._lock:
            if self._flags.get(key, 0.0) > now:
                return False
            self._flags[key] = now + ttl_s
            return True

    def clear_flag(self, key: str) -> None:
        with self._lock:
            self._flags.pop(key, None)


class RedisBus(Bus):
    """One pub/sub connection per process, fanned out to local subscriptions."""

    def __init__(self, url: str, prefix: str = "agora:"):
        import redis
        import redis.asyncio as aredis

        self.url, self.prefix = url, prefix
        self._sync = redis.Redis.from_url(url)
        self._async = aredis.Redis.from_url(url)
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._lock = asyncio.Lock()

    def _key(self, channel: str) -> str:
        return self.prefix + channel

    async def _ensure_reader(self) -> None:
        if self._pubsub is None:
            self._pubsub = self._async.pubsub(ignore_subscribe_messages=True)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read_loop())

    async def _read_loop(self) -> None:
        while True:
            if not self._pubsub.subscribed:
                await asyncio.sleep(0.01)
                continue
            msg = await self._pubsub.get_message(timeout=1.0)
            if msg is None or msg.get("type") != "message":
                continue
            channel = msg["channel"].decode()[len(self.prefix):]
            data = json.loads(msg["data"])
            for sub in list(self._subs.get(channel, ())):
                sub.queue.put_nowait(data)

    async def _add(self, sub: Subscription) -> None:
        async with self._lock:
            await self._ensure_reader()
            first = not self._subs[sub.channel]
            self._subs[sub.channel].add(sub)
            if first:
                await self._pubsub.subscribe(self._key(sub.channel))

    async def _remove(self, sub: Subscription) -> None:
        async with self._lock:
            subs = self._subs.get(sub.channel)
            if subs is None:
                return
            subs.discard(sub)
            if not subs:
                del self._subs[sub.channel]
                await self._pubsub.unsubscribe(self._key(sub.channel))

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        await self._async.publish(self._key(channel), json.dumps(message))

    def publish_sync(self, channel: str, message: dict[str, Any]) -> None:
        self._sync.publish(self._key(channel), json.dumps(message))

    def set_flag(self, key: str, ttl_s: float) -> bool:
        return bool(self._sync.set(self._key("flag:" + key), b"1", nx=True, px=max(1, int(ttl_s * 1000))))

    def clear_flag(self, key: str) -> None:
        self._sync.delete(self._key("flag:" + key))

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self._async.aclose()
        self._sync.close()


def make_bus(redis_url: str | None, prefix: str = "agora:") -> Bus:
    return RedisBus(redis_url, prefix) if redis_url else InMemoryBus()
