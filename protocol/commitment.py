"""Token commitments: a running hash chain over the generated tokens and their
log-probabilities, which the node signs in its receipt and the coordinator recomputes over
what it relayed, so a node cannot change its story after the fact."""

from __future__ import annotations

import hashlib
import struct

LOGPROB_SCALE = 10_000  # log-probs travel and are committed to as round(lp * 1e4)


class TokenCommitment:
    """Running hash chain h_i = sha256(h_{i-1} || id:u32 || logprob:i32)[:16].

    16 bytes of state; the final value goes in the signed receipt so a node cannot
    change the tokens or their log-probs after the fact.
    """

    def __init__(self, request_id: str):
        self.state = hashlib.sha256(request_id.encode()).digest()[:16]

    def update(self, token_id: int, logprob_q: int) -> str:
        self.state = hashlib.sha256(self.state + struct.pack("<Ii", token_id, logprob_q)).digest()[:16]
        return self.state.hex()

    @property
    def hex(self) -> str:
        return self.state.hex()


def commitment_of(request_id: str, token_ids: list[int], logprobs_q: list[int]) -> str:
    c = TokenCommitment(request_id)
    for t, lp in zip(token_ids, logprobs_q, strict=True):
        c.update(t, lp)
    return c.hex


def quantize_logprob(logprob: float) -> int:
    return int(round(max(logprob, -1e5) * LOGPROB_SCALE))
