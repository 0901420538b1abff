"""Helpers of `bench/overhead.py`: a minimal OpenAI-compatible upstream, process handling
(spawn, wait, CPU seconds from /proc), LiteLLM's proxy in a venv of its own, a throw-away
PostgreSQL database, and a py-spy profile summary.

The upstream (run as a script) is a few lines of asyncio HTTP/1.1: keep-alive,
Content-Length bodies, chunked SSE. It answers `GET /v1/models`, `POST /v1/completions`
and `POST /v1/chat/completions` (stream or not, `stream_options.include_usage`, `usage`)
with `max_tokens` canned text tokens (default 16), `--delay-ms` between tokens (default
0). It gives no log-probs and no token ids and ignores `echo`, like servers that stream
text deltas: `agora node --engine openai` probes it and registers as an unverifiable
seller, whose jobs are never audited (the relay is measured without audits).

    python bench/overhead_upstream.py --port 8011 --model bench --delay-ms 0
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = [ROOT]  # the source tree the market's processes run from (bench/overhead.py --tree)
PIECES = [" The", " market", " opens", " before", " sunrise", ",", " and", " every", " seller", " quotes",
          " a", " price", " per", " token", " to", " the"]


# ---------------------------------------------------------------------------- the upstream
class Upstream:
    def __init__(self, model: str, delay_s: float):
        self.model, self.delay_s = model, delay_s

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target = lines[0].split(" ", 2)[:2]
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                await self.handle(method, target.split("?", 1)[0].rstrip("/"), body, writer)
                if headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            writer.close()

    async def handle(self, method: str, path: str, body: bytes, w: asyncio.StreamWriter) -> None:
        if method == "GET" and path in ("/v1/models", "/models"):
            return await _json(w, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "bench", "max_model_len": 32768}]})
        if method == "GET" and path in ("/health", "/healthz", "/health/liveliness"):
            return await _json(w, 200, {"ok": True})
        if method != "POST" or not path.endswith("/completions"):
            return await _json(w, 404, {"error": {"message": f"no route {method} {path}", "code": 404}})
        try:
            req = json.loads(body or b"{}")
        except ValueError as exc:
            return await _json(w, 400, {"error": {"message": f"invalid JSON: {exc}", "code": 400}})
        chat = path.endswith("/chat/completions")
        if chat:
            prompt = "".join(str(m.get("content") or "") for m in req.get("messages") or [] if isinstance(m, dict))
        else:
            prompt = req.get("prompt") or ""
            prompt = prompt if isinstance(prompt, str) else json.dumps(prompt)
        n = max(1, int(req.get("max_tokens") or req.get("max_completion_tokens") or 16))
        usage = {"prompt_tokens": max(1, math.ceil(len(prompt.encode()) / 4)), "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        head = {"id": f"cmpl-{uuid.uuid4().hex[:16]}", "created": int(time.time()), "model": self.model}
        if not req.get("stream"):
            text = "".join(PIECES[i % len(PIECES)] for i in range(n))
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"})
            return await _json(w, 200, {**head, "object": "chat.completion" if chat else "text_completion",
                                        "choices": [choice], "usage": usage})
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        for i in range(n):
            if i and self.delay_s:
                await asyncio.sleep(self.delay_s)
            fin = "length" if i == n - 1 else None
            piece = PIECES[i % len(PIECES)]
            choice = ({"index": 0, "delta": {"role": "assistant", "content": piece} if i == 0 else {"content": piece},
                       "logprobs": None, "finish_reason": fin}
                      if chat else {"index": 0, "text": piece, "logprobs": None, "finish_reason": fin})
            await _chunk(w, {**head, "choices": [choice]})
        if (req.get("stream_options") or {}).get("include_usage"):
            await _chunk(w, {**head, "choices": [], "usage": usage})
        await _chunk(w, None)
        w.write(b"0\r\n\r\n")
        await w.drain()


async def _json(w: asyncio.StreamWriter, status: int, obj) -> None:
    data = json.dumps(obj).encode()
    w.write(b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status, b"OK" if status == 200 else b"Error", len(data), data))
    await w.drain()


async def _chunk(w: asyncio.StreamWriter, obj) -> None:
    data = b"data: [DONE]\n\n" if obj is None else b"data: " + json.dumps(obj).encode() + b"\n\n"
    w.write(b"%x\r\n%s\r\n" % (len(data), data))
    await w.drain()


async def _serve(args: argparse.Namespace) -> None:
    app = Upstream(args.model, args.delay_ms / 1000)
    server = await asyncio.start_server(app.connection, args.host, args.port, reuse_address=True,
                                        limit=1 << 22, backlog=1024)
    print(f"upstream on http://{args.host}:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    async with server:
        await server.serve_forever()


# ---------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Procs:
    """Child processes (each in its own session), logs under one folder, stopped together."""

    def __init__(self, logdir: Path, cwd: Path = ROOT):
        self.logdir, self.cwd, self.procs = logdir, cwd, {}
        logdir.mkdir(parents=True, exist_ok=True)

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log = (self.logdir / f"{name}.log").open("w")
        p = subprocess.Popen(argv, env=dict(env or os.environ, PYTHONUNBUFFERED="1"), cwd=self.cwd,
                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = p
        return p

    def check(self, names=None) -> None:
        for name, p in list(self.procs.items()):
            if (names is None or name in names) and p.poll() is not None:
                raise RuntimeError(f"{name} exited ({p.returncode}):\n{self.tail(name)}")

    def tail(self, name: str, n: int = 30) -> str:
        path = self.logdir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""

    def stop(self, names=None, sig=signal.SIGTERM) -> None:
        chosen = [(k, p) for k, p in list(self.procs.items()) if names is None or k in names]
        for _, p in chosen:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        for k, p in chosen:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            self.procs.pop(k, None)


def wait_for(cond, what: str, timeout: float, procs: Procs | None = None, names=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if procs is not None:
            procs.check(names)
        with contextlib.suppress(Exception):  # not up yet
            if cond():
                return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


_TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    kids = collections.defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            kids[int(stat.rsplit(")", 1)[1].split()[1])].append(int(d))
    return kids


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of each named process and its descendants (live ones);
    "client" is this process alone."""
    kids, out = _children(), {"client": time.process_time()}
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    out["machine"] = (sum(ticks) - ticks[3] - ticks[4]) / _TICK  # all CPUs, not idle, not iowait
    for name, root in pids.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            todo.extend(kids.get(pid, ()))
            try:
                f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(f[11]) + int(f[12])) / _TICK  # utime, stime
        out[name] = total
    return out


