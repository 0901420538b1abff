"""The coordinator's settings: one object, read from `AGORA_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

IN_PROCESS_BROKER = "memory://localhost/"


def default_home() -> Path:
    return Path.home() / ".agora"


class CoordinatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGORA_", extra="ignore")

    home: Path = Field(default_factory=default_home, description="where the SQLite file lives")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: a SQLite file under AGORA_HOME"
    )
    broker_url: str = Field(
        default=IN_PROCESS_BROKER,
        description="Celery broker; memory:// runs an in-process worker (embedded default)",
    )
    redis_url: str | None = Field(
        default=None, description="Redis for the cross-replica token relay; default in-memory"
    )
    celery_queue: str = Field(default="agora", description="Celery queue the workers consume")
    redis_prefix: str = Field(default="agora:", description="key/channel prefix on the relay Redis")
    run_worker_in_process: bool | None = Field(
        default=None, description="start a Celery worker thread; default: only with memory://"
    )

    # Node identity and liveness
    signature_window_s: float = 60.0  # a signed message's timestamp must be this fresh
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 20.0  # nodes silent for longer are offline
    rtt_probe_interval_s: float = Field(default=30.0, gt=0, description="the coordinator pings each work "
                                        "channel this often to measure its round trip (for routing)")

    # Requests
    max_body_bytes: int = Field(default=2 * 2**20, ge=1024, description="larger request bodies are refused (413) "
                                "before they are read")
    rate_limit_requests_per_min: int = Field(default=600, ge=0, description="per API key; 0: no limit")
    rate_limit_tokens_per_min: int = Field(default=4_000_000, ge=0, description="per API key: prompt bytes + "
                                           "max_tokens of its requests; 0: no limit")
    rate_limit_concurrent: int = Field(default=64, ge=0, description="requests of one API key in flight at once")
    node_rate_limit_per_min: int = Field(default=240, ge=0, description="signed messages per node identity")
    registration_rate_limit_per_min: int = Field(default=60, ge=0, description="node registrations per client address")
    default_max_tokens: int = 256
    max_choices: int = Field(default=8, ge=1, le=128, description="highest `n` (choices per request) a buyer may ask; "
                             "each choice is its own request on the market, all held together")
    assign_timeout_s: float = 30.0  # a request not assigned by then fails with 503
    first_token_timeout_s: float = 60.0  # assigned -> first token (prefill of a long prompt included)
    token_timeout_s: float = 30.0  # between tokens, then the stream is failed over as stalled
    routing_policy: str | None = None  # None: the scheduler's default
    routing_affinity: bool = Field(default=True, description="cache-aware routing: prefer, in the same score as "
                                   "price and latency, a node that recently served a prefix of the request's prompt "
                                   "(it probably still holds its KV cache; coordinator/affinity.py)")
    routing_affinity_ttl_s: float = Field(default=300.0, gt=0, description="a served prefix counts this long "
                                          "(about how long a node's prefix cache keeps an idle conversation)")
    routing_affinity_entries: int = Field(default=100_000, ge=1, description="prefixes remembered per API "
                                          "process (LRU)")
    platform_fee_bps: int = Field(default=500, ge=0, le=10_000)
    # Response cache (coordinator/response_cache.py): opt-in per account and per request
    response_cache_ttl_s: float = Field(default=3600, gt=0, description="a cached answer is served this long "
                                        "after it was made")
    response_cache_entries: int = Field(default=10_000, ge=1, description="answers kept (in Redis: for the "
                                        "whole deployment; embedded: in the process); the oldest go first")
    response_cache_entry_bytes: int = Field(default=256 * 1024, ge=256, description="a larger answer is not "
                                            "cached")
    response_cache_price_per_request: int = Field(default=0, ge=0, le=10**15, description="nano-USD charged per "
                                                  "cache hit (to the platform's fees)")
    response_cache_price_per_mtok: int = Field(default=0, ge=0, le=10**15, description="nano-USD per million "
                                               "tokens (prompt + completion of the cached answer) charged per hit")
    request_ttl_s: float = Field(default=3600, gt=0, description="a request unfinished by then is failed "
                                 "unpaid and its hold released (the hold itself expires a little later)")
    dispatch_window_ms: float = 2.0  # micro-batch window of the dispatch task
    inline_dispatch: bool = Field(default=True, description="place a new request in the transaction that admits "
                                  "it when nothing of its model waits (no broker round trip before the first token); "
                                  "the Celery micro-batch takes bursts and everything else")
    api_key_cache_s: float = Field(default=30.0, ge=0, description="a valid API key is remembered this long "
                                   "(no database lookup per request); a key revoked in the database stops working "
                                   "within it; 0: look up every request")
    ws_deflate: bool = Field(default=False, description="compress work-channel frames (permessage-deflate) when "
                             "an agent offers it: small token frames gain little and it costs the coordinator CPU "
                             "on every frame of every node")
    market_view_ttl_s: float = Field(default=1.0, ge=0, description="admission reads routable offers from "
                                     "memory (coordinator/market_view.py), reloaded at once after a routing change "
                                     "in this process and in the background when older than this; 0: every time")
    delivery_ack_timeout_s: float = Field(
        default=300, gt=0, description="a receipt whose buyer-side delivery acknowledgement has not come "
        "by then (the API process serving the buyer died) is settled as undelivered: the buyer pays "
        "nothing, the platform pays the node")
    idempotency_retention_s: float = Field(
        default=30 * 24 * 3600, gt=0, description="ledger idempotency keys older than this are forgotten by the "
        "sweep; a client retrying with a key after that would repeat the operation")

    # Batch API (coordinator/batches.py, coordinator/batch_runner.py)
    files_dir: Path | None = Field(default=None, description="where uploaded files' bytes live; default "
                                   "AGORA_HOME/files (shared storage when there are several API replicas)")
    files_url: str | None = Field(default=None, pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$",
                                  description="keep uploaded files in an S3-compatible bucket instead, e.g. "
                                  "s3://agora-files/prod (credentials: the usual AWS_* variables; needs agora[s3])")
    files_s3_endpoint_url: str | None = Field(default=None, description="an S3-compatible service's endpoint "
                                              "(MinIO, R2, ...); default: AWS")
    batch_file_max_bytes: int = Field(default=100 * 2**20, ge=1024, description="largest file a buyer may upload")
    batch_max_lines: int = Field(default=50_000, ge=1, description="most requests in one batch input file")
    batch_discount_pct: int = Field(default=50, ge=0, le=100, description="batch lines are routed only to nodes "
                                    "whose output price is within (100 - this)% of the dearest routable offer of "
                                    "the model (or the cheapest offer where none is), so they pay the cheapest "
                                    "sellers' prices; nobody is paid less than their price")
    batch_runner: bool = Field(default=True, description="API processes run batch lines on idle capacity")
    batch_max_in_flight: int = Field(default=4, ge=1, description="batch lines one API process has in flight "
                                     "at once (the bound on what batches take from interactive buyers)")
    batch_reserve_slots: int = Field(default=1, ge=0, description="a batch line starts only where a node within "
                                     "its price cap has more free slots than this, and no request of the model "
                                     "is queued")
    batch_lease_s: float = Field(default=30.0, gt=0, description="a runner's claim on a batch; another API "
                                 "process takes over a batch whose lease has run out")

    # Prometheus (coordinator/metrics.py): GET /metrics on API processes, a port on workers
    worker_metrics_port: int = Field(default=9101, ge=0, le=65535, description="`agora worker` serves its "
                                     "Prometheus metrics on this port (0: not at all)")
    worker_metrics_host: str = Field(default="0.0.0.0", description="address the worker's metrics port binds")
    metrics_per_node: bool = Field(default=False, description="also export per-node series (a `node` label per "
                                   "registered node: one series each; off by default to bound cardinality)")
    metrics_max_label_values: int = Field(default=50, ge=1, description="distinct models, regions and engines "
                                          "named in labels; the rest are summed under `other`")

    # Prices a node may ask (nano-USD per million tokens); registration above is refused
    max_price_in: int = Field(default=100 * 10**9, ge=0, description="operator's price ceiling, prompt tokens")
    max_price_out: int = Field(default=100 * 10**9, ge=0, description="operator's price ceiling, completion tokens")
    allow_unverified_nodes: bool = Field(
        default=False, description="route to nodes whose engine gives no token ids or log-probs (they cannot be "
        "audited), for buyers who ask with routing.allow_unverified")

    # Failing nodes
    error_exclusion_streak: int = Field(default=3, ge=1, description="consecutive failed jobs that take a node "
                                        "out of routing until it registers again")
    error_reputation_factor: float = Field(default=0.9, gt=0, le=1, description="reputation × this per failed job")

    # Stake
    min_stake_nano_usd: int | None = Field(
        default=None, ge=0, description="bonded stake a node needs to register and be routed; default 0 on the "
        "embedded market, 1 USD in production (a separate broker)")
    unbonding_delay_s: float = Field(default=7 * 24 * 3600, ge=0)

    # Verification: the audit policy (scheduler.audit.AuditPolicy)
    audit_new_jobs: int = Field(default=20, ge=0, description="a new node's first jobs are all audited")
    audit_half_life: float = Field(default=20.0, gt=0, description="passes after which the audit rate halves")
    audit_floor: float = Field(default=0.03, gt=0, le=1, description="long-run audit rate of an established node")
    audit_failure_floor_step: float = Field(default=0.10, ge=0, le=1, description="the floor rises per past failure")
    audit_recheck_passes: int = Field(default=20, ge=0, description="after a failure every job is audited until "
                                      "this many passes")
    audit_session_jobs: int = Field(default=20, ge=0, description="after a (re)connect, this many jobs are "
                                    "audited at least at audit_session_rate (a restart may swap the checkpoint)")
    audit_session_rate: float = Field(default=0.25, ge=0, le=1)
    # ... who may verify (scheduler.audit.VerifierPolicy)
    verifier_min_passes: int = Field(default=5, ge=0, description="own audits a node must pass to verify others")
    verifier_min_reputation: float = Field(default=0.6, ge=0, le=1)
    verifier_min_stake_nano_usd: int | None = Field(default=None, ge=0, description="bonded stake a verifier "
                                                    "needs; default: the market's minimum stake")
    trusted_verifiers: list[str] = Field(default_factory=list, description="node ids of the operator's own "
                                         "verifiers: their verdicts need no confirmation (also POST /admin/nodes/{id}/trust)")
    # ... and what a caught cheater pays: expected penalty >= slash_margin x gain at its audit rate
    slash_margin: float = Field(default=3.0, ge=1)
    detection_prob: float = Field(default=0.99, gt=0, le=1, description="P(an audited cheating job is caught), "
                                  "as measured by bench/verify.py")
    challenge_window_s: float = Field(default=3600, ge=0, description="earnings this recent cannot be paid "
                                      "out: a failed audit may still claw them back")
    reverify_window_s: float = Field(default=7 * 86400, ge=0, description="a seller may appeal a failed audit "
                                     "(a re-verification by other verifiers) this long after the verdict")
    canary_interval_s: float = Field(default=900, ge=0, description="a canary per node this often; 0: none")
    audit_expiry_s: float = Field(default=600, gt=0, description="an audit no capable verifier has answered by "
                                  "then expires (counted, never judged)")
    min_slash_nano_usd: int = Field(default=1_000_000, ge=0, description="the least stake slashed per caught job "
                                    "(and per verdict a confirmation contradicts)")

    # Operator
    admin_token: str | None = Field(default=None, description="bearer token for /admin routes")
    # Dashboards (coordinator/history.py, coordinator/web_auth.py, routes/dashboard.py)
    history_days: float = Field(default=30, gt=0, description="per-minute market and node history kept this long")
    web_session_s: float = Field(default=12 * 3600, gt=0, description="a dashboard sign-in lasts this long")
    login_link_s: float = Field(default=600, gt=0, description="a single-use sign-in link expires after this")
    dashboard_refresh_s: float = Field(default=5, gt=0, description="pages refresh their figures this often")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        self.home.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{self.home / 'agora.db'}"

    @property
    def verifier_min_stake(self) -> int:
        return self.min_stake if self.verifier_min_stake_nano_usd is None else self.verifier_min_stake_nano_usd

    @property
    def min_stake(self) -> int:
        if self.min_stake_nano_usd is not None:
            return self.min_stake_nano_usd
        return 0 if self.broker_url.startswith("memory://") else 10**9  # production: a real broker

    @property
    def in_process_worker(self) -> bool:
        if self.run_worker_in_process is not None:
            return self.run_worker_in_process
        return self.broker_url.startswith("memory://")


@lru_cache
def get_settings() -> CoordinatorSettings:
    return CoordinatorSettings()
