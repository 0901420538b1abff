"""The response cache: a deterministic request sent again is answered from the first answer,
without a node, at the operator's cache price.

Opt-in. An account's `response_cache` flag (PATCH /v1/account, `agora account cache`) is
its default; a request's `X-Agora-Cache` header overrides it:

- `use`: answer from the cache if the same request was answered before, else from the
  market, and keep that answer;
- `refresh`: answer from the market and keep the new answer in place of the old one;
- `skip`: neither read nor write the cache.

Only deterministic requests take part (temperature 0, or a seed given), with n = 1 and no
log-probs (those bypass it). The key is exact: the account, chat or completion, and every
field of the body that can change the answer (model, messages or prompt, max_tokens,
temperature, top_p, top_k, seed, stop, echo, routing preferences, unknown extra fields);
`stream`, `stream_options`, `user` and `metadata` are not part of it. The account id is in
the key, and the entry names its account: one buyer never reads another's answers.

A hit is charged `response_cache_price_per_request` + `response_cache_price_per_mtok` ×
(prompt + completion tokens of the cached answer) / 1M (0 by default) from the buyer to the
platform's fees, idempotently (`cache:<request id>`). Its `usage` carries the original
answer's token counts, the price as `cost_nano_usd` and `"cached": true`; the response has
`X-Agora-Cache: hit` and a `Server-Timing` header. It leaves a request record (completed,
`cached`, no node) so usage and history see it: written before the answer when money moves
or an Idempotency-Key is given (a retry with that key replays this answer, uncharged),
else after it, in a worker thread (a process that dies there loses the record, never money).

Idempotency and the cache stay apart: a keyed replay is not a hit, and a hit is a new
request with a new id. Only answers that completed (finish_reason stop or length, the buyer
written all of it) are kept (`fill`), up to `response_cache_entry_bytes` each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from coordinator import metrics
from coordinator import openai_format as fmt
from coordinator.admission import body_hash, new_request_id
from coordinator.errors import BadRequest, Conflict, InsufficientBalance
from coordinator.models import Account, InferenceRequest, RequestStatus
from coordinator.models.account import utcnow
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from pricing.ledger import InsufficientFunds, Ledger
from pricing.money import TOKENS_PER_PRICE_UNIT

log = logging.getLogger(__name__)

HEADER = "X-Agora-Cache"
MODES = ("use", "refresh", "skip")
NOT_IN_KEY = {"stream", "stream_options", "user", "metadata"}  # they change nothing in the answer
KEPT_FINISH = ("stop", "length")

Body = ChatCompletionRequest | CompletionRequest


def mode_of(account: Account, header: str | None) -> str:
    if header is None:
        return "use" if account.response_cache else "skip"
    mode = header.strip().lower()
    if mode not in MODES:
        raise BadRequest(f"{HEADER} must be one of {', '.join(MODES)}, not {header[:20]!r}", param=HEADER,
                         code="invalid_cache_mode")
    return mode


def cacheable(body: Body) -> bool:
    """Deterministic (greedy, or seeded), one choice, no log-probs."""
    wants_logprobs = getattr(body, "wants_logprobs", None)
    return ((body.temperature == 0 or body.seed is not None) and getattr(body, "n", 1) == 1
            and not (wants_logprobs() if wants_logprobs else getattr(body, "logprobs", None)))


def cache_key(account_id: str, body: Body, kind: str) -> str:
    data = body.model_dump(mode="json", exclude=NOT_IN_KEY)
    return hashlib.sha256(json.dumps([account_id, kind, data], sort_keys=True).encode()).hexdigest()


def price_of(settings, tokens: int) -> int:
    return settings.response_cache_price_per_request + tokens * settings.response_cache_price_per_mtok \
        // TOKENS_PER_PRICE_UNIT


@dataclass(frozen=True)
class Keep:
    """Where to keep this request's answer once it completes (`fill`)."""
    key: str
    account_id: str


@dataclass
class Hit:
    body: dict  # the whole response, as a completed request's
    headers: dict


