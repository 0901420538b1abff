"""Errors of the coordinator, rendered in OpenAI's error body.

`{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}` with the status
codes the `openai` client maps to its exception classes.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"
    code: str | None = None
    retry_after_s: int | None = None  # sent as Retry-After (429 and 503)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        return None if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status_code = 400
    code = "invalid_request"


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(APIError):
    status_code = 403
    type = "permission_error"
    code = "forbidden"


class InsufficientBalance(APIError):
    status_code = 402
    type = "insufficient_quota"
    code = "insufficient_balance"


class NotFound(APIError):
    status_code = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(APIError):
    status_code = 409
    code = "conflict"


class NoCapacity(APIError):
    """Temporary: no node can take the request now (the client may retry after a moment)."""

    status_code = 503
    type = "service_unavailable"
    code = "no_capacity"
    retry_after_s = 2


class Unavailable(APIError):
    """The market cannot place or relay work right now (its relay or broker is down)."""

    status_code = 503
    type = "service_unavailable"
    code = "market_unavailable"
    retry_after_s = 2


class RelayInterrupted(APIError):
    """Tokens were lost inside the market mid-stream; the buyer pays only what it got."""

    status_code = 503
    type = "service_unavailable"
    code = "relay_interrupted"
    retry_after_s = 1


class UpstreamFailed(APIError):
    status_code = 502
    type = "api_error"
    code = "node_failed"


def _json(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _json(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg = "the request body is not valid JSON"
        return _json(BadRequest(f"{param + ': ' if param else ''}{msg}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        cls = {401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict}.get(exc.status_code, APIError)
        err = cls(str(exc.detail))
        err.status_code = exc.status_code
        return _json(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):  # never a bare 500 page
        err = APIError(f"internal error: {type(exc).__name__}")
        err.status_code, err.type, err.code = 500, "api_error", "internal_error"
        return _json(err)
