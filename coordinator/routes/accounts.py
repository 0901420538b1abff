"""Account routes: a buyer's own balance; operator routes to create and fund accounts."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from coordinator import account_service
from coordinator.auth import bearer_token, require_admin
from coordinator.models import Account, AccountPublic
from coordinator.routes.deps import current_account, runtime
from coordinator.runtime import Runtime
from coordinator.usage import usage
from coordinator.errors import BadRequest, Conflict, NotFound
from pricing.errors import IdempotencyConflict
from pricing.ledger import AccountKind, Ledger
from pricing.stake import Stake
from pricing.statement import statement

router = APIRouter(tags=["accounts"])


@router.get("/v1/account")
async def my_account(account: Account = Depends(current_account), rt: Runtime = Depends(runtime)) -> AccountPublic:
    def _do():
        with rt.read_session() as s:
            led = Ledger(s)
            return AccountPublic(id=account.id, name=account.name,
                                 balance_nano_usd=led.balance(account.ledger_account_id),
                                 held_nano_usd=led.held(account.ledger_account_id),
                                 response_cache=account.response_cache)

    return await run_in_threadpool(_do)


class AccountUpdate(BaseModel):
    model_config = {"extra": "forbid"}

    response_cache: bool | None = Field(default=None, description="cache the answers of this account's "
                                        "deterministic requests by default (a request's X-Agora-Cache overrides it)")


@router.patch("/v1/account")
async def update_my_account(body: AccountUpdate, request: Request, account: Account = Depends(current_account),
                            rt: Runtime = Depends(runtime)) -> AccountPublic:
    """The account owner's settings. Takes effect at once for this API key on this API
    process, within `api_key_cache_s` elsewhere (keys are cached)."""
    def _do():
        with rt.session() as s:
            row = s.get(Account, account.id)
            if body.response_cache is not None:
                row.response_cache = body.response_cache
            s.add(row)
            s.flush()
            s.refresh(row)
            s.expunge(row)
            return row

    fresh = await run_in_threadpool(_do)
    rt.keys.put(bearer_token(request), fresh)
    return await my_account(fresh, rt)


@router.get("/v1/account/usage")
async def my_usage(days: float = Query(30.0, gt=0, le=366), account: Account = Depends(current_account),
                   rt: Runtime = Depends(runtime)):
    """The buyer's usage: spend by model and day, requests served from the response cache
    counted apart, recent requests (as the usage dashboard)."""
    def _do():
        with rt.read_session() as s:
            return usage(s, account.id, days=days)

    return await run_in_threadpool(_do)


@router.get("/v1/account/statement")
async def my_statement(limit: int = Query(50, ge=1, le=500), before: int | None = Query(None, ge=1, le=2**63 - 1),
                       account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    """The buyer's transfers, newest first, each with its request id (paged: pass
    `next_cursor` as `before`)."""

    def _do():
        with rt.session() as s:
            page = statement(s, account.ledger_account_id, limit=limit, before=before)
            return {"account_id": account.id, "balance_nano_usd": page.balance,
                    "entries": [asdict(e) for e in page.entries], "next_cursor": page.next_cursor}

    return await run_in_threadpool(_do)


class StakeDeposit(BaseModel):
    amount_nano_usd: int = Field(gt=0, le=10**18)
    idempotency_key: str = Field(min_length=1, max_length=160)


@router.post("/admin/nodes/{node_id}/stake", dependencies=[Depends(require_admin)])
async def record_stake(node_id: str, body: StakeDeposit, rt: Runtime = Depends(runtime)):
    """Record a seller's stake deposit (operator). The node may register before or after."""
    if len(node_id) != 64 or any(c not in "0123456789abcdef" for c in node_id):
        raise BadRequest("node id must be the node's Ed25519 public key, 64 hex characters")

    def _do():
        with rt.session() as s:
            ledger = Ledger(s)
            stake_id = ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node_id}").id
            try:
                balance = Stake(ledger).deposit(stake_id, body.amount_nano_usd,
                                                idempotency_key=f"stake:{body.idempotency_key}")
            except IdempotencyConflict as exc:
                raise Conflict(str(exc), code="idempotency_conflict") from exc
            return {"node_id": node_id, "stake_nano_usd": balance}

    return await run_in_threadpool(_do)


class AccountCreate(BaseModel):
    name: str = Field(default="buyer", max_length=100)
    credit_nano_usd: int = Field(default=0, ge=0, le=10**18)


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
