"""Helpers of `bench/overhead.py` and `bench/backlog.py`: process handling (spawn, wait,
CPU seconds from /proc), the upstream (`bench/upstream.py --fixed --mode text`: canned text
tokens, no log-probs or ids, so `agora node --engine openai` registers as an unverifiable
seller whose jobs are never audited and the relay is measured without audits), LiteLLM's
proxy in a venv of its own, a throw-away PostgreSQL database, and a py-spy profile summary.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = [ROOT]  # the source tree the market's processes run from (bench/overhead.py --tree)


def upstream_argv(port: int, model: str, delay_ms: float = 0.0) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "upstream.py"), "--fixed", "--mode", "text", "--port", str(port),
            "--model", model, "--delay-ms", str(delay_ms)]


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
