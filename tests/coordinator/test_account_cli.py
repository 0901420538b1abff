"""`agora account`: create, deposit (idempotent), balance, statement; mistakes are one-line
errors with exit status 1, never a traceback, and move no money."""

from __future__ import annotations

import pytest

from coordinator.cli import cmd_account


def test_account_commands(tmp_path, capsys):
    db = ["--database-url", f"sqlite:///{tmp_path / 'a.db'}"]
    assert cmd_account(["create", "--credit", "5000", *db]) == 0
    key = capsys.readouterr()
    assert key.out.startswith("sk-agora-")
    account_id = key.err.split()[1]
    deposit = ["deposit", account_id, "700", "--idempotency-key", "top-1", *db]
    assert cmd_account(deposit) == 0 and cmd_account(deposit) == 0  # the replay moves nothing
    assert capsys.readouterr().out.split() == ["5700", "5700"]
    assert cmd_account(["deposit", account_id, "800", "--idempotency-key", "top-1", *db]) == 1
    assert "top-1" in capsys.readouterr().err
    assert cmd_account(["deposit", account_id, "0", "--idempotency-key", "top-2", *db]) == 1
    assert "positive" in capsys.readouterr().err
    assert cmd_account(["balance", account_id, *db]) == 0
    assert capsys.readouterr().out.strip() == "5700"
    assert cmd_account(["statement", account_id, *db]) == 0
    assert capsys.readouterr().out.count("deposit") == 2
    assert cmd_account(["balance", "acct_nope", *db]) == 1
    with pytest.raises(SystemExit):
        cmd_account(["deposit", account_id, "-5", "--idempotency-key", "k", *db])
