"""The seller coach's arithmetic: where an offer ranks, and what price would fill it.

Pure: plain numbers in, a decision out. The coordinator gathers the figures
(`coordinator/coach.py`) from the market view and the per-minute history.

Demand model (stated, simple, and what the suggestion's reason cites): buyers' demand for a
model is the completion tokens per minute it bought over the window; the scheduler fills the
cheapest offers per token first (at equal latency), each up to what it can serve
(`max_concurrency × measured tok/s`, at most `fill` of it); the offer being coached gets the
demand left by the offers cheaper than its price, up to its own capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

from pricing.money import NANO_PER_USD, request_cost


@dataclass(frozen=True)
class Seat:
    """One live offer of a model: price (nano-USD per Mtok out), speed, capacity, latency."""

    key: str
    price_out: int
    tok_s: float  # measured, per stream
    max_concurrency: int
    ttft_ms: float | None = None

    @property
    def tokens_per_usd(self) -> float:
        return NANO_PER_USD * 1e6 / self.price_out if self.price_out > 0 else float("inf")

    def capacity_per_min(self, fill: float) -> float:
        return self.tok_s * self.max_concurrency * 60.0 * fill

    def latency_ms(self, out_tokens: int) -> float:
        return (self.ttft_ms or 0.0) + 1000.0 * out_tokens / max(self.tok_s, 1e-9)


@dataclass(frozen=True)
class Rank:
    position: int | None  # 1 = most tokens per dollar among offers meeting the target; None: misses it
    of: int
    target_ms: float


@dataclass(frozen=True)
class Suggestion:
    price_out: int
    expected_utilisation: float
    expected_revenue_per_h: int  # nano-USD
    current_utilisation: float
    current_revenue_per_h: int
    reason: str


def rank(me: Seat, others: list[Seat], out_tokens: int) -> Rank:
    """Rank in tokens per dollar among the offers whose latency for a typical answer
    (`out_tokens`) is within the median of the market's (the median latency target)."""
    everyone = [me, *others]
    lat = sorted(s.latency_ms(out_tokens) for s in everyone)
    target = lat[len(lat) // 2]  # the upper median: at least half the offers meet it
    meeting = [s for s in everyone if s.latency_ms(out_tokens) <= target + 1e-9]
    if me not in meeting:
        return Rank(None, len(meeting), target)
    ordered = sorted(meeting, key=lambda s: (-s.tokens_per_usd, s.key))
    return Rank(ordered.index(me) + 1, len(meeting), target)


def served(price_out: int, me: Seat, others: list[Seat], demand_per_min: float, fill: float) -> float:
    """Tokens per minute `me` would serve at `price_out` under the demand model."""
    cheaper = sum(s.capacity_per_min(fill) for s in others if s.price_out < price_out)
    equal = [s for s in others if s.price_out == price_out]
    left = max(0.0, demand_per_min - cheaper)
    mine = me.capacity_per_min(fill)
    if equal:  # ties split what is left by capacity
        share = mine / (mine + sum(s.capacity_per_min(fill) for s in equal))
        return min(mine, left * share)
    return min(mine, left)


def suggest(me: Seat, others: list[Seat], demand_per_min: float, *, fill: float = 0.8,
            floor: int = 1) -> Suggestion:
    """The price (among the competitors' asks just undercut, and the current price) that
    earns the most per hour under the demand model; ties go to the higher utilisation."""
    full = max(me.capacity_per_min(1.0), 1e-9)

    def outcome(p: int) -> tuple[int, float]:
        tok = served(p, me, others, demand_per_min, fill)
        # revenue in integer nano-USD, charged as the ledger would: whole tokens at the price
        return request_cost(0, int(tok * 60), 0, p), tok / full

    prices = {me.price_out} | {max(floor, s.price_out - 1) for s in others} | {
        max(floor, s.price_out) for s in others}
    outcomes = {p: outcome(p) for p in prices}  # each candidate price evaluated once
    cur_rev, cur_util = outcomes[me.price_out]
    best = max(sorted(prices), key=lambda p: (*outcomes[p], p))
    rev, util = outcomes[best]
    usd = best / NANO_PER_USD
    cheaper = sum(1 for s in others if s.price_out < best)
    if demand_per_min < 0.01 * me.capacity_per_min(1.0):
        reason = (f"the recorded demand ({demand_per_min:,.0f} tokens/min) is under 1% of what your machine can serve: "
                  "too little to tell which price would fill it; keep the price until buyers arrive")
        best, rev, util = me.price_out, cur_rev, cur_util
    elif best == me.price_out:
        reason = (f"your price already earns the most under the recorded demand ({demand_per_min:,.0f} tokens/min): "
                  f"{cheaper} of {len(others)} competing offers are cheaper")
    elif best < me.price_out:
        reason = (f"at {usd:.4f} USD/Mtok you match or undercut {len(others) - cheaper} of {len(others)} competing offers; "
                  f"the recorded demand ({demand_per_min:,.0f} tokens/min) left after the cheaper offers' capacity "
                  f"fills {util:.0%} of your machine")
    else:
        reason = (f"demand ({demand_per_min:,.0f} tokens/min) exceeds what the offers below {usd:.4f} USD/Mtok can "
                  f"serve: you can ask more and still be {util:.0%} busy")
    return Suggestion(best, util, rev, cur_util, cur_rev, reason)
