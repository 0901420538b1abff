"""A Batch API input file: JSONL, one request per line, checked line by line.

Each line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
"body": {...}}`; the body must pass the same schema as an interactive request
(`coordinator/schemas.py`). As at OpenAI, one file holds one endpoint and one model, and
custom_ids are unique. Errors name their line (1-based) and are all collected, up to a cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from coordinator.errors import BadRequest
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.unsupported import refuse_unsupported

ENDPOINTS = {"/v1/chat/completions": ("chat", ChatCompletionRequest), "/v1/completions": ("completion", CompletionRequest)}
MAX_CUSTOM_ID = 512
MAX_ERRORS = 20  # reported per file; the first ones are enough to fix it


@dataclass
class BatchInput:
    url: str | None = None
    model: str | None = None
    lines: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (custom_id, body)
    errors: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's batch error objects

    def error(self, line: int, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": f"line {line}: {message}", "param": param, "line": line})

    def summary(self) -> str:
        more = "" if len(self.errors) < MAX_ERRORS else f" (first {MAX_ERRORS} errors shown)"
        return "; ".join(e["message"] for e in self.errors) + more


def _schema_error(exc: ValidationError) -> tuple[str, str]:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "body"
    return f"body.{where}: {first.get('msg', 'invalid')}", f"body.{where}"


def parse(data: bytes, max_lines: int) -> BatchInput:
    """Every line of `data` checked; `errors` empty means the file can run as a batch."""
    out = BatchInput()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.error(data[:exc.start].count(b"\n") + 1, "the file is not valid UTF-8", code="invalid_file")
        return out
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (a trailing newline) carry nothing
        if len(out.lines) >= max_lines:
            out.error(number, f"a batch holds at most {max_lines} requests", code="too_many_requests")
            break
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.error(number, f"not valid JSON ({exc.msg} at column {exc.colno})", code="invalid_json")
            continue
        if not isinstance(obj, dict):
            out.error(number, "each line must be a JSON object", code="invalid_json")
            continue
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            out.error(number, "custom_id is missing (a non-empty string)", code="missing_required_parameter",
                      param="custom_id")
            continue
        if len(custom_id) > MAX_CUSTOM_ID:
            out.error(number, f"custom_id is longer than {MAX_CUSTOM_ID} characters", param="custom_id")
            continue
        if custom_id in seen:
            out.error(number, f"duplicate custom_id {custom_id!r}", code="duplicate_custom_id", param="custom_id")
            continue
        seen.add(custom_id)
        if obj.get("method") != "POST":
            out.error(number, f"method must be POST, not {obj.get('method')!r}", param="method")
            continue
        url = obj.get("url")
        if url not in ENDPOINTS:
            out.error(number, f"url must be one of {sorted(ENDPOINTS)}, not {url!r}", param="url")
            continue
        if out.url is None:
            out.url = url
        elif url != out.url:
            out.error(number, f"url {url!r} differs from the file's first request ({out.url!r}): one endpoint "
                      "per batch", code="mismatched_url", param="url")
            continue
        body = obj.get("body")
        if not isinstance(body, dict):
            out.error(number, "body must be a JSON object", param="body")
            continue
        if body.get("stream"):
            out.error(number, "stream is not supported in a batch", param="body.stream")
            continue
        try:
            refuse_unsupported(ENDPOINTS[url][1].model_validate(body))  # what the endpoint refuses by name
        except ValidationError as exc:
            message, param = _schema_error(exc)
            out.error(number, message, param=param)
            continue
        except BadRequest as exc:
            out.error(number, exc.message, code=exc.code, param=f"body.{exc.param}")
            continue
        if out.model is None:
            out.model = body["model"]
        elif body["model"] != out.model:
            out.error(number, f"model {body['model']!r} differs from the file's first request ({out.model!r}): "
                      "one model per batch", code="mismatched_model", param="body.model")
            continue
        out.lines.append((custom_id, body))
    if not out.lines and not out.errors:
        out.error(1, "the file holds no requests", code="empty_file")
    return out
