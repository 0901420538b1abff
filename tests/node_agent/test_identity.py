import os
import stat

from node_agent.identity import Identity, verify_signature
from protocol import Receipt, commitment_of, fresh_stamp


def test_key_file_is_created_private_and_reloaded(tmp_path):
    path = tmp_path / "keys" / "node.pem"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).public_key_hex == first.public_key_hex


def test_signature_binds_every_field():
    me, other = Identity.generate(), Identity.generate()
    r = Receipt(node_id=me.public_key_hex, **fresh_stamp(), request_id="req_1", model="tiny",
                prompt_tokens=3, completion_tokens=2, commitment=commitment_of("req_1", [5, 6], [-10, -20]),
                finish_reason="stop").sign(me)
    assert r.signature_valid()
    r.completion_tokens = 3  # inflate the count after signing
    assert not r.signature_valid()
    assert not verify_signature(other.public_key_hex, {"a": 1}, me.sign({"a": 1}))
    assert not verify_signature("zz", {"a": 1}, "00")


def test_commitment_depends_on_tokens_logprobs_and_request():
    base = commitment_of("req_1", [1, 2, 3], [-1, -2, -3])
    assert base == commitment_of("req_1", [1, 2, 3], [-1, -2, -3])
    assert base != commitment_of("req_1", [1, 2, 4], [-1, -2, -3])
    assert base != commitment_of("req_1", [1, 2, 3], [-1, -2, -4])
    assert base != commitment_of("req_2", [1, 2, 3], [-1, -2, -3])
    assert len(bytes.fromhex(base)) == 16
