"""Measured, not claimed: each offer's speed estimate, learned from relayed traffic.

The estimate (scheduler.estimates.SpeedEstimator: EWMA per prompt-length bucket, seeded by
the node's benchmark) is stored as JSON on the offer so every worker and replica sees the
same numbers. Re-registering with new claims re-seeds the advertised figures but keeps
what traffic has taught, so a node cannot wash out a bad record by re-registering.
"""

from __future__ import annotations

from coordinator.models import NodeOffer
from scheduler.estimates import SpeedEstimator

SLOWDOWN_PER_STREAM = 0.02  # per-stream speed lost per extra concurrent stream (batching curve)


def _estimator(offer: NodeOffer) -> SpeedEstimator:
    est = SpeedEstimator()
    if offer.estimate:
        est.import_state(offer.node_id, offer.model, offer.estimate)
    est.seed(offer.node_id, offer.model, tokens_per_s=offer.tokens_per_s_b1 or offer.tokens_per_s,
             ttft_ms=offer.ttft_ms or 0.0)
    return est


def reseed(offer: NodeOffer) -> None:
    offer.estimate = _estimator(offer).export_state(offer.node_id, offer.model)
    _publish(offer, _estimator(offer))


def observe(offer: NodeOffer, *, prompt_tokens: int, ttft_ms: float | None, output_tokens: int,
            decode_ms: float, concurrent_streams: int) -> None:
    est = _estimator(offer)
    est.observe(offer.node_id, offer.model, prompt_tokens, ttft_ms, output_tokens, decode_ms,
                concurrent_streams=concurrent_streams, slowdown_per_stream=SLOWDOWN_PER_STREAM)
    offer.estimate = est.export_state(offer.node_id, offer.model)
    _publish(offer, est)


def _publish(offer: NodeOffer, est: SpeedEstimator) -> None:
    fields = est.node_fields(offer.node_id, offer.model)
    offer.measured_tokens_per_s = fields["tokens_per_s"]
    offer.measured_ttft_ms = fields["ttft_ms"]
    offer.claim_ratio = est.claim_ratio(offer.node_id, offer.model)


def routing_fields(offer: NodeOffer) -> dict:
    """Speed fields of the scheduler's NodeState for this offer."""
    est = _estimator(offer)
    return {**est.node_fields(offer.node_id, offer.model), "claim_ratio": est.claim_ratio(offer.node_id, offer.model)}
