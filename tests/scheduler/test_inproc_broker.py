"""The embedded broker (`scheduler/inproc_broker.py`): a message wakes its consumer at once,
and an idle consumer does not poll."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from kombu import Connection, Exchange, Queue

from scheduler import inproc_broker
from scheduler.celery_app import configure


@pytest.fixture
def conn():
    configure("memory://localhost/")  # points kombu's `memory` alias at the woken transport
    with Connection("memory://localhost/") as c:
        assert isinstance(c.transport, inproc_broker.Transport)
        yield c


def test_a_message_wakes_the_waiting_consumer_at_once(conn):
    q = Queue("wake-test", Exchange("wake-test"), "wake-test")
    got, arrived = [], threading.Event()

    def on_message(body, message):
        got.append((body, time.perf_counter()))
        message.ack()
        arrived.set()

    with conn.Consumer(q, callbacks=[on_message]):
        waiter = threading.Thread(target=lambda: conn.drain_events(timeout=5), daemon=True)
        waiter.start()
        time.sleep(0.2)  # the consumer is waiting now, past its first look at the queue
        sent = time.perf_counter()
        conn.Producer().publish({"n": 1}, exchange=q.exchange, routing_key="wake-test", declare=[q])
        assert arrived.wait(2)
        waiter.join(2)
    assert got[0][0] == {"n": 1}
    # kombu's own memory transport would have slept its polling interval (1 s by default)
    assert got[0][1] - sent < inproc_broker.FALLBACK_S / 2


def test_an_idle_consumer_does_not_poll(conn, monkeypatch):
    q = Queue("idle-test", Exchange("idle-test"), "idle-test")
    looks = []
    with conn.Consumer(q, callbacks=[lambda body, message: message.ack()]):
        real = conn.transport.cycle.get
        monkeypatch.setattr(conn.transport.cycle, "get", lambda *a, **kw: (looks.append(1), real(*a, **kw))[1])
        started = time.monotonic()
        with pytest.raises(socket.timeout):
            conn.drain_events(timeout=1.0)
        assert time.monotonic() - started >= 1.0
    assert len(looks) <= 1 / inproc_broker.FALLBACK_S + 2  # kombu's memory transport at 2 ms: ~500
