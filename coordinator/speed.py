"""Measured, not claimed: each offer's speed estimate, learned from relayed traffic.

The estimate (scheduler.estimates.SpeedEstimator: EWMA per prompt-length bucket, seeded by
the node's benchmark) is stored as JSON on the offer so every worker and replica sees the
same numbers. Re-registering with new claims re-seeds the advertised figures but keeps
what traffic has taught, so a node cannot wash out a bad record by re-registering.
"""

from __future__ import annotations

from coordinator.models import Node, NodeOffer
from scheduler.batching import ThroughputCurve, free_slots, stream_speed_after
from scheduler.estimates import SpeedEstimator

SLOWDOWN_PER_STREAM = 0.02  # default per-stream slowdown per extra stream, without a benchmark curve


def curve_of(node: Node, offer: NodeOffer) -> ThroughputCurve:
    """The node's batching curve from its benchmark (decode tok/s at batch 1 and at its
    largest batch): per-stream speed = single / (1 + s (b - 1))."""
    rows = [r for r in (node.benchmark or {}).get("batches", []) if r.get("decode_tok_s")]
    single = offer.tokens_per_s_b1 or offer.tokens_per_s
    slope = SLOWDOWN_PER_STREAM
    b1 = next((r for r in rows if r.get("batch") == 1), None)
    top = max(rows, key=lambda r: r["batch"], default=None)
    if b1 and top and top["batch"] > 1:
        per_stream = top["decode_tok_s"] / top["batch"]
        slope = max(0.0, (b1["decode_tok_s"] / per_stream - 1.0) / (top["batch"] - 1))
        single = b1["decode_tok_s"]
    return ThroughputCurve(single_stream_tps=single, slowdown_per_stream=slope, max_batch=node.max_concurrency)


def share(node: Node, offer: NodeOffer, active: int, fields: dict) -> tuple[int, float]:
    """(free slots, per-stream tok/s a new request can count on) at the node's load now:
    the curve, rescaled to what the coordinator measured, bounds how much of a burst the
    node takes, so a burst is spread rather than dumped on the cheapest node."""
    curve = curve_of(node, offer)
    measured = fields["tokens_per_s"]
    scaled = curve.scaled(measured / curve.single_stream_tps if curve.single_stream_tps > 0 else 1.0)
    slots = min(max(0, node.max_concurrency - active), free_slots(scaled, active))
    return slots, stream_speed_after(scaled, active)


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
            decode_ms: float, concurrent_streams: int, slowdown_per_stream: float = SLOWDOWN_PER_STREAM) -> None:
    """One relayed stream, normalised to a single stream with the node's curve."""
    est = _estimator(offer)
    est.observe(offer.node_id, offer.model, prompt_tokens, ttft_ms, output_tokens, decode_ms,
                concurrent_streams=concurrent_streams, slowdown_per_stream=slowdown_per_stream)
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
