"""Token commitments: a running hash chain over the generated tokens and their
log-probabilities, which the node signs in its receipt and the coordinator recomputes over
what it relayed, so a node cannot change its story after the fact."""

from __future__ import annotations

import hashlib
import struct

LOGPROB_SCALE = 10_000  # log-probs travel and are committed to as round(lp * 1e4)
NO_LOGPROB = -(2**31)  # committed in place of a log-prob the engine did not report


class TokenCommitment:
    """Running hash chain h_i = sha256(h_{i-1} || id:u32 || logprob:i32)[:16].

    16 bytes of state; the final value goes in the signed receipt so a node cannot
    change the tokens or their log-probs after the fact. An engine that cannot name its
    token ids (an OpenAI-compatible server without a tokenizer) commits to text instead:
    one link per chunk, sha256(h || 0xFF || count:u32 || logprobs:i32* || utf-8 text).
    `update_chunk` applies the right rule to a `TokenChunk`'s fields.
    """

    def __init__(self, request_id: str):
        self.state = hashlib.sha256(request_id.encode()).digest()[:16]

    def update(self, token_id: int, logprob_q: int) -> str:
        self.state = hashlib.sha256(self.state + struct.pack("<Ii", token_id, logprob_q)).digest()[:16]
        return self.state.hex()

    def update_text(self, text: str, count: int, logprobs_q: list[int] | None) -> str:
        lps = b"".join(struct.pack("<i", q) for q in (logprobs_q or []))
        self.state = hashlib.sha256(self.state + b"\xff" + struct.pack("<I", count) + lps
                                    + text.encode("utf-8", "surrogatepass")).digest()[:16]
        return self.state.hex()

    def update_chunk(self, token_ids: list[int] | None, logprobs_q: list[int] | None, text: str,
                     count: int) -> str:
        if token_ids is None:
            return self.update_text(text, count, logprobs_q)
        for k, t in enumerate(token_ids):
            self.update(t, NO_LOGPROB if logprobs_q is None else logprobs_q[k])
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
