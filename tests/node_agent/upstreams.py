"""Start `bench/upstream.py` as a real process (an OpenAI-compatible server backed by the
built-in engine on the tiny model) for tests of the OpenAI-compatible engine and sellers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "upstream.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def upstreams(*modes: str, log_dir: Path | None = None, timeout: float = 60.0):
    """{mode: base URL ending in /v1} for one upstream process per mode ("ids", "tokens",
    "text", or "fixed"); all stopped afterwards."""
    procs, urls = [], {}
    try:
        for mode in modes:
            port = free_port()
            args = ["--fixed"] if mode == "fixed" else ["--mode", mode, "--model", "tiny"]
            out = (log_dir / f"upstream-{mode}.log").open("w") if log_dir else subprocess.DEVNULL
            procs.append(subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), *args],
                                          stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=dict(os.environ, PYTHONUNBUFFERED="1")))
            urls[mode] = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout
        for proc, url in zip(procs, urls.values()):
            while True:
                assert proc.poll() is None, f"upstream {url} exited with {proc.returncode}"
                try:
                    if httpx.get(url + "/models", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"upstream {url} did not start"
                time.sleep(0.05)
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
