"""Errors of the ledger."""


class LedgerError(Exception):
    pass


class InsufficientFunds(LedgerError):
    def __init__(self, available: int, needed: int):
        super().__init__(f"balance {available} is short of {needed}")
        self.available, self.needed = available, needed


class IdempotencyConflict(LedgerError):
    """The idempotency key was used before with different parameters."""


class HoldNotPending(LedgerError):
    """The hold was already posted or voided (under another idempotency key)."""


class UnknownAccount(LedgerError):
    pass


class HoldExceeded(LedgerError):
    """A settlement posts more than the hold reserved."""


class WrongAccountKind(LedgerError):
    """The operation does not apply to this kind of account."""


class RetryableConflict(LedgerError):
    """A concurrent transaction committed a row (an idempotency key, an account) that this
    transaction's snapshot cannot see (REPEATABLE READ or SERIALIZABLE): roll back and
    retry; the retry replays or uses what the other one committed."""
