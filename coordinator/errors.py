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


ERROR_STATUSES = {
    400: "invalid request (the message says which parameter)", 401: "missing or wrong API key or node signature",
    402: "balance (or a node's stake) short of what the request needs", 403: "banned, or not allowed",
    404: "no such model, request, node or account", 409: "idempotency key reused or still in progress, or "
    "stake frozen, or an audit that cannot be appealed", 413: "request body over the size limit", 429: "rate limit reached (see Retry-After)",
    502: "the node failed and no other could continue", 503: "no capacity, or the market cannot place or relay work "
    "right now (see Retry-After)", 504: "the request did not finish in time",
}


def install_openapi_errors(app: FastAPI) -> None:
    """Declare every status the API answers, with OpenAI's error body, in the OpenAPI
    document (validation errors are 400 here, not FastAPI's 422)."""

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps["Error"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"},
                "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                if path.endswith("/completions") and "200" in responses:  # `stream: true` answers SSE
                    responses["200"].setdefault("content", {})["text/event-stream"] = {
                        "schema": {"type": "string", "description": "server-sent events: chunks, then [DONE]"}}
                responses.pop("422", None)
                for status, what in ERROR_STATUSES.items():
                    responses.setdefault(str(status), {"description": what, **ref})
        for name in ("HTTPValidationError", "ValidationError"):
            comps.pop(name, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def _json(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return _json(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if request.url.path.endswith("completions"):  # a buyer's request, refused: count it like the others
            from coordinator import metrics

            metrics.REQUESTS.labels(outcome="400").inc()
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
