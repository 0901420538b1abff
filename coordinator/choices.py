"""Relaying the choices of a request to the buyer: each choice is one request on the market.

`n` > 1 is served as n independent requests (ids `req_...`, one per choice), admitted,
routed and held together in ONE transaction (`completions.handle`: every choice's escrow
hold is placed, or none is and the buyer gets one 402 for the total), then each is
relayed, settled, audited and failed over on its own like any request. The ledger keeps
one two-phase hold per choice: a hold posts once (`pricing.ledger.settle_hold`), and each
choice ends at its own time on its own node, so one hold per choice is what lets a
choice's unused part come back the moment it ends; the buyer's charge is the sum of the
choices' charges, and `usage` is that sum (the prompt counts once per choice: every node
reads it).

Non-streamed: the choices are gathered concurrently and answered together; if one fails,
the buyer gets that error and pays for none (nothing was written). Streamed: the choices'
chunks are interleaved as they come, each with its `index`; a choice's tokens count as
written once the server resumes after handing over its chunk (as for one choice).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from coordinator import metrics
from coordinator import openai_format as fmt
from coordinator.delivery import Delivery, Quote
from coordinator.endings import acknowledged
from coordinator.errors import APIError, NoCapacity, RelayInterrupted, UpstreamFailed
from coordinator.logprobs_format import LogprobsBuilder


def error_from(msg: dict) -> APIError:
    """The buyer's error for a node's or the market's `error` message."""
    status = int(msg.get("status", 502))
    cls = NoCapacity if status == 503 else UpstreamFailed
    err = cls(msg.get("message", "the request failed"), code=msg.get("code"))
    err.status_code = status
    if status == 400:
        err.type = "invalid_request_error"
    return err


def usage_of(msg: dict, written: int) -> dict:
    """The usage the buyer sees: exactly what settlement will charge for `written` tokens."""
    quote = Quote.from_dict(msg["quote"])
    return fmt.usage(quote.prompt_tokens, written, quote.buyer_cost(written, Delivery.COMPLETE))


def total_usage(parts: list[dict]) -> dict:
    return fmt.usage(sum(u["prompt_tokens"] for u in parts), sum(u["completion_tokens"] for u in parts),
                     sum(u["cost_nano_usd"] for u in parts))


async def gather_one(stream, msg: dict, lp: LogprobsBuilder | None) -> tuple[str, int, dict]:
    """Read one choice to its end: (text, tokens, its `done` message). It finishes the stream
    itself only when it fails (nothing was written to the buyer); on success the caller
    finishes it once it knows the buyer gets the answer."""
    parts: list[str] = []
    count = 0
    last = None
    try:
        while msg["type"] == "tokens":
            parts.append(msg["text"])
            count += msg["count"]
            if lp is not None:
                lp.part(msg)
            metrics.TOKENS.inc(msg["count"])
            last = metrics.observe_gap(last, msg["count"])
            msg = await stream.next()
    except RelayInterrupted:
        stream.finish(0, Delivery.RELAY_BROKEN)
        raise
    except BaseException:
        stream.finish(0, None)
        raise
    if msg["type"] == "error":  # the request failed unpaid
        raise error_from(msg)
    return "".join(parts), count, msg


async def collect_many(streams: list, firsts: list[dict], model: str, kind: str,
                       builders: list[LogprobsBuilder | None]) -> tuple[dict, list[int]]:
    """The whole answer of n choices and each one's token count; every stream is finished."""
    created = fmt.now()
    results = await asyncio.gather(*(gather_one(s, f, b) for s, f, b in zip(streams, firsts, builders)),
                                   return_exceptions=True)
    failed = next((r for r in results if isinstance(r, BaseException)), None)
    if failed is not None:
        for s, r in zip(streams, results):
            if not isinstance(r, BaseException):
                s.finish(0, None)  # the buyer gets the error, not this choice: it pays nothing for it
        raise failed
    choices, usages = [], []
    for k, (s, (text, count, done), b) in enumerate(zip(streams, results, builders)):
        choices.append(fmt.choice(kind, text, done["finish_reason"], b.whole() if b else None, index=k))
        usages.append(usage_of(done, count))
    body = fmt.whole_of(kind, streams[0].rid, model, created, choices, total_usage(usages),
                        results[0][2].get("node_id"))
    await acknowledged(*(s.finish(count, Delivery.COMPLETE) for s, (_, count, _) in zip(streams, results)))
    return body, [r[1] for r in results]


