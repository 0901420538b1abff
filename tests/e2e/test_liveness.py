"""A real node agent stays live on channel beats alone: past several heartbeat timeouts it
is still routable, and it sent no signed HTTP heartbeat (no nonce row per beat)."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from tests.e2e.market import embedded_market

pytestmark = pytest.mark.slow


def test_a_node_stays_live_on_channel_beats(tmp_path):
    with embedded_market(tmp_path, AGORA_HEARTBEAT_TIMEOUT_S="3", AGORA_CANARY_INTERVAL_S="0") as m:
        m.start_node("seller")
        m.wait_live("tiny", 1)
        db = sqlite3.connect(m.home / "agora.db")
        nonces = db.execute("SELECT COUNT(*) FROM node_nonces").fetchone()[0]
        time.sleep(8)  # > 2 heartbeat timeouts, at 1 beat/s
        live = httpx.get(m.base + "/v1/models").json()["data"][0]["live_nodes"]
        assert live == 1
        assert db.execute("SELECT COUNT(*) FROM node_nonces").fetchone()[0] == nonces  # no signed heartbeats
        seen = db.execute("SELECT last_heartbeat_at FROM nodes").fetchone()[0]
        assert seen is not None
