"""The Batch API's records: files and batches of an account, their OpenAI-shaped objects,
creation, cancellation and the output and error files written when a batch ends.

Statuses: validating -> in_progress -> finalizing -> completed, or failed (the input did
not validate), cancelling -> cancelled, expired (the completion window ran out). The lines
themselves run in `batch_runner.py`.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, update
from sqlmodel import Session, col, select

from coordinator.errors import BadRequest, Conflict, NotFound
from coordinator.file_store import FileStore
from coordinator.models import Account, Batch, BatchFile, BatchLine
from coordinator.models.account import utcnow

WINDOWS = {"24h": timedelta(hours=24)}
RUNNING = ("validating", "in_progress", "finalizing", "cancelling")  # a runner still has work on these


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


def _ts(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def file_object(f: BatchFile) -> dict[str, Any]:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": _ts(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": "processed", "status_details": None, "expires_at": None}


def batch_object(b: Batch) -> dict[str, Any]:
    return {
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "model": b.model,
        "errors": {"object": "list", "data": b.errors} if b.errors else None,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window, "status": b.status,
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": _ts(b.created_at), "in_progress_at": _ts(b.in_progress_at), "expires_at": _ts(b.expires_at),
        "finalizing_at": _ts(b.finalizing_at), "completed_at": _ts(b.completed_at), "failed_at": _ts(b.failed_at),
        "expired_at": _ts(b.expired_at), "cancelling_at": _ts(b.cancelling_at), "cancelled_at": _ts(b.cancelled_at),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.meta,
    }


def own_file(session: Session, account: Account, file_id: str, *, lock: bool = False) -> BatchFile:
    f = session.get(BatchFile, file_id, with_for_update=lock)
    if f is None or f.account_id != account.id:  # another account's file does not exist for this one
        raise NotFound(f"no file {file_id!r}", param="file_id")
    return f


def own_batch(session: Session, account: Account, batch_id: str, *, lock: bool = False) -> Batch:
    b = session.get(Batch, batch_id, with_for_update=lock)
    if b is None or b.account_id != account.id:
        raise NotFound(f"no batch {batch_id!r}", param="batch_id")
    return b


def store_file(session: Session, store: FileStore, account_id: str, purpose: str, filename: str, data: bytes,
               lines: int, file_id: str | None = None) -> BatchFile:
    """The bytes first, then the row: a row never names bytes that are not there."""
    f = BatchFile(id=file_id or new_file_id(), account_id=account_id, purpose=purpose, filename=filename[:255],
                  bytes=len(data), lines=lines)
    store.put(f.id, data)
    session.add(f)
    return f


def create(session: Session, account: Account, input_file_id: str, endpoint: str, completion_window: str,
           metadata: dict[str, str] | None) -> Batch:
    if endpoint not in ("/v1/chat/completions", "/v1/completions"):
        raise BadRequest(f"endpoint must be /v1/chat/completions or /v1/completions, not {endpoint!r}",
                         param="endpoint")
    if completion_window not in WINDOWS:
        raise BadRequest(f"completion_window must be one of {sorted(WINDOWS)}", param="completion_window")
    f = own_file(session, account, input_file_id, lock=True)  # against a concurrent delete_file
    if f.purpose != "batch":
        raise BadRequest(f"file {input_file_id!r} was uploaded with purpose {f.purpose!r}, not 'batch'",
                         param="input_file_id")
    now = utcnow()
    b = Batch(id=new_batch_id(), account_id=account.id, endpoint=endpoint, model="", input_file_id=f.id,
              completion_window=completion_window, status="validating", total=f.lines, meta=metadata or None,
              created_at=now, expires_at=now + WINDOWS[completion_window])
    session.add(b)
    return b


def page(session: Session, account: Account, after: str | None, limit: int) -> dict[str, Any]:
    """Newest first; `after` is the last id of the previous page."""
    q = select(Batch).where(Batch.account_id == account.id)
    if after:
        mark = session.get(Batch, after)
        if mark is None or mark.account_id != account.id:
            raise NotFound(f"no batch {after!r} to list after", param="after")
        q = q.where(or_(Batch.created_at < mark.created_at,
                        and_(Batch.created_at == mark.created_at, col(Batch.id) < mark.id)))
    rows = session.exec(q.order_by(col(Batch.created_at).desc(), col(Batch.id).desc()).limit(limit + 1)).all()
    data = [batch_object(b) for b in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


def file_page(session: Session, account: Account, purpose: str | None, after: str | None, limit: int,
              order: str) -> dict[str, Any]:
    """The account's files, newest first (`order` "desc") or oldest first; `after` is the
    last id of the previous page."""
    q = select(BatchFile).where(BatchFile.account_id == account.id)
    if purpose:
        q = q.where(BatchFile.purpose == purpose)
    newest = order == "desc"
    if after:
        mark = session.get(BatchFile, after)
        if mark is None or mark.account_id != account.id:
            raise NotFound(f"no file {after!r} to list after", param="after")
        if newest:
            q = q.where(or_(BatchFile.created_at < mark.created_at,
                            and_(BatchFile.created_at == mark.created_at, col(BatchFile.id) < mark.id)))
        else:
            q = q.where(or_(BatchFile.created_at > mark.created_at,
                            and_(BatchFile.created_at == mark.created_at, col(BatchFile.id) > mark.id)))
    keys = (col(BatchFile.created_at).desc(), col(BatchFile.id).desc()) if newest else \
        (col(BatchFile.created_at).asc(), col(BatchFile.id).asc())
    rows = session.exec(q.order_by(*keys).limit(limit + 1)).all()
    data = [file_object(f) for f in rows[:limit]]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(rows) > limit}


def delete_file(session: Session, account: Account, file_id: str) -> BatchFile:
    """Delete the row (the caller then deletes the bytes: a row never names bytes that are
    gone). The input of a batch a runner still reads cannot be deleted: 409."""
    f = own_file(session, account, file_id, lock=True)  # against a concurrent batch create
    busy = session.exec(select(Batch.id).where(Batch.input_file_id == f.id, col(Batch.status).in_(RUNNING))).first()
    if busy is not None:
        raise Conflict(f"file {file_id!r} is the input of batch {busy!r}, which is still running; cancel it or "
                       "wait for it to end", param="file_id", code="file_in_use")
    session.delete(f)
    return f


def cancel(session: Session, account: Account, batch_id: str) -> Batch:
    """Lines not started are never held: they end at once (no money moves); lines in flight
    finish and are paid as usual; the runner then writes the files and ends it `cancelled`."""
    b = own_batch(session, account, batch_id, lock=True)
    if b.status in ("cancelling", "cancelled"):
        return b
    if b.status not in ("validating", "in_progress"):
        raise Conflict(f"batch {batch_id!r} is {b.status}: it can no longer be cancelled", param="batch_id")
    b.status, b.cancelling_at = "cancelling", utcnow()
    session.add(b)
    end_pending(session, b, "batch_cancelled", "the batch was cancelled before this request started")
    return b


def end_pending(session: Session, b: Batch, code: str, message: str) -> int:
    """Lines not yet started end with `code` (cancelled or expired); never held, never charged."""
    ended = session.exec(update(BatchLine).where(BatchLine.batch_id == b.id, BatchLine.state == "pending").values(
        state="failed", status_code=None, finished_at=utcnow(),
        result={"error": {"code": code, "message": message}})).rowcount
    b.failed += ended
    session.add(b)
    return ended


def _line_json(b: Batch, line: BatchLine, costs: dict[str, int] | None = None) -> dict[str, Any]:
    rid = f"batch_req_{b.id.removeprefix('batch_')}_{line.idx}"
    if line.status_code is None:  # never reached the market (cancelled, expired)
        return {"id": rid, "custom_id": line.custom_id, "response": None, "error": (line.result or {}).get("error")}
    body = line.result
    if costs is not None and line.request_id in costs and isinstance(body, dict) and isinstance(body.get("usage"), dict):
        body = {**body, "usage": {**body["usage"], "cost_nano_usd": costs[line.request_id]}}  # what was charged
    return {"id": rid, "custom_id": line.custom_id,
            "response": {"status_code": line.status_code, "request_id": line.request_id, "body": body},
            "error": None}


def finalize(session: Session, store: FileStore, b: Batch, costs: dict[str, int] | None = None) -> None:
    """Write the output file (answered lines) and the error file (the rest) and end the batch.
    `costs`: request id -> what settlement charged, written into each answer's usage.
    File ids follow from the batch id, so a finalization redone after a crash rewrites the same
    files instead of making new ones."""
    lines = session.exec(select(BatchLine).where(BatchLine.batch_id == b.id).order_by(BatchLine.idx)).all()
    ok = [ln for ln in lines if ln.state == "done"]
    bad = [ln for ln in lines if ln.state == "failed"]
    stem = b.id.removeprefix("batch_")
    for kind, chosen, attr in (("output", ok, "output_file_id"), ("errors", bad, "error_file_id")):
        if not chosen:
            continue
        fid = f"file-{stem}{'o' if kind == 'output' else 'e'}"
        data = "".join(json.dumps(_line_json(b, ln, costs)) + "\n" for ln in chosen).encode()
        if session.get(BatchFile, fid) is None:
            store_file(session, store, b.account_id, "batch_output", f"{b.id}_{kind}.jsonl", data, len(chosen), fid)
        else:
            store.put(fid, data)
        setattr(b, attr, fid)
    b.completed, b.failed = len(ok), len(bad)
    end = "cancelled" if b.status == "cancelling" else "expired" if b.expired_at is not None else "completed"
    b.status = end
    if end != "expired":  # expired_at was set when the window ran out
        setattr(b, f"{end}_at", utcnow())
    b.lease_owner = b.lease_until = None
    session.add(b)
