"""The control plane at scale: N simulated node agents speaking the real protocol against a
real coordinator process, with the two ways of proving liveness measured in one run.

    .venv/bin/python bench/fleet.py --quick            # < 60 s: 400 nodes, 8 s windows, 10 probes
    .venv/bin/python bench/fleet.py                    # 10,000 nodes, 60 s windows
    .venv/bin/python bench/fleet.py --nodes 2000 --modes channel --profile

The coordinator is `agora serve` on the embedded default (SQLite, in-process Celery worker)
in a fresh AGORA_HOME, canaries off, the per-address registration limit off (every node
registers from 127.0.0.1); everything else at its defaults (heartbeat timeout 20 s, RTT
probe interval, signature window, per-node message limit).

Each simulated node (bench/fleet_sim.py) has its own Ed25519 identity and does what
`node_agent/agent.py` does: a signed `Registration` (one offer of MODEL, verifiable: token
ids and log-probs), then the work channel (`/v1/nodes/channel`, a signed `ChannelHello`,
`welcome`), answering the coordinator's `ping` with `pong`, and websockets' own keepalive
pings every 20 s with permessage-deflate like the agent's client. An assignment is
answered at once with a buyer-fault work error (`bad_request`: the node is not penalised,
the buyer gets a 400) after noting when it arrived.

Liveness, at the agent's default interval (5 s, each node at its own random phase):
  http     the way agents proved liveness before: a signed `Heartbeat` POSTed to
           /v1/nodes/heartbeat (signature check, nonce row, node update per beat). At most
           one in flight per node (the agent awaits it); latency counts from the moment it
           was due, so waiting for one of the simulator's --http-conns connections (the
           box's descriptor limit cannot give every node its own) counts too.
  channel  `{"type": "beat", "t": ..., "ack": ...}` on the open work channel, as the agent
           sends it: every beat is noted (no signature, no per-beat database write: flushed
           in batches) and one in BEAT_ACK_EVERY (6) asks for a `beat_ack` with the same t;
           the round trip is measured on those, heartbeats_per_s counts every beat.
Both modes run on the same coordinator and the same connected fleet, one after the other
(the order of --modes), each: a warm-up of two intervals, then a window of --window-s:
  coordinator_core_share  the coordinator's CPU seconds (/proc, all threads) / wall seconds
  heartbeat_p99_ms        p99 of the heartbeat's round trip in the window (http: POST
                          latency from when it was due; channel: beat -> beat_ack); a beat
                          never answered counts as the agent's 10 s timeout, and where over
                          1% were, heartbeat_p99_censored is true (the real p99 is worse)
  wrongly_offline         N - live_nodes of MODEL in GET /v1/models at the end of the window
  errors                  failed or refused heartbeats, beats never acked, channels lost,
                          buyer requests that did not reach a node or did not end in a 400
  routing_ms_p99          then, beats continuing, --requests buyer requests one at a time
                          (httpx, /v1/chat/completions): sent -> a simulated node holds the
                          assignment (matched by a marker in the prompt)
The simulator's own CPU share and event-loop lag are printed too: where the simulator is
saturated its latencies include its own queueing (the 2 cores are shared).

The last line printed is one JSON object: per-mode figures and the ratios channel / http.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from fleet_sim import Fleet
from results import emit

PY = sys.executable
TICK = os.sysconf("SC_CLK_TCK")
COORD_SETTINGS = {
    "AGORA_CANARY_INTERVAL_S": "0",  # no canary jobs: the channel carries only what is measured
    "AGORA_REGISTRATION_RATE_LIMIT_PER_MIN": "0",  # every simulated node registers from 127.0.0.1
}


def log(msg: str) -> None:
    print(f"[fleet {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (all its threads) and its live descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / TICK
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


def proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Coordinator:
    """`agora serve` in a fresh home, as a child process."""

    def __init__(self, home: Path, extra_env: dict[str, str]):
        self.home, self.port = home, free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        self.env.update(AGORA_HOME=str(home), PYTHONUNBUFFERED="1", **COORD_SETTINGS, **extra_env)
        self.log_path = home / "coordinator.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen([PY, "-m", "agora", "serve", "--port", str(self.port)], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self.log_path.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"coordinator did not answer:\n{self.tail()}")

    def buyer_key(self) -> str:
        out = subprocess.run([PY, "-m", "agora", "account", "create", "--name", "fleet-buyer",
                              "--credit", str(10**13), "--json"], env=self.env, capture_output=True, text=True,
                             timeout=120, cwd=ROOT, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"agora account create failed: {out.stderr}")
        return json.loads(out.stdout.strip().splitlines()[-1])["api_key"]

    def cpu_s(self) -> float:
        return proc_cpu_s(self.proc.pid) if self.proc else 0.0

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_counts(self) -> dict[str, int]:
        """WARNING/ERROR lines the coordinator logged (a hint at what went wrong)."""
        c: collections.Counter = collections.Counter()
        try:
            for line in self.log_path.read_text(errors="replace").splitlines():
                for level in ("ERROR", "WARNING", "Traceback"):
                    if level in line:
                        c[level] += 1
        except OSError:
            pass
        return dict(c)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------------------- profile
def pyspy_start(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    exe = Path(PY).parent / "py-spy"
    exe = str(exe) if exe.exists() else shutil.which("py-spy")
    if not exe:
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "50", "--format", "raw", "--output", str(out), "--nonblocking",
                             "--threads"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def pyspy_summary(raw: Path, top: int = 12) -> dict:
    """Innermost project frame (coordinator/, scheduler/, pricing/, protocol/) of each sample,
    and the top self frames overall, as shares of all samples."""
    own_prefixes = ("coordinator/", "scheduler/", "pricing/", "protocol/")
    ours, leaf, total = collections.Counter(), collections.Counter(), 0
    idle_names = ("select (selectors.py", "_worker (concurrent/futures/thread.py", "wait (threading.py",
                  "get (queue.py", "run (anyio", "epoll", "drain_events (kombu/transport/virtual/base.py:1012")
    idle = 0
    try:
        lines = raw.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n, frames = int(n), [f for f in stack.split(";") if f and not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += n
        last = frames[-1]
        if any(k in last for k in idle_names):
            idle += n
            continue
        leaf[last.split(" (")[0] + " (" + last.rsplit("/", 1)[-1]] += n
        own = [f for f in frames if any("/" + p in f or "(" + p in f for p in own_prefixes)]
        ours[(own[-1].split(" (")[0] + " (" + own[-1].rsplit(" (", 1)[-1].replace(str(ROOT) + "/", ""))
             if own else "(outside project code)"] += n
    busy = max(1, total - idle)
    return {"samples": total, "busy_samples": total - idle,
            "innermost_project_frame_share_of_busy": [(k, round(v / busy, 3)) for k, v in ours.most_common(top)],
            "top_self_share_of_busy": [(k, round(v / busy, 3)) for k, v in leaf.most_common(top)]}


# ---------------------------------------------------------------------------- one mode
async def measure_mode(fleet: Fleet, coord: Coordinator, mode: str, args, buyer: httpx.AsyncClient) -> dict:
    interval = args.interval
    log(f"mode {mode}: beating every {interval:g}s; warm-up {args.warmup_s:g}s")
    fleet.start_mode(mode)
    await asyncio.sleep(args.warmup_s)
    prof = None
    if args.profile:
        prof_path = coord.home / f"pyspy-{mode}.txt"
        prof = pyspy_start(coord.proc.pid, args.window_s, prof_path)
    log(f"mode {mode}: window {args.window_s:g}s")
    fleet.open_window()
    c0, s0, w0 = coord.cpu_s(), time.process_time(), time.monotonic()
    progress_at = w0
    while time.monotonic() - w0 < args.window_s:
        await asyncio.sleep(min(1.0, args.window_s - (time.monotonic() - w0)))
        if time.monotonic() - progress_at >= 10:
            progress_at = time.monotonic()
            log(f"mode {mode}: {progress_at - w0:.0f}s, coordinator {(coord.cpu_s() - c0) / (progress_at - w0):.2f} "
                f"core, {fleet.window_summary(mode)}")
    c1, s1, w1 = coord.cpu_s(), time.process_time(), time.monotonic()
    fleet.close_window()
    live = await fleet.live_nodes(buyer)
    rss = proc_rss_mb(coord.proc.pid)
    await asyncio.sleep(1.0 if args.quick else min(3.0, interval))  # answers to beats sent in the window
    hb = fleet.window_stats(mode)
    routing = await fleet.route_probes(buyer, args.requests, args.probe_budget_s)
    live_after = await fleet.live_nodes(buyer)
    profile = None
    if prof is not None:
        try:
            _, err = prof.communicate(timeout=30)
            profile = pyspy_summary(coord.home / f"pyspy-{mode}.txt") or {"error": err.decode()[-300:]}
        except subprocess.TimeoutExpired:
            prof.kill()
    out = {
        "nodes": fleet.n,
        "connected": fleet.connected,
        "coordinator_core_share": round((c1 - c0) / (w1 - w0), 3),
        "heartbeat_p50_ms": hb["p50_ms"],
        "heartbeat_p99_ms": hb["p99_ms"],
        "heartbeat_max_ms": hb["max_ms"],
        "heartbeat_p99_censored": hb["censored"],
        "heartbeats": hb["sent"],  # measured round trips (channel: the beats that ask for an ack)
        "heartbeats_per_s": round(hb["beats"] / (w1 - w0), 1),  # every beat the coordinator took
        "routing_probes": f"{routing['routed']}/{routing['sent']}",
        "routing_ms_p50": routing["p50_ms"],
        "routing_ms_p99": routing["p99_ms"],
        "buyer_400_ms_p50": routing["answer_p50_ms"],
        "wrongly_offline": fleet.n - live if live is not None else None,
        "wrongly_offline_after_routing": fleet.n - live_after if live_after is not None else None,
        "errors": hb["errors"] + routing["errors"] + fleet.channel_drops_in_window,
        "error_detail": {**hb["error_detail"], **routing["error_detail"],
                         "channels_lost": fleet.channel_drops_in_window},
        "coordinator_rss_mb": round(rss),
        "sim_core_share": round((s1 - s0) / (w1 - w0), 3),
        "sim_loop_lag_p99_ms": fleet.loop_lag_p99_ms(),
        "window_s": round(w1 - w0, 1),
    }
    if profile is not None:
        out["profile"] = profile
    fleet.stop_mode()
    await asyncio.sleep(0.5)
    return out


async def run(args) -> dict:
    home = Path(tempfile.mkdtemp(prefix="agora-fleet-"))
    extra = {}
    if args.probe_interval_s:
        extra["AGORA_RTT_PROBE_INTERVAL_S"] = str(args.probe_interval_s)
    coord = Coordinator(home, extra)
    t_start = time.monotonic()
    log(f"coordinator in {home}")
    coord.start()
    key = coord.buyer_key()
    fleet = Fleet(n=args.nodes, base=coord.base, interval_s=args.interval, http_conns=args.http_conns,
                  deflate=not args.no_deflate, ws_ping_interval=args.ws_ping_interval, log=log)
    results: dict = {}
    setup_mode = "channel" if "channel" in args.modes else "http"
    setup: dict = {"beats_while_connecting": f"{setup_mode} every {max(args.interval, 15.0):g}s"}
    try:
        async with httpx.AsyncClient(base_url=coord.base, timeout=60,
                                     headers={"Authorization": f"Bearer {key}"}) as buyer:
            t = time.monotonic()
            fleet.make_identities()
            setup["identities_s"] = round(time.monotonic() - t, 1)
            t, c = time.monotonic(), coord.cpu_s()
            reg = await fleet.register_all(args.register_concurrency)
            setup["register_s"] = round(time.monotonic() - t, 1)
            setup["register_per_s"] = round(args.nodes / max(1e-9, time.monotonic() - t), 1)
            setup["register_coordinator_cpu_ms_each"] = round((coord.cpu_s() - c) * 1000 / max(1, args.nodes), 2)
            setup["register_errors"] = reg
            # Agents beat from the moment their channel is open: while the fleet connects, the
            # channel's way (the cheapest) and only as often as staying live needs (15 s of the
            # 20 s timeout); each measured mode starts with a warm-up at the real interval.
            fleet.start_mode(setup_mode, interval_s=max(args.interval, 15.0))
            t, c = time.monotonic(), coord.cpu_s()
            await fleet.connect_all(args.connect_concurrency)
            setup["connect_s"] = round(time.monotonic() - t, 1)
            setup["connect_coordinator_cpu_ms_each"] = round((coord.cpu_s() - c) * 1000 / max(1, args.nodes), 2)
            setup["connected"] = fleet.connected
            setup["connect_errors"] = dict(fleet.connect_errors)
            fleet.start_lag_monitor()
            t = time.monotonic()
            live = await fleet.wait_live(buyer, timeout=args.interval * 4 + 10)
            setup["live_after_connect"] = live
            setup["wait_live_s"] = round(time.monotonic() - t, 1)
            setup["coordinator_rss_mb"] = round(proc_rss_mb(coord.proc.pid))
            log(f"setup: {setup}")
            for mode in args.modes:
                if coord.proc.poll() is not None:
                    raise RuntimeError(f"coordinator exited:\n{coord.tail()}")
                results[mode] = await measure_mode(fleet, coord, mode, args, buyer)
                log(f"mode {mode}: {json.dumps({k: v for k, v in results[mode].items() if k != 'profile'})}")
    finally:
        await fleet.close()
        coord.stop()
        setup["coordinator_log"] = coord.log_counts()
        if args.keep:
            log(f"kept {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)
    setup["total_s"] = round(time.monotonic() - t_start, 1)
    return {"setup": setup, "modes": results}


def ratio(a, b):
    return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None


def report(args, res: dict) -> None:
    modes = res["modes"]
    cols = ["nodes", "coordinator_core_share", "heartbeat_p50_ms", "heartbeat_p99_ms", "heartbeats_per_s",
            "routing_probes", "routing_ms_p50", "routing_ms_p99", "wrongly_offline", "errors", "coordinator_rss_mb",
            "sim_core_share", "sim_loop_lag_p99_ms"]
    print(f"\nfleet: {args.nodes} simulated node agents, heartbeat every {args.interval:g}s, "
          f"window {args.window_s:g}s per mode, {args.requests} routing probes per mode")
    print(f"setup: {json.dumps(res['setup'])}")
    print(f"{'':<26}" + "".join(f"{m:>14}" for m in modes))
    for c in cols:
        print(f"{c:<26}" + "".join(f"{modes[m].get(c)!s:>14}" for m in modes))
    for m, r in modes.items():
        if r.get("error_detail"):
            print(f"{m} errors: {json.dumps(r['error_detail'])}")
        if r.get("profile"):
            print(f"{m} coordinator profile (innermost project frame, share of busy samples):")
            for k, v in r["profile"].get("innermost_project_frame_share_of_busy", []):
                print(f"    {v:6.1%}  {k}")
    out = {"bench": "fleet", "nodes": args.nodes, "interval_s": args.interval, "window_s": args.window_s,
           "quick": args.quick, "setup": {k: res["setup"].get(k) for k in ("register_per_s", "connected",
                                                                          "connect_s", "live_after_connect")}}
    for m, r in modes.items():
        out[m] = {k: r.get(k) for k in ("nodes", "coordinator_core_share", "heartbeat_p99_ms", "routing_ms_p99",
                                        "wrongly_offline", "errors", "heartbeat_p50_ms", "heartbeat_p99_censored",
                                        "heartbeats_per_s", "routing_probes", "routing_ms_p50", "sim_core_share",
                                        "sim_loop_lag_p99_ms")}
    if "http" in modes and "channel" in modes:
        h, c = modes["http"], modes["channel"]
        out["channel_vs_http"] = {
            "core_share_ratio": ratio(c["coordinator_core_share"], h["coordinator_core_share"]),
            "heartbeat_p99_ratio": ratio(c["heartbeat_p99_ms"], h["heartbeat_p99_ms"]),
            "heartbeat_p99_ratio_upper_bound": bool(h.get("heartbeat_p99_censored")),  # http's p99 is at least
            "routing_p99_ratio": ratio(c["routing_ms_p99"], h["routing_ms_p99"]),
        }
    if "channel" in modes:
        c = modes["channel"]
        out["targets_met"] = {
            "core_share_le_0.5": c["coordinator_core_share"] is not None and c["coordinator_core_share"] <= 0.5,
            "no_wrongly_offline": c["wrongly_offline"] == 0,
            "heartbeat_p99_le_50ms": c["heartbeat_p99_ms"] is not None and c["heartbeat_p99_ms"] <= 50,
            "nodes_10000": args.nodes >= 10000,
        }
    emit("fleet", out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=None, help="simulated node agents (default 10000; --quick 500)")
    p.add_argument("--quick", action="store_true", help="< 60 s: 400 nodes, 8 s windows, 10 probes (5 s at most)")
    p.add_argument("--modes", default="http,channel", help="comma list of http, channel (run in this order)")
    p.add_argument("--interval", type=float, default=5.0, help="heartbeat interval (the agent's default: 5 s)")
    p.add_argument("--window-s", type=float, default=None, help="measured window per mode (default 60; quick 10)")
    p.add_argument("--warmup-s", type=float, default=None, help="per mode before the window (default 2 intervals)")
    p.add_argument("--requests", type=int, default=None, help="routing probes per mode (default 50; quick 10)")
    p.add_argument("--probe-budget-s", type=float, default=None,
                   help="stop a mode's routing probes after this long (default 120; quick 5)")
    p.add_argument("--register-concurrency", type=int, default=16)
    p.add_argument("--connect-concurrency", type=int, default=64)
    p.add_argument("--http-conns", type=int, default=256, help="simulator's HTTP connections for heartbeats")
    p.add_argument("--ws-ping-interval", type=float, default=20.0, help="websockets keepalive (agent: 20 s; 0: off)")
    p.add_argument("--no-deflate", action="store_true", help="no permessage-deflate (the agent negotiates it)")
    p.add_argument("--probe-interval-s", type=float, default=None,
                   help="AGORA_RTT_PROBE_INTERVAL_S for the coordinator (default: its own)")
    p.add_argument("--profile", action="store_true", help="py-spy the coordinator during each window")
    p.add_argument("--keep", action="store_true", help="keep the coordinator's home (log, database)")
    args = p.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("http", "channel") for m in args.modes):
        p.error("--modes: http and/or channel")
    if args.nodes is None:
        args.nodes = 400 if args.quick else 10000
    if args.window_s is None:
        args.window_s = 8.0 if args.quick else 60.0
    if args.warmup_s is None:
        args.warmup_s = args.interval * (0.6 if args.quick else 2)
    if args.requests is None:
        args.requests = 10 if args.quick else 50
    if args.probe_budget_s is None:
        args.probe_budget_s = 5.0 if args.quick else 120.0
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.nodes + args.http_conns + 200 > hard:
        log(f"warning: {args.nodes} websockets + {args.http_conns} HTTP connections exceed this process's "
            f"descriptor limit {hard}")
    res = asyncio.run(run(args))
    report(args, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
