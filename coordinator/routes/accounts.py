"""Account routes: a buyer's own balance; operator routes to create and fund accounts."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from coordinator import account_service
from coordinator.auth import require_admin
from coordinator.models import Account, AccountPublic
from coordinator.routes.deps import current_account, runtime
from coordinator.runtime import Runtime
from coordinator.errors import Conflict, NotFound
from pricing.errors import IdempotencyConflict
from pricing.ledger import Ledger

router = APIRouter(tags=["accounts"])


@router.get("/v1/account")
async def my_account(account: Account = Depends(current_account), rt: Runtime = Depends(runtime)) -> AccountPublic:
    def _do():
        with rt.session() as s:
            return AccountPublic(id=account.id, name=account.name,
                                 balance_nano_usd=Ledger(s).balance(account.ledger_account_id))

    return await run_in_threadpool(_do)


class AccountCreate(BaseModel):
    name: str = Field(default="buyer", max_length=100)
    credit_nano_usd: int = Field(default=0, ge=0)


class DepositCreate(BaseModel):
    amount_nano_usd: int = Field(gt=0, le=10**18)
    idempotency_key: str = Field(min_length=1, max_length=160)


@router.post("/admin/accounts/{account_id}/deposits", dependencies=[Depends(require_admin)])
async def deposit(account_id: str, body: DepositCreate, rt: Runtime = Depends(runtime)):
    """Credit a buyer (operator). A replay with the same key returns the first answer."""

    def _do():
        with rt.session() as s:
            account = s.get(Account, account_id)
            if account is None:
                raise NotFound(f"no account {account_id}")
            try:
                balance = Ledger(s).deposit(account.ledger_account_id, body.amount_nano_usd,
                                            idempotency_key=f"deposit:{body.idempotency_key}")
            except IdempotencyConflict as exc:
                raise Conflict(str(exc), code="idempotency_conflict") from exc
            return {"account_id": account_id, "balance_nano_usd": balance}

    return await run_in_threadpool(_do)


@router.post("/admin/accounts", dependencies=[Depends(require_admin)])
async def create_account(body: AccountCreate, rt: Runtime = Depends(runtime)):
    def _do():
        with rt.session() as s:
            account, key = account_service.create_account(s, body.name, body.credit_nano_usd)
            return {"id": account.id, "api_key": key, "credit_nano_usd": body.credit_nano_usd}

    return await run_in_threadpool(_do)
