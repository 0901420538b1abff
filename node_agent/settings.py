"""The node agent's settings: `AGORA_NODE_*` environment variables or CLI flags."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

NANO_PER_USD = 10**9


def usd_per_mtok_to_nano(value: str | float | Decimal) -> int:
    """'0.15' (USD per million tokens) -> 150_000_000 nano-USD per million tokens, exactly."""
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a price: {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"price must be a non-negative number, got {value!r}")
    nano = d * NANO_PER_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"price {value!r} is finer than 1 nano-USD per million tokens")
    return int(nano)


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGORA_NODE_", extra="ignore")

    coordinator: str = "http://127.0.0.1:8000"
    model: str = "tiny"
    served_name: str | None = Field(default=None, description="name on the market; default: --model")
    price_in: int = Field(default=100_000_000, ge=0, description="nano-USD per million prompt tokens")
    price_out: int = Field(default=200_000_000, ge=0, description="nano-USD per million completion tokens")
    region: str = "us-east"
    name: str | None = None
    operator: str | None = None  # who runs this node (never verifies its own operator's work)
    max_concurrency: int = Field(default=8, ge=1, le=4096)
    key_path: Path = Field(default_factory=lambda: Path.home() / ".agora" / "node_key.pem")
    device: str = "cpu"
    # None: the engine's own (built-in: float32; vLLM: what it loads; an OpenAI-compatible
    # upstream: what its /v1/models says, else bfloat16). It sets the audit tolerance.
    dtype: str | None = None
    # built-in engine: "int8" quantises the weights at load time (None/"none": full precision);
    # openai/vllm: the upstream's declared weight quantisation. Declared in the offer either way.
    quantization: str | None = Field(default=None, max_length=16, description="weight quantisation")
    engine: str = "builtin"  # builtin | openai | vllm
    upstream: str | None = None  # OpenAI-compatible server for engine=openai
    upstream_api_key: str | None = None  # engine=openai: the upstream's bearer token, if it wants one
    tokenizer: str | None = None  # engine=openai: a local tokenizer folder for exact token ids
    verify_only: bool = False  # `agora verifier`: registers at price 0 and only answers verify jobs
    benchmark: bool = True
    advertised_tokens_per_s: float | None = None  # skip the benchmark and claim this
    heartbeat_interval_s: float = 5.0
    reconnect_max_s: float = 5.0  # a restarted coordinator sees the node back within seconds
    torch_threads: int | None = None
    adversary: str | None = Field(default=None, description="TEST TOOL: cheat in this mode (see --adversary)")
    throttle_tokens_per_s: float | None = Field(default=None, gt=0, description="cap per stream")

    @property
    def market_model(self) -> str:
        return self.served_name or self.model

    @property
    def ws_url(self) -> str:
        base = self.coordinator.rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        return base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/v1/nodes/channel"

    @property
    def http_base(self) -> str:
        base = self.coordinator.rstrip("/")
        return base[:-3] if base.endswith("/v1") else base
