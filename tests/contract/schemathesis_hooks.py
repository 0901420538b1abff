"""Hooks for the schemathesis run (tests/contract/test_openapi_contract.py): generated
completion requests name the model the market serves, and ask for few tokens, so the
fuzzing reaches the serving path instead of stopping at 404 and 402."""

import schemathesis


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict) and "model" in body:
        body["model"] = "tiny"
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int) and body[field] > 64:
                body[field] = 8
    return body
