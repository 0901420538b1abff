"""Where the response cache keeps its answers: one small interface, two stores.

- `MemoryStore`: a dict in the process (the embedded market: one process serves every buyer).
- `RedisStore`: Redis in production, shared by every API replica (`AGORA_REDIS_URL`).

Both keep an entry `ttl_s` after it was written and at most `entries` entries: beyond that
the oldest written go first. Values are opaque bytes; a key is whatever the caller chose
(`response_cache.cache_key`). A store that fails (Redis down) answers a miss and drops the
write: a cache is never a reason for a request to fail.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

log = logging.getLogger(__name__)


class MemoryStore:
    remote = False  # every call is a few dict operations: fine on the event loop

    def __init__(self, entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        self.entries, self.ttl_s, self.clock = entries, ttl_s, clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # oldest written first
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is None:
                return None
            if hit[0] <= self.clock():
                del self._data[key]
                return None
            return hit[1]

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._data.pop(key, None)  # written again: it is the newest now
            self._data[key] = (self.clock() + self.ttl_s, value)
            while len(self._data) > self.entries:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


# One round trip per write: the entry with its expiry, its place in the index (scored by
# Redis's own clock, so replicas' clocks do not matter), expired index members dropped,
# the oldest beyond the bound evicted.
_PUT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
redis.call('ZADD', KEYS[2], now, KEYS[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over > 0 then
  local old = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #old, 2 do redis.call('DEL', old[i]) end
end
redis.call('PEXPIRE', KEYS[2], ttl)
return over
"""


class RedisStore:
    remote = True  # a network round trip: callers on the event loop use a worker thread

    def __init__(self, url: str, prefix: str, entries: int, ttl_s: float):
        import redis

        self.entries, self.ttl_ms = entries, max(1, int(ttl_s * 1000))
        self.prefix = f"{prefix}rc:"
        self.index = f"{prefix}rc-index"
        self._redis = redis.Redis.from_url(url, lib_name=None, lib_version=None, socket_timeout=1.0,
                                           socket_connect_timeout=1.0)
        self._put = self._redis.register_script(_PUT)

    def get(self, key: str) -> bytes | None:
        import redis

        try:
            return self._redis.get(self.prefix + key)
        except redis.RedisError as exc:
            log.warning("response cache: Redis read failed (%s); treated as a miss", exc)
            return None

    def put(self, key: str, value: bytes) -> None:
        import redis

        try:
            self._put(keys=[self.prefix + key, self.index], args=[value, self.ttl_ms, self.entries])
        except redis.RedisError as exc:
            log.warning("response cache: Redis write failed (%s); the answer is not cached", exc)

    def __len__(self) -> int:
        return int(self._redis.zcard(self.index))


def make_store(settings) -> MemoryStore | RedisStore:
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.redis_prefix, settings.response_cache_entries,
                          settings.response_cache_ttl_s)
    return MemoryStore(settings.response_cache_entries, settings.response_cache_ttl_s)