# ---------------------------------------------------------------------------- LiteLLM
def ensure_litellm(venv: Path, timeout: float = 900) -> tuple[Path | None, str]:
    """The `litellm` executable of a venv of its own (created and installed from the
    registry if missing), or None and the reason it cannot be had."""
    exe = venv / "bin" / "litellm"
    if exe.exists() and litellm_version(venv):
        return exe, "ok"
    try:
        if not (venv / "bin" / "python").exists():
            subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        print(f"installing litellm[proxy] into {venv} ...", file=sys.stderr, flush=True)
        r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=False,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            return None, "pip install 'litellm[proxy]' failed: " + " ".join(r.stderr.split()[-40:])
    except (subprocess.SubprocessError, OSError) as exc:
        return None, f"cannot create {venv}: {exc}"
    return (exe, "ok") if exe.exists() else (None, "litellm installed no `litellm` executable")


def litellm_version(venv: Path) -> str | None:
    """From the installed distribution's folder name (importing litellm takes seconds)."""
    found = sorted(venv.glob("lib/python*/site-packages/litellm-*.dist-info"))
    return found[-1].name.removeprefix("litellm-").removesuffix(".dist-info") if found else None


def litellm_argv(exe: Path, workdir: Path, upstream_v1: str, model: str, port: int,
                 master_key: str) -> tuple[list[str], dict]:
    cfg = workdir / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {upstream_v1}
      api_key: none
litellm_settings:
  telemetry: false
  drop_params: true
""")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGORA_", "OPENAI_", "DATABASE_URL"))}
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False",
               DISABLE_SCHEMA_UPDATE="True", NO_DOCS="True", LITELLM_MASTER_KEY=master_key)
    return [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"], env


# ---------------------------------------------------------------------------- PostgreSQL
PG_ADMIN = os.environ.get("AGORA_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def pg_create(name: str) -> str:
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


def pg_drop(name: str) -> None:
    import sqlalchemy as sa

    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- py-spy
def pyspy_exe() -> str | None:
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def _frame(f: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func', 'path/file.py')."""
    name, _, loc = f.rpartition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    path = path.replace(str(ROOT) + "/", "").replace(str(TREE[0]) + "/", "")
    return name or f, path


