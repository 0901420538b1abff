"""Fixtures of the node agent's tests: `bench/upstream.py` processes (one per mode), started
once per session since each loads the tiny model."""

from __future__ import annotations

import pytest

from tests.node_agent.upstreams import upstreams


@pytest.fixture(scope="session")
def ups(tmp_path_factory):
    """{mode: URL} for OpenAI-compatible upstreams in modes ids, tokens, text and fixed."""
    with upstreams("ids", "tokens", "text", "fixed", log_dir=tmp_path_factory.mktemp("upstreams")) as urls:
        yield urls
