"""Rate limits per API key and per node identity, refused cheaply with a 429.

Per buyer API key: requests per minute, tokens per minute (what a request may use: its
prompt's bound plus max_tokens, counted at admission) and concurrent requests. Per node
identity: signed messages per minute; per client address: registrations per minute.
Windows are moving windows of the `limits` library, in memory on the embedded market and in
Redis in production (shared by every API replica); concurrency is a Redis sorted set of the
requests in flight, each with an expiry, so a replica that dies leaks nothing for long.
A limit of 0 switches that limit off.
"""

from __future__ import annotations

import math
import threading
import time

from limits import RateLimitItemPerMinute, storage, strategies

from coordinator.errors import APIError, BadRequest, Unavailable
from coordinator.settings import CoordinatorSettings


class RateLimited(APIError):
    status_code = 429
    type = "requests"
    code = "rate_limit_exceeded"


class RateLimiter:
    def __init__(self, settings: CoordinatorSettings):
        self.s = settings
        url = settings.redis_url
        if url:
            self._storage = storage.storage_from_string(url, lib_name=None, lib_version=None,
                                                        key_prefix=f"{settings.redis_prefix}rl")
            import redis

            self._redis = redis.Redis.from_url(url, lib_name=None, lib_version=None, socket_timeout=2.0)
            self._down = (redis.exceptions.RedisError, OSError)
        else:
            self._storage = storage.MemoryStorage()
            self._redis = None
            self._down = ()
        self._window = strategies.MovingWindowRateLimiter(self._storage)
        self._local: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------ windows
    def _unreachable(self, exc: Exception) -> Unavailable:
        """Redis down: a 503 the client retries, not a 500 (nothing was counted or admitted)."""
        return Unavailable(f"the market's rate limiter is unreachable ({type(exc).__name__}); retry shortly")

    def _hit(self, per_minute: int, key: str, what: str, cost: int = 1) -> None:
        try:
            self._hit_window(per_minute, key, what, cost)
        except self._down as exc:
            raise self._unreachable(exc) from exc

    def _hit_window(self, per_minute: int, key: str, what: str, cost: int = 1) -> None:
        if per_minute <= 0:
            return
        item = RateLimitItemPerMinute(per_minute)
        if cost > per_minute:  # it could never pass: not worth a retry
            raise BadRequest(f"this request alone ({cost} {what}: prompt bytes + max_tokens) is over the limit of "
                             f"{per_minute} {what} per minute; lower max_tokens", code="request_exceeds_rate_limit")
        if not self._window.hit(item, key, cost=cost):
            reset = self._window.get_window_stats(item, key).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise RateLimited(f"rate limit of {per_minute} {what} per minute reached; retry in {wait}s",
                              retry_after_s=wait)

    def buyer_request(self, account_id: str, tokens: int) -> None:
        """Count one request that may use `tokens` tokens; raise RateLimited if over."""
        self._hit(self.s.rate_limit_requests_per_min, f"req:{account_id}", "requests")
        self._hit(self.s.rate_limit_tokens_per_min, f"tok:{account_id}", "tokens", cost=max(1, tokens))

    @property
    def in_memory(self) -> bool:
        """No Redis: every check is a few dictionary operations, fine on the event loop."""
        return self._redis is None

    def admit(self, account_id: str, tokens: int, request_id: str) -> bool:
        """`buyer_request`, then `acquire` (one trip to a worker thread where Redis is used)."""
        self.buyer_request(account_id, tokens)
        return self.acquire(account_id, request_id)

    def node_message(self, node_id: str) -> None:
        self._hit(self.s.node_rate_limit_per_min, f"node:{node_id}", "signed messages")

    def registration(self, client: str) -> None:
        self._hit(self.s.registration_rate_limit_per_min, f"reg:{client}", "registrations")

    def sign_in(self, client: str) -> None:
        """Dashboard sign-in attempts per client address (guessing tokens or keys)."""
        self._hit(self.s.registration_rate_limit_per_min, f"login:{client}", "sign-in attempts")

    # ------------------------------------------------------------ concurrency
    def acquire(self, account_id: str, request_id: str) -> bool:
        """Take one of the key's concurrent-request slots (held at most `request_ttl_s`).
        False if it has none left; `Unavailable` (503) while Redis is unreachable."""
        limit = self.s.rate_limit_concurrent
        if limit <= 0:
            return True
        now = time.time()
        expiry = now + self.s.request_ttl_s
        if self._redis is None:
            with self._lock:
                held = {r: t for r, t in self._local.get(account_id, {}).items() if t > now}
                if len(held) >= limit:
                    self._local[account_id] = held
                    return False
                held[request_id] = expiry
                self._local[account_id] = held
                return True
        try:
            return self._acquire_in_redis(account_id, request_id, now, expiry, limit)
        except self._down as exc:
            raise self._unreachable(exc) from exc

    def _acquire_in_redis(self, account_id: str, request_id: str, now: float, expiry: float, limit: int) -> bool:
        key = f"{self.s.redis_prefix}conc:{account_id}"
        pipe = self._redis.pipeline()
        pipe.zremrangebyscore(key, "-inf", now)
        pipe.zcard(key)
        _, count = pipe.execute()
        if count >= limit:
            return False
        pipe = self._redis.pipeline()
        pipe.zadd(key, {request_id: expiry})
        pipe.expire(key, int(self.s.request_ttl_s) + 60)
        pipe.zcard(key)
        _, _, after = pipe.execute()
        if after > limit:  # lost a race with another replica: give the slot back
            self._redis.zrem(key, request_id)
            return False
        return True

    def release(self, account_id: str, request_id: str) -> None:
        if self.s.rate_limit_concurrent <= 0:
            return
        if self._redis is None:
            with self._lock:
                self._local.get(account_id, {}).pop(request_id, None)
            return
        try:
            self._redis.zrem(f"{self.s.redis_prefix}conc:{account_id}", request_id)
        except Exception:  # noqa: BLE001 - the slot expires by itself
            pass

    def concurrency_refusal(self) -> RateLimited:
        return RateLimited(f"at most {self.s.rate_limit_concurrent} requests of one API key may be in flight; "
                           "retry when one has finished", retry_after_s=1)
