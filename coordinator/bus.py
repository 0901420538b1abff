"""The message bus between API replicas, the scheduler and node channels.

Channels carry small JSON dicts: `node:<id>` (assignments and cancels for a node's work
channel) and `req:<id>` (token chunks and the end of one request, for the buyer's
handler). In-memory within one process (embedded default); Redis pub/sub across
processes and replicas (production). Tokens never pass through Celery.

Pub/sub delivers nothing that was published while a subscriber was disconnected. So the
Redis bus tells every local subscription when its connection drops (`{"type":
"bus_lost"}`: messages may be missing from here on) and, once it has reconnected and
resubscribed, `{"type": "bus_restored"}`. Subscribing while Redis is down raises
`BusUnavailable` at once, so a caller can refuse work it could not relay.
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import threading
import time
from collections import defaultdict
from typing import Any

log = logging.getLogger(__name__)

BUS_LOST = {"type": "bus_lost"}
BUS_RESTORED = {"type": "bus_restored"}


class BusUnavailable(Exception):
    """The relay cannot carry messages right now (its server is unreachable)."""


class Subscription:
    def __init__(self, bus: "Bus", channel: str):
        self.bus, self.channel = bus, channel
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        self.on_close = None  # called once (in a worker thread) when the subscription closes

    def _deliver(self, message: dict[str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    async def get(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; raises TimeoutError after `timeout` seconds without one."""
        return await asyncio.wait_for(self.queue.get(), timeout)

    async def __aenter__(self) -> "Subscription":
        await self.bus._add(self)
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop receiving. Synchronous and never suspends, so it is safe in a `finally` of
        a cancelled task; the server-side unsubscribe (if any) happens in the background."""
        if not self.closed:
            self.closed = True
            self.bus._remove(self)
            if self.on_close is not None:
                self.loop.run_in_executor(None, self.on_close)


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
    def _remove(self, sub: Subscription) -> None: ...

    @property
    def healthy(self) -> bool:
        return True

    async def ensure_connected(self) -> None:
        """Raise BusUnavailable unless messages can flow now."""
        return None

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

    def _remove(self, sub: Subscription) -> None:
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
    """One pub/sub connection per event loop, fanned out to local subscriptions.

    One reader task owns the connection's reads; subscribe and unsubscribe only send, under
    a lock, and a subscribe waits for the server's confirmation (so nothing published after
    it returns can be missed). When the connection drops the reader tells every
    subscription, reconnects with backoff, resubscribes every channel still wanted, and
    tells them again. Connections skip `CLIENT SETINFO` (Redis before 7.2 refuses it).
    """

    ALIVE = "__alive__"  # always subscribed, so the connection exists before any request
    CONFIRM_TIMEOUT_S = 2.0

    def __init__(self, url: str, prefix: str = "agora:"):
        import redis
        import redis.asyncio as aredis

        self.url, self.prefix = url, prefix
        opts = {"lib_name": None, "lib_version": None, "socket_connect_timeout": 2.0, "health_check_interval": 5}
        self._sync = redis.Redis.from_url(url, socket_timeout=5.0, **opts)
        self._async = aredis.Redis.from_url(url, socket_timeout=5.0, **opts)
        self._aredis = aredis
        self._opts = opts
        self._conn_errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
        self._pubsub = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.Task | None = None
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._pending: dict[str, list[asyncio.Future]] = defaultdict(list)
        self._lock: asyncio.Lock | None = None
        self._up = False
        self._closing = False

    def _key(self, channel: str) -> str:
        return self.prefix + channel

    @property
    def healthy(self) -> bool:
        return self._up

    async def ensure_connected(self) -> None:
        await self._start()

    # ------------------------------------------------------------ connection
    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new event loop (tests)
            self._loop, self._lock, self._pubsub, self._up = loop, asyncio.Lock(), None, False
            self._reader = None
        if not self._up:  # not waiting for the reader's backoff: a caller wants it now
            async with self._lock:
                if not self._up:
                    was_lost = self._reader is not None
                    await self._connect()  # raises BusUnavailable while Redis is down
                    if was_lost:
                        log.warning("relay bus: reconnected to Redis; %d channels resubscribed", len(self._subs))
                        self._fan_out_all(BUS_RESTORED)
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read_loop())

    async def _connect(self) -> None:
        """A fresh pub/sub connection subscribed to every wanted channel (lock held)."""
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:  # noqa: BLE001 - the old connection is dead anyway
                pass
            self._pubsub = None
        client = self._aredis.Redis.from_url(self.url, **self._opts)
        pubsub = client.pubsub()
        try:
            await asyncio.wait_for(pubsub.subscribe(self._key(self.ALIVE), *[self._key(c) for c in self._subs]),
                                   self.CONFIRM_TIMEOUT_S)
        except Exception as exc:
            try:
                await pubsub.aclose()
            except Exception:  # noqa: BLE001
                pass
            raise BusUnavailable(f"relay bus unreachable: {type(exc).__name__}: {exc}") from exc
        self._pubsub, self._up = pubsub, True

    async def _read_loop(self) -> None:
        delay = 0.05
        while not self._closing:
            if not self._up:
                try:
                    async with self._lock:
                        if not self._up:
                            await self._connect()
                    log.warning("relay bus: reconnected to Redis; %d channels resubscribed", len(self._subs))
                    delay = 0.05
                    self._fan_out_all(BUS_RESTORED)
                except BusUnavailable:
                    await asyncio.sleep(delay)
                    delay = min(2.0, delay * 2)
                    continue
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - connection errors of every kind
                if self._closing:
                    return
                log.warning("relay bus: lost the Redis connection (%s: %s); telling %d channels",
                            type(exc).__name__, exc, len(self._subs))
                self._up = False
                self._fail_pending()
                self._fan_out_all(BUS_LOST)
                continue
            if msg is None:
                continue
            channel = msg["channel"].decode()[len(self.prefix):]
            if msg["type"] == "subscribe":
                for fut in self._pending.pop(channel, []):
                    if not fut.done():
                        fut.set_result(True)
            elif msg["type"] == "message":
                data = json.loads(msg["data"])
                for sub in list(self._subs.get(channel, ())):
                    sub.queue.put_nowait(data)

    def _fan_out_all(self, message: dict[str, Any]) -> None:
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.queue.put_nowait(dict(message))

    def _fail_pending(self) -> None:
        for futs in self._pending.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(BusUnavailable("relay bus connection lost while subscribing"))
        self._pending.clear()

    # ------------------------------------------------------------ subscriptions
    async def _add(self, sub: Subscription) -> None:
        await self._start()
        first = not self._subs[sub.channel]
        self._subs[sub.channel].add(sub)
        if not first:
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending[sub.channel].append(fut)
        try:
            async with self._lock:
                if not self._up:
                    raise BusUnavailable("relay bus is reconnecting")
                await self._pubsub.subscribe(self._key(sub.channel))
            await asyncio.wait_for(fut, self.CONFIRM_TIMEOUT_S)
        except BaseException as exc:
            sub.close()
            if isinstance(exc, (BusUnavailable, asyncio.CancelledError)):
                raise
            raise BusUnavailable(f"relay bus subscribe failed: {type(exc).__name__}: {exc}") from exc

    def _remove(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.channel)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self._subs[sub.channel]
            if self._up and self._loop is not None and not self._loop.is_closed():
                self._loop.create_task(self._unsubscribe(sub.channel))

    async def _unsubscribe(self, channel: str) -> None:
        try:
            async with self._lock:
                if self._up and channel not in self._subs:
                    await self._pubsub.unsubscribe(self._key(channel))
        except Exception:  # noqa: BLE001 - a dead connection forgets its channels anyway
            pass

    # ------------------------------------------------------------ publishing
    # A pooled connection from before a Redis restart fails its next command ("Connection
    # closed by server") and is dropped: a publish is tried once more, on a fresh connection.
    # Without it a buyer's `done` published just after the bus came back was lost, and its
    # stream hung until the client gave up (tests/chaos, the Redis case). Redis still down: the
    # second try is refused at once. A message the dead server never delivered is not doubled.
    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        data = json.dumps(message)
        for attempt in range(2):
            try:
                await self._async.publish(self._key(channel), data)
                return
            except Exception as exc:
                if attempt or not isinstance(exc, self._conn_errors):
                    raise BusUnavailable(f"relay bus publish failed: {type(exc).__name__}: {exc}") from exc

    def publish_sync(self, channel: str, message: dict[str, Any]) -> None:
        data = json.dumps(message)
        for attempt in range(2):
            try:
                self._sync.publish(self._key(channel), data)
                return
            except Exception as exc:
                if attempt or not isinstance(exc, self._conn_errors):
                    raise BusUnavailable(f"relay bus publish failed: {type(exc).__name__}: {exc}") from exc

    def set_flag(self, key: str, ttl_s: float) -> bool:
        try:
            return bool(self._sync.set(self._key("flag:" + key), b"1", nx=True, px=max(1, int(ttl_s * 1000))))
        except Exception as exc:
            raise BusUnavailable(f"relay bus unreachable: {type(exc).__name__}: {exc}") from exc

    def clear_flag(self, key: str) -> None:
        try:
            self._sync.delete(self._key("flag:" + key))
        except Exception as exc:
            raise BusUnavailable(f"relay bus unreachable: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
        if self._pubsub is not None:
            try:
                await self._pubsub.aclose()
            except Exception:  # noqa: BLE001
                pass
        await self._async.aclose()
        self._sync.close()


def make_bus(redis_url: str | None, prefix: str = "agora:") -> Bus:
    return RedisBus(redis_url, prefix) if redis_url else InMemoryBus()
