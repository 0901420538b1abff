"""OpenAI-compatible request bodies, validated strictly (bad input is a 400, never a 500)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOKENS_CAP = 1_000_000
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs (OpenAI's bound); completions' logprobs: at most 5
MAX_CHOICES = 128  # the schema's bound on n; the operator's (`max_choices`, lower) is checked at admission
METADATA_KEYS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS, USER_CHARS = 16, 64, 512, 256
SEED_MAX = 2**63 - 1  # the engines seed a 64-bit generator


def _utf8(value: str, what: str) -> str:
    """Text must be valid Unicode: JSON can smuggle in lone surrogates (\ud800) that no
    UTF-8 encoder (nor any tokenizer) accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} contains an unpaired UTF-16 surrogate; send valid Unicode text") from None
    return value


class RoutingPrefs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sort: Literal["price", "throughput", "latency"] | None = None
    max_price: int | None = Field(
        default=None, ge=0, description="highest output price accepted, nano-USD per Mtok"
    )
    region: str | None = Field(default=None, max_length=64)
    max_ttft_ms: float | None = Field(default=None, gt=0)
    min_tokens_per_s: float | None = Field(default=None, gt=0)

    @field_validator("region")
    @classmethod
    def _region(cls, v):
        return None if v is None else _utf8(v, "routing.region")

    allow_unverified: bool = Field(default=False, description="accept nodes whose work cannot be audited "
                                   "(engines without token ids or log-probs), where the operator allows them")
    quantization: list[str] | None = Field(
        default=None, min_length=1, max_length=8,
        description='weight precisions accepted, e.g. ["none", "int8"] ("none": full-precision weights); '
                    "default: any")

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, v):
        if v is None:
            return None
        out = []
        for q in v:
            q = (q or "none").strip().lower()
            if not q or len(q) > 16 or not q.replace("_", "").isalnum():
                raise ValueError(f"routing.quantization: {q!r} is not a precision name (e.g. none, int8, fp8)")
            out.append(q)
        return sorted(set(out))


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored

    model: str = Field(min_length=1, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=100_000)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    routing: RoutingPrefs | None = None
    user: str | None = Field(default=None, max_length=USER_CHARS)
    metadata: dict[str, str] | None = None

    @field_validator("user")
    @classmethod
    def _user(cls, v):
        return None if v is None else _utf8(v, "user")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is None:
            return None
        if len(v) > METADATA_KEYS:
            raise ValueError(f"at most {METADATA_KEYS} keys")
        for key, value in v.items():
            if len(key) > METADATA_KEY_CHARS:
                raise ValueError(f"key {key[:20]!r}... is longer than {METADATA_KEY_CHARS} characters")
            if len(value) > METADATA_VALUE_CHARS:
                raise ValueError(f"the value of {key!r} is longer than {METADATA_VALUE_CHARS} characters")
            _utf8(key, "a metadata key"), _utf8(value, "a metadata value")
        return v

    @field_validator("model")
    @classmethod
    def _model(cls, v):
        return _utf8(v, "model")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return [_utf8(s, "a stop sequence") for s in stops]

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def wants_logprobs(self) -> bool:
        """Per-token log-probs asked for (chat: `logprobs: true`; completions: `logprobs: k`)."""
        return False

    def top_logprobs_k(self) -> int:
        """Alternatives asked for per token (0: only the chosen token's log-prob)."""
        return 0

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        out = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop or []),
        }
        if self.top_logprobs_k():  # only then: older nodes' frames and stored payloads stay as they were
            out["top_logprobs"] = self.top_logprobs_k()
        return out


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return _utf8(self.content, "message content")
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(_utf8(part["text"], "message content"))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _texts(self):
        for m in self.messages:  # non-text parts are refused by name first (`unsupported.py`)
            if not isinstance(m.content, list) or all(p.get("type") == "text" for p in m.content):
                m.text()
        return self

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def top_logprobs_k(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def prompt_bytes(self) -> int:
        return sum(len(m.text().encode()) + 8 for m in self.messages) + 8


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None

    def top_logprobs_k(self) -> int:
        return self.logprobs or 0

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not isinstance(v, str):
            raise ValueError("prompt must be a string")
        if not v:
            raise ValueError("prompt must not be empty")
        return _utf8(v, "prompt")

    def prompt_bytes(self) -> int:
        return len(self.prompt.encode()) + 2
