"""The wire protocol between node agents and the coordinator, shared by both sides.

It imports none of Agora's other packages (DESIGN.md's import rule): `coordinator`,
`scheduler` and `node_agent` import it. `signing` (who said what), `messages` (the
frames), `commitment` (the token hash chain).
"""

from protocol.commitment import LOGPROB_SCALE, TokenCommitment, commitment_of, quantize_logprob
from protocol.messages import (
    PROTOCOL_VERSION, AccountQuery, Assignment, ChannelHello, Done, Heartbeat, ModelOffer, PayoutRequest,
    Receipt, Registration, ReverifyRequest, Sampling, TokenChunk, TopLogprob, UnbondRequest, VerifyJob, VerifyResult, WorkError,
)
from protocol.signing import Signed, canonical_bytes, fresh_stamp, verify_signature

__all__ = [
    "LOGPROB_SCALE", "PROTOCOL_VERSION", "AccountQuery", "Assignment", "ChannelHello", "Done", "Heartbeat",
    "ModelOffer", "PayoutRequest", "Receipt", "Registration", "ReverifyRequest", "Sampling", "Signed", "TokenChunk",
    "TokenCommitment", "TopLogprob", "UnbondRequest", "VerifyJob", "VerifyResult", "WorkError", "canonical_bytes",
    "commitment_of", "fresh_stamp", "quantize_logprob", "verify_signature",
]
