"""Concurrent verdicts about one node on PostgreSQL lose no update: every pass and failure
is counted, the reputation is what applying them one after another gives, and the ban
follows the counted failures. (Without the node row lock two verdicts read the same
counters and the last write wins.)"""

from __future__ import annotations

import threading

import pytest

from coordinator.audits import REPUTATION, assign_verifier
from coordinator.verdicts import apply_result
from coordinator.db import create_all, make_engine, retry_transient
from coordinator.models import Audit, AuditStatus, Node
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.stake import Stake
from scheduler.audit import update_reputation
from tests.coordinator.test_audits import _node, _reply, _served_and_audited

pytestmark = pytest.mark.postgres


@pytest.fixture
def rt(tmp_path, pg_url):
    settings = CoordinatorSettings(home=tmp_path, database_url=pg_url, run_worker_in_process=False)
    engine = make_engine(pg_url)
    create_all(engine)
    runtime = Runtime(settings, engine=engine)
    yield runtime
    runtime.stop()


@pytest.mark.parametrize("passes,failures", [(10, 0), (0, 10), (6, 6)])
def test_concurrent_verdicts_are_all_counted(rt, passes, failures):
    node = _node(rt, "audited")
    verifiers = [_node(rt, f"v{i}", trusted=True) for i in range(3)]  # their verdicts are final
    with rt.session() as s:
        led = Ledger(s)
        Stake(led).deposit(led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.public_key_hex}").id,
                           10**10, idempotency_key="stake")
    jobs = []
    for honest in [True] * passes + [False] * failures:
        audit, _, _ = _served_and_audited(rt, node)
        with rt.session() as s:
            verifier, _ = assign_verifier(s, s.get(Audit, audit.id), rt.settings)
        jobs.append((audit.id, verifier, honest))
    assert {v for _, v, _ in jobs} <= {v.public_key_hex for v in verifiers}

    start = threading.Barrier(len(jobs))
    errors = []

    def verdict(audit_id, verifier, honest):
        def apply():
            with rt.session() as s:
                return apply_result(s, _reply(audit_id, honest), verifier, rt.settings).status

        try:
            start.wait()
            assert retry_transient(apply, attempts=10) == (AuditStatus.PASSED if honest else AuditStatus.FAILED)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=verdict, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors

    with rt.session() as s:
        n = s.get(Node, node.public_key_hex)
        assert (n.audits_passed, n.audits_failed) == (passes, failures)
        # the reputation of applying the verdicts one at a time, in the order they committed
        order = s.exec(Audit.__table__.select().where(Audit.node_id == n.id).order_by(Audit.resolved_at)).all()
        rep, failed, banned = REPUTATION.initial, 0, False
        for row in order:
            ok = row.status == AuditStatus.PASSED
            failed += not ok
            up = update_reputation(rep, failed, ok, REPUTATION)
            rep, banned = up.reputation, banned or up.banned
        assert n.reputation == pytest.approx(rep) and n.banned == banned == (failures >= REPUTATION.max_failures)
        assert total_balance(s) == 0
