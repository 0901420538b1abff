"""OpenAI's Files and Batches API: /v1/files and /v1/batches (coordinator/batches.py).

Everything is per account: another account's file or batch answers 404.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from coordinator import batches
from coordinator.batch_input import parse
from coordinator.body_limit import BodyTooLarge
from coordinator.errors import BadRequest, NotFound
from coordinator.file_store import FileMissing, FileStore, StoreUnavailable
from coordinator.models import Account
from coordinator.routes.deps import current_account, runtime
from coordinator.runtime import Runtime

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["batch"])


def file_store(request: Request) -> FileStore:
    return request.app.state.file_store


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=40)
    endpoint: str = Field(max_length=64)
    completion_window: str = Field(max_length=8)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


@router.post("/files")
async def upload_file(file: UploadFile = File(...), purpose: str = Form(...),
                      account: Account = Depends(current_account), rt: Runtime = Depends(runtime),
                      store: FileStore = Depends(file_store)):
    """Upload a JSONL batch input (purpose `batch`); every line is checked, errors name it."""
    if purpose != "batch":
        raise BadRequest(f"purpose must be 'batch' (the only kind of file this market takes), not {purpose!r}",
                         param="purpose")
    limit = rt.settings.batch_file_max_bytes
    data = await file.read(limit + 1)
    if len(data) > limit:
        raise BodyTooLarge(f"the file is larger than this market's limit of {limit} bytes", param="file")
    checked = await run_in_threadpool(parse, data, rt.settings.batch_max_lines)
    if checked.errors:
        raise BadRequest(f"the batch file is invalid: {checked.summary()}", param="file", code="invalid_batch_file")

    def _store():
        with rt.session() as s:
            return batches.file_object(batches.store_file(s, store, account.id, purpose, file.filename or "batch.jsonl",
                                                          data, len(checked.lines)))

    return await run_in_threadpool(_store)


@router.get("/files")
async def list_files(purpose: str | None = Query(default=None, max_length=32),
                     after: str | None = Query(default=None, max_length=40),
                     limit: int = Query(default=10_000, ge=1, le=10_000),
                     order: str = Query(default="desc", pattern="^(asc|desc)$"),
                     account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _list():
        with rt.read_session() as s:
            return batches.file_page(s, account, purpose, after, limit, order)

    return await run_in_threadpool(_list)


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime),
                      store: FileStore = Depends(file_store)):
    def _delete():
        with rt.session() as s:
            f = batches.delete_file(s, account, file_id)
            fid = f.id
        try:  # after the row is gone: a crash in between leaves unnamed bytes, never a dangling row
            store.delete(fid)
        except StoreUnavailable as exc:  # the file is deleted for the buyer; its bytes are left behind
            log.warning("file %s: row deleted, its bytes not: %s", fid, exc.message)
        return {"id": fid, "object": "file", "deleted": True}

    return await run_in_threadpool(_delete)


@router.get("/files/{file_id}")
async def get_file(file_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _get():
        with rt.read_session() as s:
            return batches.file_object(batches.own_file(s, account, file_id))

    return await run_in_threadpool(_get)


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime),
                       store: FileStore = Depends(file_store)):
    def _get():
        with rt.read_session() as s:
            f = batches.own_file(s, account, file_id)
        try:
            return store.get(f.id)
        except FileMissing:
            raise NotFound(f"the content of file {file_id!r} is gone", param="file_id") from None

    return Response(await run_in_threadpool(_get), media_type="application/jsonl")


@router.post("/batches")
async def create_batch(body: BatchCreate, account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _create():
        with rt.session() as s:
            return batches.batch_object(batches.create(s, account, body.input_file_id, body.endpoint,
                                                       body.completion_window, body.metadata))

    return await run_in_threadpool(_create)


@router.get("/batches")
async def list_batches(after: str | None = Query(default=None, max_length=40), limit: int = Query(default=20, ge=1, le=100),
                       account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _list():
        with rt.read_session() as s:
            return batches.page(s, account, after, limit)

    return await run_in_threadpool(_list)


@router.get("/batches/{batch_id}")
async def get_batch(batch_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _get():
        with rt.read_session() as s:
            return batches.batch_object(batches.own_batch(s, account, batch_id))

    return await run_in_threadpool(_get)


@router.post("/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _cancel():
        with rt.session() as s:
            return batches.batch_object(batches.cancel(s, account, batch_id))

    return await run_in_threadpool(_cancel)
