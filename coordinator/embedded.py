"""`agora up`: the embedded market in one command.

One process runs the coordinator API, an in-process Celery worker (memory:// broker),
and SQLite; N node agents run as child processes on the built-in engine with different
prices, regions and concurrency, and the operator's own verifier (trusted: its verdicts need no
confirmation, so audits resolve from the first job; `--no-verifier` leaves it out). Once every node is online it prints `base_url:`,
`api_key:` and `dashboard:` lines (the last a single-use link that signs the operator in; an
admin token is made up for the run when `AGORA_ADMIN_TOKEN` is not set). SIGINT or SIGTERM stops everything, children included.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from coordinator.settings import CoordinatorSettings

# (USD per Mtok in, out, region, max concurrency): a small, varied market.
NODE_PROFILES = [
    ("0.10", "0.20", "us-east", 8),
    ("0.05", "0.15", "eu-west", 4),
    ("0.20", "0.40", "ap-southeast", 16),
    ("0.08", "0.25", "us-west", 8),
]


def node_command(i: int, base_url: str, model: str, home: Path) -> list[str]:
    p_in, p_out, region, conc = NODE_PROFILES[i % len(NODE_PROFILES)]
    return [sys.executable, "-m", "agora", "node", "--coordinator", base_url, "--model", model,
            "--price-in", p_in, "--price-out", p_out, "--region", region, "--max-concurrency", str(conc),
            "--name", f"local-{i + 1}", "--key", str(home / "nodes" / f"node{i + 1}.pem"), "--torch-threads", "1"]


def verifier_command(base_url: str, model: str, key: Path) -> list[str]:
    return [sys.executable, "-m", "agora", "verifier", "--coordinator", base_url, "--model", model,
            "--name", "local-verifier", "--key", str(key), "--torch-threads", "1"]


def _verifier_identity(key: Path) -> str:
    """The verifier's public key (made on first use) from `agora node keygen`: this module may
    not import the node agent's code."""
    out = subprocess.run([sys.executable, "-m", "agora", "node", "keygen", "--key", str(key)],
                         capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    return out.stdout.strip().splitlines()[-1]


def run_embedded(settings: CoordinatorSettings, *, host: str, port: int, nodes: int, model: str,
                 credit_usd: float, verifier: bool = True) -> int:
    import uvicorn

    from coordinator.account_service import create_account
    from coordinator.app import create_app, tune_gc
    from coordinator.db import make_engine, session_scope
    from coordinator.migrate import upgrade
    from coordinator.web_auth import Principal, issue_link

    home = settings.home
    (home / "nodes").mkdir(parents=True, exist_ok=True)
    url = settings.effective_database_url
    upgrade(url)
    verifier_key = home / "nodes" / "verifier.pem"
    if verifier:  # the operator's own verifier: audits resolve from the first job (a new market has
        # no node that has passed enough audits to verify the others)
        settings.trusted_verifiers = [*settings.trusted_verifiers, _verifier_identity(verifier_key)]
    if not settings.admin_token:  # the operator of this embedded market is whoever ran `agora up`
        settings.admin_token = secrets.token_urlsafe(32)
    engine = make_engine(url)
    with session_scope(engine) as s:
        _, api_key = create_account(s, "demo", int(round(credit_usd * 10**9)))
        link = issue_link(s, Principal("operator"), settings)
    engine.dispose()

    base = f"http://{host}:{port}"
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=host, port=port, log_level="warning",
                                           ws_per_message_deflate=settings.ws_deflate))
    tune_gc()
    children: list[subprocess.Popen] = []

    async def _bring_up() -> None:
        while not server.started:
            await asyncio.sleep(0.05)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        logs = home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for i in range(nodes):
            log = (logs / f"node{i + 1}.log").open("w")
            children.append(subprocess.Popen(node_command(i, base, model, home), env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True))
        if verifier:
            log = (logs / "verifier.log").open("w")
            children.append(subprocess.Popen(verifier_command(base, model, verifier_key), env=env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True))
        print(f"agora up: starting {nodes} node agent(s){' and a verifier' if verifier else ''}; their logs: "
              f"{logs}/*.log", file=sys.stderr, flush=True)
        deadline = time.monotonic() + 300
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            while time.monotonic() < deadline:
                if any(c.poll() is not None for c in children):
                    print(f"agora up: a node agent exited during start-up; see {home / 'logs'}",
                          file=sys.stderr, flush=True)
                    server.should_exit = True
                    return
                models = (await client.get("/v1/models")).json()["data"]
                live = sum(m.get("live_nodes", 0) for m in models if m["id"] == model)
                if live >= nodes:
                    break
                await asyncio.sleep(0.2)
            else:
                print("agora up: nodes did not come online in time", file=sys.stderr, flush=True)
                server.should_exit = True
                return
        print(f"base_url: {base}/v1", flush=True)
        print(f"api_key: {api_key}", flush=True)
        print(f"dashboard: {base}/login/link/{link}", flush=True)
        print(f"agora up: {nodes} node(s) serving {model!r}; Ctrl-C stops everything", file=sys.stderr, flush=True)

    async def _main() -> None:
        up = asyncio.create_task(_bring_up())
        try:
            await server.serve()
        finally:
            up.cancel()

    def _terminate(signum, _frame):
        raise SystemExit(128 + signum)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal: these
    # handlers turn it into an exception so the children are always stopped below.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        asyncio.run(_main())
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        _stop_children(children)
        print("agora up: stopped", file=sys.stderr, flush=True)
    return 0


def _stop_children(children: list[subprocess.Popen]) -> None:
    for c in children:
        if c.poll() is None:
            try:
                os.killpg(c.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for c in children:
        try:
            c.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(c.pid, signal.SIGKILL)
            c.wait()
