"""`agora worker` supervision: a worker that dies is started again, with backoff; a
SIGTERM stops the worker and the supervision, without a restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SUPERVISOR = ("import sys; from coordinator.supervise import supervise; "
              "sys.exit(supervise(sys.argv[1:], base_delay_s=0.05, max_delay_s=0.2))")


def _starts(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_dying_child_is_restarted_until_the_supervisor_is_stopped(tmp_path):
    log = tmp_path / "starts"
    child = f"open({str(log)!r}, 'a').write('start\\n'); raise SystemExit(3)"  # dies at once, every time
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, sys.executable, "-c", child],
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while _starts(log) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _starts(log) >= 3
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0
    assert "exited with code 3; restarting it" in sup.stderr.read()


def test_sigterm_stops_a_running_child_and_is_not_followed_by_a_restart(tmp_path):
    log = tmp_path / "starts"
    child = f"import time; open({str(log)!r}, 'a').write('start\\n'); time.sleep(60)"
    sup = subprocess.Popen([sys.executable, "-c", SUPERVISOR, sys.executable, "-c", child])
    deadline = time.monotonic() + 20
    while _starts(log) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    t0 = time.monotonic()
    sup.send_signal(signal.SIGTERM)
    assert sup.wait(timeout=10) == 0 and time.monotonic() - t0 < 5  # the child got the signal too
    time.sleep(0.3)
    assert _starts(log) == 1
