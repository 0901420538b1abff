"""The API keeps the contract its OpenAPI document states, under generated input: a real
market (coordinator + a node agent, embedded default) fuzzed by schemathesis over every
operation, at least 1,000 cases, completion routes pinned to the served model. No 5xx, no
status code or content type the document does not declare."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.market import embedded_market

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


@pytest.mark.timeout(900)  # ~2,000 generated cases against a live market: minutes on a busy 2-core box
def test_every_operation_keeps_its_documented_contract(tmp_path):
    st = Path(sys.executable).with_name("st")
    if not st.exists():
        pytest.fail("schemathesis is not installed (it is a dev dependency)")
    with embedded_market(tmp_path, AGORA_RATE_LIMIT_REQUESTS_PER_MIN="0", AGORA_RATE_LIMIT_TOKENS_PER_MIN="0",
                         AGORA_ASSIGN_TIMEOUT_S="5", AGORA_ADMIN_TOKEN="admin-contract") as m:
        m.start_node("n")
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**12))
        out = subprocess.run(
            [str(st), "run", m.base + "/openapi.json", "-H", f"Authorization: Bearer {key}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance",
             "--max-examples", "40", "--request-timeout", "30", "-w", "2", "--seed", "20261130",
             "--generation-deterministic"],
            capture_output=True, text=True, timeout=900,
            env=dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks", PYTHONPATH=str(HERE)))
    report = out.stdout + out.stderr
    (tmp_path / "schemathesis.txt").write_text(report)
    generated = re.search(r"(\d+) generated", report)
    assert generated and int(generated.group(1)) >= 1000, report[-3000:]
    assert out.returncode == 0, report[-5000:]  # schemathesis exits non-zero on any failure
