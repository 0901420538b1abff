"""Money: integer nano-USD, prices per million tokens, floor once on the sum."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from pricing.money import NANO_PER_USD, fee_of, request_cost


def test_units():
    assert NANO_PER_USD == 10**9
    # $0.01 per million tokens: one token costs exactly 10 nano-USD
    assert request_cost(1, 0, 10_000_000, 0) == 10
    assert request_cost(0, 1, 0, 10_000_000) == 10
    # $2 / $6 per Mtok, 1000 prompt + 500 completion = $0.002 + $0.003
    assert request_cost(1000, 500, 2 * NANO_PER_USD, 6 * NANO_PER_USD) == 5_000_000


def test_floor_once_on_the_sum_in_the_buyers_favour():
    # 1 nano-USD per Mtok: each part alone floors to 0, the exact total is 1.5 -> 1
    assert request_cost(750_000, 750_000, 1, 1) == 1
    assert request_cost(999_999, 0, 1, 0) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_rejects_non_integers_and_negatives(bad):
    with pytest.raises(ValueError):
        request_cost(bad, 0, 1, 1)


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**12), st.integers(0, 10**12))
def test_cost_is_floor_of_exact_total(p, c, pi, po):
    exact_num = p * pi + c * po
    cost = request_cost(p, c, pi, po)
    assert isinstance(cost, int)
    assert cost * 10**6 <= exact_num < (cost + 1) * 10**6


def test_fee_floors_and_the_seller_keeps_the_remainder():
    assert fee_of(199, 500) == 9          # 9.95 -> 9: the seller gets 190, not 189
    assert fee_of(10_000, 500) == 500
    assert fee_of(1, 10_000) == 1 and fee_of(1, 0) == 0
    with pytest.raises(ValueError):
        fee_of(100, 10_001)


@given(st.integers(0, 10**15), st.integers(0, 10_000))
def test_fee_bounds(gross, bps):
    fee = fee_of(gross, bps)
    assert 0 <= fee <= gross
    assert fee * 10_000 <= gross * bps < (fee + 1) * 10_000
