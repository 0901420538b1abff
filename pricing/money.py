"""Money: integer nano-dollars, prices per million tokens, one rounding rule.

1 USD = 10**9 nano-USD. A price is nano-USD per million tokens, so $0.01/Mtok is
10_000_000 and one token at that price costs exactly 10 nano-USD.

Rounding rule: a request's cost is the floor of the exact total
`(prompt_tokens × price_in + completion_tokens × price_out) / 10**6`, computed once on
the sum, so the buyer never pays for a fraction of a nano-dollar.
"""

from __future__ import annotations

NANO_PER_USD = 10**9
TOKENS_PER_PRICE_UNIT = 10**6


def request_cost(prompt_tokens: int, completion_tokens: int, price_in: int, price_out: int) -> int:
    for name, v in (("prompt_tokens", prompt_tokens), ("completion_tokens", completion_tokens),
                    ("price_in", price_in), ("price_out", price_out)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return (prompt_tokens * price_in + completion_tokens * price_out) // TOKENS_PER_PRICE_UNIT


def fee_of(gross: int, fee_bps: int) -> int:
    """The platform's fee on `gross`, floored: the seller keeps the remainder."""
    if not 0 <= fee_bps <= 10_000:
        raise ValueError("fee_bps must be within 0..10000")
    return gross * fee_bps // 10_000


def segment_charges(prompt_tokens: int, segments: list[tuple[int, int, int]], cap: int) -> list[int]:
    """Gross charge per segment of one request, `segments` being (price_in, price_out,
    tokens) in stream order: the prompt once, at the first segment's input price; each
    segment's tokens at its own output price; each part floored separately; the total
    never exceeds `cap` (the hold): the last parts are cut first."""
    room = cap
    out = []
    for i, (price_in, price_out, tokens) in enumerate(segments):
        take = min(request_cost(prompt_tokens if i == 0 else 0, tokens, price_in, price_out), room)
        room -= take
        out.append(take)
    return out


def allocate_in_order(sizes: list[int], total: int) -> list[int]:
    """Split `total` over consecutive parts of `sizes` (a stream's segments) in order:
    the first parts fill up first. Never more than `sizes` in any part."""
    out = []
    left = max(0, total)
    for size in sizes:
        take = min(size, left)
        out.append(take)
        left -= take
    return out