def _thread_of(frames: list[tuple[str, str]]) -> str:
    """Which of the coordinator's threads a stack (root first) belongs to."""
    names = {f"{p}:{n}" for n, p in frames}
    if not frames or frames[0][1] != "threading.py":
        return "main thread: event loop (HTTP, SSE, work channel, bus)"
    if "anyio/_backends/_asyncio.py:WorkerThread.run" in names:
        return "anyio threadpool (run_in_threadpool: handlers' DB work)"
    if any(p.startswith(("celery/", "kombu/")) for _, p in frames):
        return "celery worker thread (dispatch, settle, sweep)"
    if "concurrent/futures/thread.py:_worker" in names:
        return "asyncio default executor (to_thread / run_in_executor)"
    return "other threads"


_CATEGORIES = (  # (label, predicate on a frame (name, path)); a sample counts once per category
    ("SQLAlchemy/SQLModel (ORM + core)", lambda n, p: p.startswith(("sqlalchemy/", "sqlmodel/"))),
    ("  DB driver calls (execute/commit/connect)", lambda n, p: p.startswith("sqlalchemy/engine/default.py")
     and n.startswith(("DefaultDialect.do_", "DefaultExecutionContext")) or p.startswith(("psycopg/", "sqlite3/"))),
    ("pydantic (validation, dump)", lambda n, p: p.startswith(("pydantic/", "pydantic_core/"))),
    ("json", lambda n, p: p.startswith("json/")),
    ("starlette/fastapi (routing, middleware, responses)", lambda n, p: p.startswith(("starlette/", "fastapi/"))),
    ("uvicorn (HTTP protocol)", lambda n, p: p.startswith("uvicorn/")),
    ("websockets (work channel frames)", lambda n, p: p.startswith("websockets/") or "websockets_impl" in p),
    ("celery/kombu (task dispatch)", lambda n, p: p.startswith(("celery/", "kombu/"))),
    ("redis client", lambda n, p: p.startswith("redis/")),
    ("signatures (nacl/cryptography)", lambda n, p: p.startswith(("nacl/", "cryptography/"))),
    ("logging", lambda n, p: p.startswith("logging/")),
    ("coordinator/ code (inclusive)", lambda n, p: p.startswith("coordinator/")),
    ("pricing/ ledger (inclusive)", lambda n, p: p.startswith("pricing/")),
    ("scheduler/ (inclusive)", lambda n, p: p.startswith("scheduler/")),
)


_OWN = ("coordinator/", "scheduler/", "pricing/", "protocol/")


def summarize_pyspy(raw: Path, top: int = 15) -> dict:
    """From py-spy's raw (collapsed) output: total samples, the top functions by self and by
    inclusive samples, the innermost project function of each sample, threads and categories."""
    self_n, incl_n, ours, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    threads, cats, incl_own = collections.Counter(), collections.Counter(), collections.Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n, frames = int(n), [_frame(f) for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        total += n
        if not frames:
            continue
        name, path = frames[-1]
        self_n[f"{path}:{name}"] += n
        seen = set()
        for name, path in frames:
            key = f"{path}:{name}"
            if key not in seen:
                seen.add(key)
                incl_n[key] += n
        own = [f"{p}:{nm}" for nm, p in frames if p.startswith(_OWN) and p != "coordinator/cli.py"]
        for key in set(own):
            incl_own[key] += n
        ours[own[-1] if own else "(outside project code)"] += n
        threads[_thread_of(frames)] += n
        for label, pred in _CATEGORIES:
            if any(pred(nm, p) for nm, p in frames):
                cats[label] += n

    def share(c: collections.Counter) -> list[tuple[str, float]]:
        return [(k, round(v / max(total, 1), 4)) for k, v in c.most_common(top)]

    return {"samples": total, "self": share(self_n), "inclusive": share(incl_n), "innermost_own": share(ours),
            "inclusive_own": share(incl_own),
            "threads": share(threads), "categories": [(k, round(cats[k] / max(total, 1), 4))
                                                      for k, _ in _CATEGORIES if cats[k]]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a minimal OpenAI-compatible upstream (canned text tokens)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--model", default="bench")
    p.add_argument("--delay-ms", type=float, default=0.0, help="between tokens")
    args = p.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
