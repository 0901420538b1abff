"""Signed messages: who said it (`node_id`, an Ed25519 public key in hex), when
(`timestamp`), a one-time `nonce`, and a `signature` over every other field in a canonical
JSON encoding. The coordinator refuses a bad signature, a timestamp outside its window and
a nonce it has seen before."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel


def canonical_bytes(payload: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def verify_signature(public_key_hex: str, payload: dict[str, Any], signature_hex: str) -> bool:
    """True only if `signature_hex` is `public_key_hex`'s signature over `payload`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        key.verify(bytes.fromhex(signature_hex), canonical_bytes(payload))
    except (ValueError, InvalidSignature):
        return False
    return True


class Signed(BaseModel):
    node_id: str
    timestamp: float
    nonce: str
    signature: str = ""

    def signed_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    def sign(self, identity) -> "Signed":
        """`identity`: anything with `sign(payload) -> hex signature` (node_agent.identity.Identity)."""
        self.signature = identity.sign(self.signed_payload())
        return self

    def signature_valid(self) -> bool:
        return verify_signature(self.node_id, self.signed_payload(), self.signature)


def fresh_stamp() -> dict[str, Any]:
    return {"timestamp": time.time(), "nonce": os.urandom(16).hex()}


