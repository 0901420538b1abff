"""Run a real market in child processes for end-to-end tests: `agora serve`, optionally
`agora worker` (production path), and `agora node` agents. Everything is stopped and
the database dropped (by the fixtures) afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Market:
    home: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, name: str, *args: str, extra_env: dict | None = None) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        env = dict(self.env, PYTHONUNBUFFERED="1", **(extra_env or {}))
        proc = subprocess.Popen([PY, "-m", "agora", *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def agora(self, *args: str) -> str:
        out = subprocess.run([PY, "-m", "agora", *args], env=self.env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def start_coordinator(self) -> None:
        self.spawn("coordinator", "serve", "--port", str(self.port))
        self.wait(lambda: httpx.get(self.base + "/healthz", timeout=1).status_code == 200, "coordinator")

    def start_worker(self) -> None:
        self.spawn("worker", "worker", "--beat", "--concurrency", "2")

    def start_node(self, name: str, *, price_in="0.10", price_out="0.20", region="us-east",
                   model="tiny", extra: tuple[str, ...] = ()) -> subprocess.Popen:
        return self.spawn(name, "node", "--coordinator", self.base, "--model", model,
                          "--price-in", price_in, "--price-out", price_out, "--region", region,
                          "--key", str(self.home / f"{name}.pem"), "--torch-threads", "1",
                          "--max-concurrency", "4", *extra)

    def wait_live(self, model: str, count: int, timeout: float = 180) -> None:
        def ok():
            data = httpx.get(self.base + "/v1/models", timeout=2).json()["data"]
            return sum(m["live_nodes"] for m in data if m["id"] == model) >= count

        self.wait(ok, f"{count} live node(s) for {model}", timeout)

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a process exited while waiting for {what}:\n{self.tail()}")
            try:
                if cond():
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        out = []
        for log in self.logs:
            if log.exists():
                lines = log.read_text(errors="replace").splitlines()[-n:]
                out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def settled_balance(base: str, key: str, timeout: float = 30) -> int:
    """The buyer's balance once nothing of it is held in escrow any more: settlement runs
    in the background after the buyer's answer, so a test waits for it."""
    deadline = time.monotonic() + timeout
    while True:
        acct = httpx.get(base + "/v1/account", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        if acct["held_nano_usd"] == 0 or time.monotonic() > deadline:
            assert acct["held_nano_usd"] == 0, f"still held after {timeout}s: {acct}"
            return acct["balance_nano_usd"]
        time.sleep(0.05)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any AGORA_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(AGORA_HOME=str(home), AGORA_NODE_HEARTBEAT_INTERVAL_S="1", **extra)
    return env


@contextlib.contextmanager
def embedded_market(home: Path, **extra_env: str):
    """A coordinator on the embedded default (SQLite, in-process worker), stopped after."""
    m = Market(home=home, env=clean_env(home, **extra_env))
    try:
        m.start_coordinator()
        yield m
    finally:
        m.stop()
