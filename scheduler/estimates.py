"""Measured, not claimed: EWMA estimates of each node's decode speed and time to first token.

Kept per (node, model, prompt-length bucket). A node's advertised figures only *seed* the
estimate (with a small prior weight); every request the coordinator relays is an
observation. The first few observations move the estimate quickly (the step size is
`1 / (samples + 1 + prior_weight)` until it falls to `alpha`), then it tracks drift as
an ordinary EWMA.

Buckets without traffic of their own borrow the node-wide measured/advertised ratio, so
an over-claiming node is marked down in every bucket after a handful of requests. The gap
between claim and measurement is exposed (`claim_ratio`, `claim_gap`) for the policy
(which turns it into a routing-weight penalty) and for the operator's dashboard.

Pure: no clock, no I/O; state is a plain dict the caller owns (one per dispatch worker or
rebuilt from stored observations).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROMPT_BUCKET_EDGES: tuple[int, ...] = (256, 1024, 4096)  # buckets: <256, <1k, <4k, >=4k
BUCKET_MIDPOINTS: tuple[int, ...] = (128, 640, 2560, 8192)
N_BUCKETS = len(PROMPT_BUCKET_EDGES) + 1


def prompt_bucket(prompt_tokens: int) -> int:
    return int(np.searchsorted(PROMPT_BUCKET_EDGES, prompt_tokens, side="right"))


def prompt_buckets(prompt_tokens: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(PROMPT_BUCKET_EDGES), prompt_tokens, side="right")


@dataclass
class _Ewma:
    value: float
    samples: int = 0

    def update(self, x: float, alpha: float, prior_weight: float) -> None:
        step = max(alpha, 1.0 / (self.samples + 1.0 + prior_weight))
        self.value += step * (x - self.value)
        self.samples += 1


@dataclass
class _NodeModel:
    advertised_tps: float
    advertised_ttft: tuple[float, ...]
    tps: list[_Ewma]
    ttft: list[_Ewma]
    tps_ratio: _Ewma = field(default_factory=lambda: _Ewma(1.0))
    ttft_ratio: _Ewma = field(default_factory=lambda: _Ewma(1.0))


class SpeedEstimator:
    """EWMA of measured tok/s and TTFT per node, model and prompt-length bucket."""

    def __init__(self, alpha: float = 0.2, prior_weight: float = 0.5) -> None:
        self.alpha = alpha
        self.prior_weight = prior_weight
        self._state: dict[tuple[str, str], _NodeModel] = {}

    def seed(
        self,
        node_id: str,
        model: str,
        tokens_per_s: float,
        ttft_ms: float | tuple[float, ...],
        prefill_tokens_per_s: float | None = None,
    ) -> None:
        """Advertised figures (from the node's benchmark). Re-seeding keeps learned samples."""
        if isinstance(ttft_ms, (int, float)):
            extra = [0.0 if not prefill_tokens_per_s else 1000.0 * m / prefill_tokens_per_s for m in BUCKET_MIDPOINTS]
            ttft = tuple(float(ttft_ms) + e for e in extra)
        else:
            ttft = tuple(float(t) for t in ttft_ms)
            if len(ttft) != N_BUCKETS:
                raise ValueError(f"ttft_ms needs {N_BUCKETS} buckets, got {len(ttft)}")
        key = (node_id, model)
        old = self._state.get(key)
        if old is not None and old.advertised_tps == tokens_per_s and old.advertised_ttft == ttft:
            return
        self._state[key] = _NodeModel(
            advertised_tps=float(tokens_per_s),
            advertised_ttft=ttft,
            tps=[_Ewma(float(tokens_per_s)) for _ in range(N_BUCKETS)],
            ttft=[_Ewma(t) for t in ttft],
        )
        if old is not None:  # keep what traffic taught us
            for new_e, old_e in zip(self._state[key].tps + self._state[key].ttft, old.tps + old.ttft):
                if old_e.samples:
                    new_e.value, new_e.samples = old_e.value, old_e.samples
            self._state[key].tps_ratio = old.tps_ratio
            self._state[key].ttft_ratio = old.ttft_ratio

    def known(self, node_id: str, model: str) -> bool:
        return (node_id, model) in self._state

    def observe(
        self,
        node_id: str,
        model: str,
        prompt_tokens: int,
        ttft_ms: float | None,
        output_tokens: int,
        decode_ms: float,
        concurrent_streams: int = 1,
        slowdown_per_stream: float = 0.0,
    ) -> None:
        """One relayed request: node-side time to first token (measured TTFT minus the
        coordinator↔node RTT), and `output_tokens` generated over `decode_ms` (first token
        to last). Call at the end of a stream, or periodically during a long one with the
        tokens relayed so far. The observed speed is normalised to one stream with the
        node's curve (`concurrent_streams` it was running, `slowdown_per_stream`)."""
        st = self._state.get((node_id, model))
        if st is None:
            raise KeyError(f"node {node_id!r} / model {model!r} was never seeded")
        b = prompt_bucket(prompt_tokens)
        a, w = self.alpha, self.prior_weight
        if ttft_ms is not None and ttft_ms > 0:
            st.ttft[b].update(float(ttft_ms), a, w)
            st.ttft_ratio.update(ttft_ms / max(st.advertised_ttft[b], 1e-6), a, w)
        if output_tokens >= 2 and decode_ms > 0:
            tps = (output_tokens - 1) * 1000.0 / decode_ms
            tps *= 1.0 + slowdown_per_stream * max(concurrent_streams - 1, 0)
            st.tps[b].update(tps, a, w)
            st.tps_ratio.update(tps / max(st.advertised_tps, 1e-9), a, w)

    def _tps(self, st: _NodeModel, b: int) -> float:
        e = st.tps[b]
        return e.value if e.samples else st.advertised_tps * st.tps_ratio.value

    def _ttft(self, st: _NodeModel, b: int) -> float:
        e = st.ttft[b]
        return e.value if e.samples else st.advertised_ttft[b] * st.ttft_ratio.value

    def tokens_per_s(self, node_id: str, model: str, prompt_tokens: int = 0) -> float:
        st = self._state[(node_id, model)]
        return self._tps(st, prompt_bucket(prompt_tokens))

    def ttft_ms(self, node_id: str, model: str, prompt_tokens: int = 0) -> float:
        st = self._state[(node_id, model)]
        return self._ttft(st, prompt_bucket(prompt_tokens))

    def claim_ratio(self, node_id: str, model: str) -> float:
        """Measured ÷ advertised decode speed (1.0 until traffic says otherwise; < 1 over-claims)."""
        st = self._state[(node_id, model)]
        return float(st.tps_ratio.value)

    def claim_gap(self, node_id: str, model: str) -> float:
        """Share of the advertised speed the node does not deliver (0.5: delivers half)."""
        return max(0.0, 1.0 - self.claim_ratio(node_id, model))

    def samples(self, node_id: str, model: str) -> int:
        return self._state[(node_id, model)].tps_ratio.samples

    def node_fields(self, node_id: str, model: str) -> dict:
        """Keyword arguments for `NodeState` (speed fields) from the current estimate."""
        st = self._state[(node_id, model)]
        tps = tuple(self._tps(st, b) for b in range(N_BUCKETS))
        ttft = tuple(self._ttft(st, b) for b in range(N_BUCKETS))
        return {
            "tokens_per_s": tps[1],
            "ttft_ms": ttft[1],
            "tokens_per_s_by_bucket": tps,
            "ttft_ms_by_bucket": ttft,
            "advertised_tokens_per_s": st.advertised_tps,
        }

    # ------------------------------------------------------------------ persistence
    def export_state(self, node_id: str, model: str) -> dict:
        """A JSON-able snapshot of one (node, model) estimate, to store between processes."""
        st = self._state[(node_id, model)]
        pack = lambda e: [e.value, e.samples]  # noqa: E731
        return {"advertised_tps": st.advertised_tps, "advertised_ttft": list(st.advertised_ttft),
                "tps": [pack(e) for e in st.tps], "ttft": [pack(e) for e in st.ttft],
                "tps_ratio": pack(st.tps_ratio), "ttft_ratio": pack(st.ttft_ratio)}

    def import_state(self, node_id: str, model: str, data: dict) -> None:
        unpack = lambda v: _Ewma(float(v[0]), int(v[1]))  # noqa: E731
        self._state[(node_id, model)] = _NodeModel(
            advertised_tps=float(data["advertised_tps"]),
            advertised_ttft=tuple(float(x) for x in data["advertised_ttft"]),
            tps=[unpack(v) for v in data["tps"]], ttft=[unpack(v) for v in data["ttft"]],
            tps_ratio=unpack(data["tps_ratio"]), ttft_ratio=unpack(data["ttft_ratio"]),
        )