async def sse_many(streams: list, firsts: list[dict], model: str, kind: str, include_usage: bool,
                   builders: list[LogprobsBuilder | None], remember=None) -> AsyncIterator[bytes]:
    """The SSE body of n choices, interleaved as their tokens arrive (see the module doc)."""
    n = len(streams)
    rid, created = streams[0].rid, fmt.now()
    queue: asyncio.Queue = asyncio.Queue()
    tasks: set[asyncio.Task] = set()

    def pull(k: int) -> None:
        async def _one():
            try:
                queue.put_nowait((k, await streams[k].next()))
            except BaseException as exc:  # noqa: BLE001 - handed to the generator
                queue.put_nowait((k, exc))
        t = asyncio.create_task(_one())
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    for k, f in enumerate(firsts):
        queue.put_nowait((k, f))
    first = [True] * n
    written, pending = [0] * n, [0] * n
    texts: list[list[str]] = [[] for _ in range(n)]
    dones: list[dict | None] = [None] * n
    acks = []  # each completed choice's ending, written before the usage is sent
    ended = [False] * n  # each choice's side ended as it should (answer, error or interruption)
    last = None
    try:
        while not all(ended):
            k, msg = await queue.get()
            if isinstance(msg, BaseException):
                raise msg
            if msg["type"] == "tokens":
                texts[k].append(msg["text"])
                pending[k] += msg["count"]
                metrics.TOKENS.inc(msg["count"])
                last = metrics.observe_gap(last, msg["count"])
                part = builders[k].part(msg) if builders[k] is not None else None
                if msg["text"] or first[k] or part:
                    yield fmt.sse(fmt.chunk(kind, rid, model, created, text=msg["text"], first=first[k],
                                            logprobs=part, index=k))
                    first[k] = False
                    written[k], pending[k] = written[k] + pending[k], 0
                pull(k)
                continue
            if msg["type"] == "error":  # this choice failed unpaid: the others stop here
                ended[k] = True
                metrics.REQUESTS.labels(outcome=str(msg.get("status", 502))).inc()
                yield fmt.sse({"error": error_from(msg).body()["error"]})
                break
            yield fmt.sse(fmt.chunk(kind, rid, model, created, first=first[k], finish_reason=msg["finish_reason"],
                                    index=k))
            written[k], pending[k] = written[k] + pending[k], 0
            ended[k], dones[k] = True, msg
            acks.append(streams[k].finish(written[k], Delivery.COMPLETE))
        if all(d is not None for d in dones):
            metrics.REQUESTS.labels(outcome="200").inc()
            usage = total_usage([usage_of(d, w) for d, w in zip(dones, written)])
            if include_usage:
                await acknowledged(*acks)  # what the usage says is what settlement charges
                yield fmt.sse(fmt.usage_chunk(kind, rid, model, created, usage))
            if remember is not None:
                await remember(fmt.whole_of(kind, rid, model, created, [
                    fmt.choice(kind, "".join(texts[k]), dones[k]["finish_reason"],
                               builders[k].whole() if builders[k] else None, index=k) for k in range(n)],
                    usage, dones[0].get("node_id")))
        yield fmt.sse("[DONE]")
    except RelayInterrupted as exc:
        ended[k] = True
        streams[k].finish(written[k], Delivery.RELAY_BROKEN)
        metrics.REQUESTS.labels(outcome="503").inc()
        yield fmt.sse({"error": exc.body()["error"]})
        yield fmt.sse("[DONE]")
    except APIError as exc:  # timed out: that choice failed unpaid
        ended[k] = True
        yield fmt.sse({"error": exc.body()["error"]})
        yield fmt.sse("[DONE]")
    finally:
        for t in list(tasks):
            t.cancel()
        for j, s in enumerate(streams):
            if not ended[j]:  # the buyer went away, or another choice failed: it pays what it was written
                s.finish(written[j], None)
            s.sub.close()
