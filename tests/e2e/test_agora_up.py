"""`agora up`: one command brings up the embedded market, prints base_url, api_key and the
dashboard link, serves a streamed chat through the `openai` client, and stops every child
(node agents and the operator's verifier) on a signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from tests.e2e.market import free_port

pytestmark = pytest.mark.slow


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True, text=True).stdout.split("\n")[1:]
    return [int(p) for p, pp in (line.split() for line in out if line.strip()) if int(pp) == pid]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_up_serves_then_stops_cleanly(tmp_path, sig):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(AGORA_HOME=str(tmp_path), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "agora", "up", "--port", str(port), "--nodes", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = {}
        deadline = time.monotonic() + 180
        while len(lines) < 3 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            key, _, value = line.strip().partition(": ")
            lines[key] = value
        assert lines.get("base_url") == f"http://127.0.0.1:{port}/v1", lines
        assert lines.get("api_key", "").startswith("sk-agora-")
        assert lines.get("dashboard", "").startswith(f"http://127.0.0.1:{port}/login/link/")
        nodes = _children_of(proc.pid)
        assert len(nodes) == 3  # two sellers and the operator's verifier
        client = openai.OpenAI(base_url=lines["base_url"], api_key=lines["api_key"], max_retries=0)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[-1].usage.completion_tokens == 8
        live = {m.id: m.model_extra["live_nodes"] for m in client.models.list().data}
        assert live == {"tiny": 2}
        proc.send_signal(sig)
        assert proc.wait(timeout=30) is not None
        deadline = time.monotonic() + 15
        while any(_alive(n) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [n for n in nodes if _alive(n)], "node agents outlived `agora up`"
    finally:
        if proc.poll() is None:
            proc.kill()
