"""How many rows of the staged long prompt an iteration prefills while other streams decode
(chunked prefill's inter-token-latency budget; the engine's scheduler is `engine.py`).

An iteration that carries the staged prompt's chunk may take at most `itl_slack` times a
decode-only iteration (a moving average); the chunk is steered toward that, multiplicatively,
after each such iteration. While other prompts queue behind the staged one, the engine's
per-iteration token budget decides instead: the queue's throughput comes first.
"""

from __future__ import annotations

# The staged prompt's chunk is steered so that an iteration carrying it takes at most this
# many times a decode-only iteration (0: fixed `prefill_chunk` chunks).
DEFAULT_ITL_SLACK = 1.5
# ...but never fewer rows than this per iteration: the long prompt's own first token is
# bounded too. Below 16 rows the attention kernel's tiles cost about the same, and at
# 3,000 positions even one row re-reads the slot's whole KV cache every iteration
# (memory-bound: about +40 % on tiny-20m's 16-stream decode step), so smaller chunks
# stretch the prefill (1 row: 108 s for 3,000 tokens, measured) for little ITL gain.
MIN_CHUNK = 16


class ChunkSteer:
    def __init__(self, prefill_chunk: int, itl_slack: float):
        self.prefill_chunk, self.itl_slack = prefill_chunk, itl_slack
        self.decode_s: float | None = None  # moving average of a decode-only iteration's model time
        self.staged_rows = 0  # the staged prompt's current chunk (rows)

    def restart(self) -> None:
        """A new prompt is staged: a cautious first chunk, then steered."""
        self.staged_rows = max(1, self.prefill_chunk // 4)

    def timed(self, seconds: float, decoding: bool, pieces: list, staged) -> None:
        """Learn from an iteration's model time: a decode-only one updates the moving average
        the budget is measured against; one that carried only the staged prompt's chunk
        (`pieces`: (request, start, end)) alongside decoding streams steers the next chunk."""
        if not decoding:
            return
        if not pieces:
            self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds
            return
        if self.itl_slack and staged is not None and self.decode_s and pieces[0][0] is staged and len(pieces) == 1:
            # Multiplicative steering toward extra = (slack - 1) x decode time; the square root
            # damps it (the chunk's cost grows with its position, and single timings are noisy).
            extra = max(seconds - self.decode_s, 1e-5)
            ratio = (self.itl_slack - 1) * self.decode_s / extra
            rows = pieces[0][2] - pieces[0][1]
            self.staged_rows = max(min(MIN_CHUNK, self.prefill_chunk),
                                   min(self.prefill_chunk, int(rows * min(4.0, ratio) ** 0.5)))

    def rows(self, budget: int, queue_behind: bool) -> int:
        """Rows of the staged prompt to prefill this iteration while streams decode: what
        `timed` steered it to, within `budget`. The budget alone while other prompts wait
        behind it (steering it with a queue measured half the serving throughput on tiny:
        every waiting prompt stalls behind the one staging slot), and with `itl_slack` 0 or
        before a decode-only iteration has been timed."""
        if not self.itl_slack or not self.decode_s or not self.staged_rows or queue_behind:
            return budget
        return min(budget, self.staged_rows)
