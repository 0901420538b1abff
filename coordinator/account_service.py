"""Creating buyer accounts: a ledger account, an API key (shown once), optional credit."""

from __future__ import annotations

import secrets

from sqlmodel import Session

from coordinator.auth import hash_key, new_api_key
from coordinator.models import Account, ApiKey
from pricing.ledger import AccountKind, Ledger


def create_account(session: Session, name: str, credit_nano_usd: int = 0) -> tuple[Account, str]:
    if credit_nano_usd < 0:
        raise ValueError("credit must be >= 0")
    account_id = "acct_" + secrets.token_hex(8)
    ledger = Ledger(session)
    ledger_account = ledger.open_account(AccountKind.BUYER, ref=account_id)
    account = Account(id=account_id, name=name, ledger_account_id=ledger_account.id)
    session.add(account)
    key = new_api_key()
    session.add(ApiKey(account_id=account_id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    if credit_nano_usd:
        ledger.deposit(ledger_account.id, credit_nano_usd, idempotency_key=f"initial-credit:{account_id}")
    return account, key
