"""Frames the coordinator sends down a node's work channel, built from stored rows."""

from __future__ import annotations

from coordinator.models import InferenceRequest
from protocol import Assignment, Sampling


def assignment_frame(req: InferenceRequest) -> dict:
    return Assignment(
        request_id=req.id, model=req.model, kind=req.kind,  # type: ignore[arg-type]
        messages=req.payload.get("messages"), prompt=req.payload.get("prompt"),
        sampling=Sampling(**req.payload["sampling"]), price_in=req.price_in or 0,
        price_out=req.price_out or 0, prefix_token_ids=req.payload.get("prefix_token_ids", []),
        prefix_text=req.payload.get("prefix_text", ""),
        prefix_tokens=sum(seg["tokens"] for seg in req.payload.get("segments", [])),
    ).model_dump()
