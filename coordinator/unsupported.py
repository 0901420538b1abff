"""OpenAI parameters this market does not serve: refused by name, never silently ignored.

`refuse_unsupported(body)` raises a 400 `invalid_request_error` whose `param` names the
first parameter no engine here can honour (tools, structured output, penalties, logit
bias, non-text content, audio...). Parameters that change nothing about the answer
(`IGNORED`) are accepted; any other unknown parameter is refused as OpenAI's own API does.
"""

from __future__ import annotations

from coordinator.errors import BadRequest
from coordinator.schemas import ChatCompletionRequest, CompletionRequest

# Accepted and ignored: they do not change the tokens generated or their price.
IGNORED = frozenset({"store", "service_tier", "safety_identifier", "prompt_cache_key"})
# Refused unless neutral (absent, empty, zero, "none", text only): checked by `refuse_unsupported`.
CHECKED = frozenset({"tools", "functions", "audio", "prediction", "parallel_tool_calls", "web_search_options",
                     "tool_choice", "function_call", "response_format", "frequency_penalty", "presence_penalty",
                     "repetition_penalty", "logit_bias", "modalities", "suffix", "best_of"})


def _unsupported(param: str, what: str | None = None) -> BadRequest:
    err = BadRequest(f"{what or param} is not supported on this market; remove `{param}` from the request",
                     param=param, code="unsupported_parameter")
    return err


def _given(value) -> bool:
    return value is not None and value != [] and value != {}


def refuse_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    extra = dict(body.model_extra or {})
    chat = isinstance(body, ChatCompletionRequest)
    for name in ("tools", "functions", "audio", "prediction", "parallel_tool_calls", "web_search_options"):
        if _given(extra.get(name)):
            raise _unsupported(name)
    for name in ("tool_choice", "function_call"):
        if _given(extra.get(name)) and extra[name] != "none":
            raise _unsupported(name)
    fmt = extra.get("response_format")
    if _given(fmt) and not (isinstance(fmt, dict) and fmt.get("type") == "text" and len(fmt) == 1):
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        raise _unsupported("response_format", f"response_format {kind!r}" if kind else None)
    for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
        if extra.get(name) not in (None, 0, 0.0):
            raise _unsupported(name, f"a non-zero {name}")
    if _given(extra.get("logit_bias")):
        raise _unsupported("logit_bias")
    modalities = extra.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _unsupported("modalities", "output modalities other than text")
    if not chat:
        if extra.get("suffix") not in (None, ""):
            raise _unsupported("suffix")
        if extra.get("best_of") not in (None, 1, body.n):
            raise _unsupported("best_of", "best_of other than n")
        if body.echo:
            raise _unsupported("echo", "echoing the prompt")
    else:
        if body.top_logprobs and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
        for i, m in enumerate(body.messages):
            if not isinstance(m.content, list):
                continue
            for j, part in enumerate(m.content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise _unsupported(f"messages[{i}].content[{j}]",
                                       f"{kind!r} content parts (only text)" if kind else "content parts without a type")
    for name in sorted(extra):
        if name not in IGNORED and name not in CHECKED:
            raise BadRequest(f"unrecognized request argument supplied: {name}", param=name,
                             code="unknown_parameter")
