"""The seller coach's arithmetic: rank at the median latency target and the suggested price
under the stated demand model (cheapest offers per token fill first)."""

from __future__ import annotations

from pricing.coach import Seat, rank, served, suggest

USD = 10**9


def seat(key: str, usd: float, tok_s: float = 50.0, conc: int = 4, ttft: float = 100.0) -> Seat:
    return Seat(key=key, price_out=int(usd * USD), tok_s=tok_s, max_concurrency=conc, ttft_ms=ttft)


def test_rank_counts_only_offers_that_meet_the_median_latency_target():
    me = seat("me", 0.30)
    cheap_slow = seat("slow", 0.05, tok_s=5)  # cheapest, but far too slow for a typical answer
    others = [cheap_slow, seat("a", 0.20), seat("b", 0.40)]
    r = rank(me, others, out_tokens=128)
    assert (r.position, r.of) == (2, 3)  # behind "a" only; "slow" misses the target
    assert rank(cheap_slow, [me, *others[1:]], 128).position is None


def test_demand_fills_the_cheapest_offers_first():
    me = seat("me", 0.30)  # capacity 50 × 4 × 60 × 0.8 = 9,600 tokens/min
    others = [seat("a", 0.20)]  # 9,600 tokens/min before me
    assert served(me.price_out, me, others, demand_per_min=5_000, fill=0.8) == 0
    assert served(me.price_out, me, others, demand_per_min=15_000, fill=0.8) == 15_000 - 9_600
    assert served(int(0.19 * USD), me, others, demand_per_min=5_000, fill=0.8) == 5_000  # undercut: first in line


def test_undercutting_is_suggested_when_the_cheaper_offers_absorb_the_demand():
    me = seat("me", 0.30)
    s = suggest(me, [seat("a", 0.20), seat("b", 0.50)], demand_per_min=6_000)
    assert s.price_out == int(0.20 * USD) - 1 and s.current_utilisation == 0
    assert s.expected_utilisation == 6_000 / (50 * 4 * 60)
    assert s.expected_revenue_per_h > s.current_revenue_per_h and "undercut" in s.reason


def test_a_busy_market_lets_a_seller_ask_more():
    me = seat("me", 0.10)
    s = suggest(me, [seat("a", 0.20), seat("b", 0.30)], demand_per_min=40_000)  # more than everyone can serve
    assert s.price_out > me.price_out and s.expected_utilisation == s.current_utilisation == 0.8
    assert s.expected_revenue_per_h > s.current_revenue_per_h


def test_too_little_recorded_demand_keeps_the_price():
    me = seat("me", 0.30)  # 12,000 tokens/min at full load
    for demand in (0, 100):  # under 1% of that: no basis for a suggestion
        s = suggest(me, [seat("a", 0.20)], demand_per_min=demand)
        assert s.price_out == me.price_out and "too little" in s.reason
    assert suggest(me, [seat("a", 0.20)], demand_per_min=200).price_out != me.price_out