async def consult(rt, account: Account, body: Body, kind: str, header: str | None,
                  idempotency_key: str | None, started: float) -> tuple[Hit | None, Keep | None]:
    """(the cached answer to serve, or None; where to keep this request's answer, or None).
    Called before admission: a hit holds nothing and touches no node."""
    mode = mode_of(account, header)
    if mode == "skip" or not cacheable(body):
        return None, None
    key = cache_key(account.id, body, kind)
    if mode == "refresh":
        return None, Keep(key, account.id)
    store = rt.response_cache
    raw = await run_in_threadpool(store.get, key) if store.remote else store.get(key)
    entry = json.loads(raw) if raw else None
    if entry is None or entry.get("account") != account.id:
        return None, Keep(key, account.id)
    return await _serve(rt, account, body, kind, entry["body"], idempotency_key, started), None


async def _serve(rt, account: Account, body: Body, kind: str, cached: dict, idempotency_key: str | None,
                 started: float) -> Hit:
    rid = new_request_id()
    u = cached["usage"]
    prompt, completion = int(u["prompt_tokens"]), int(u["completion_tokens"])
    price = price_of(rt.settings, prompt + completion)
    whole = {**cached, "id": rid, "created": fmt.now(),
             "usage": {**fmt.usage(prompt, completion, price), "cached": True}}
    now = utcnow()
    payload = {"cached_from": cached["id"]}
    if idempotency_key:
        payload["idempotency_hash"] = body_hash(body, kind)
    record = InferenceRequest(
        id=rid, account_id=account.id, model=body.model, kind=kind, status=RequestStatus.COMPLETED,
        payload=payload, routing={}, idempotency_key=idempotency_key,
        response=whole if idempotency_key else None, prompt_tokens_est=prompt,
        max_tokens=body.requested_max_tokens() or max(1, completion), prompt_tokens=prompt,
        completion_tokens=completion, cost=price, delivered_tokens=completion, delivery="complete",
        finish_reason=whole["choices"][0].get("finish_reason"), cached=True, created_at=now, finished_at=now)

    def _write():
        with rt.session() as s:
            s.add(record)
            s.flush()
            if price:
                Ledger(s).charge(account.ledger_account_id, price, kind="cache", idempotency_key=f"cache:{rid}",
                                 request_ref=rid)

    if price or idempotency_key:  # money moves, or a retry must find it: before the answer
        try:
            await run_in_threadpool(_write)
        except InsufficientFunds as exc:
            raise InsufficientBalance(f"balance {exc.available} nano-USD is short of the cache price "
                                      f"{exc.needed} nano-USD") from exc
        except IntegrityError:
            raise Conflict("a request with this Idempotency-Key is already in progress",
                           code="idempotency_conflict") from None
    else:  # nothing to pay: the record follows the answer
        asyncio.get_running_loop().run_in_executor(None, _write_logged, _write, rid)
    metrics.REQUESTS.labels(outcome="cached").inc()
    elapsed_ms = (time.monotonic() - started) * 1000
    return Hit(whole, {"X-Agora-Request-Id": rid, HEADER: "hit", "Server-Timing": f"cache;dur={elapsed_ms:.3f}"})


def _write_logged(write, rid: str) -> None:
    try:
        write()
    except Exception:  # noqa: BLE001 - a record lost, no money (the price was 0)
        log.exception("cache hit %s: its request record was not written", rid)


async def fill(rt, keep: Keep, whole: dict) -> None:
    """Keep a completed answer (see the module docstring for which are kept)."""
    choices = whole.get("choices") or []
    if len(choices) != 1 or choices[0].get("finish_reason") not in KEPT_FINISH:
        return
    raw = json.dumps({"account": keep.account_id, "body": whole}, separators=(",", ":")).encode()
    if len(raw) > rt.settings.response_cache_entry_bytes:
        return
    store = rt.response_cache
    if store.remote:
        await run_in_threadpool(store.put, keep.key, raw)
    else:
        store.put(keep.key, raw)
