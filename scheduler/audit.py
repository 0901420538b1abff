"""Audit policy: how often each node is audited, who verifies, how reputation moves, and
whether cheating pays. Pure functions over plain data; the coordinator stores the state.

- `AuditPolicy.rate(history)`: 1.0 for a new node's first jobs, then falling with its
  verified history (rate = new_rate * half_life / (half_life + passes), never below the
  floor); after a failure, every job is audited again until `recheck_passes` more passes,
  and the floor rises with each failure. `should_audit(...)` decides *after* the receipt
  arrives, from a random draw the caller supplies, so audits look like normal traffic.
- `select_verifier(...)`: a different node, of a different operator, serving the model,
  not banned, that has earned it (`VerifierPolicy`: own audits passed, reputation, stake;
  or the operator's trusted verifier); reputation-weighted random choice.
- `update_reputation(...)`: a pass moves reputation a step toward 1; a failure halves it;
  `max_failures` failures (or reputation under `ban_below`) ban the node.
- `deterrent_slash(...)`: the slash per caught job that makes cheating lose `margin` times
  its gain at the node's audit rate; `cheating_economics(...)` reports exactly that.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence


# ---------------------------------------------------------------- audit rate
@dataclass(frozen=True)
class NodeHistory:
    jobs: int = 0  # jobs completed (audited or not)
    passes: int = 0  # audits passed
    failures: int = 0  # audits failed
    passes_since_failure: int = 0  # audits passed since the last failure
    session_jobs: int = 10**9  # jobs since the node's agent last (re)connected


@dataclass(frozen=True)
class AuditPolicy:
    new_rate: float = 1.0  # a brand-new node: audit every job
    new_jobs: int = 20  # ... for its first jobs
    half_life: float = 20.0  # passes after which the rate has halved
    floor: float = 0.03  # long-run rate of an established node
    failure_floor_step: float = 0.10  # the floor rises this much per past failure
    recheck_passes: int = 20  # after a failure, audit every job until this many passes
    # After every (re)connect (a restart may bring a swapped checkpoint) the next
    # `session_jobs` jobs are audited at least at `session_rate`: a swap is caught within
    # them with probability 1 - (1 - session_rate) ** session_jobs (0.997 at 0.25 and 20),
    # besides the canary every (re)connect triggers.
    session_jobs: int = 20
    session_rate: float = 0.25

    @property
    def long_run_rate(self) -> float:
        return self.floor

    def rate(self, h: NodeHistory) -> float:
        if h.failures and h.passes_since_failure < self.recheck_passes:
            return 1.0
        if h.jobs < self.new_jobs:
            return self.new_rate
        r = self.new_rate * self.half_life / (self.half_life + h.passes)
        r = max(r, self.floor + self.failure_floor_step * h.failures)
        if h.session_jobs < self.session_jobs:
            r = max(r, self.session_rate)
        return float(min(1.0, r))


def should_audit(policy: AuditPolicy, history: NodeHistory, u: float) -> bool:
    """`u` uniform in [0, 1) from the caller's RNG; decided after the job finished."""
    return u < policy.rate(history)


# ---------------------------------------------------------------- reputation
@dataclass(frozen=True)
class ReputationPolicy:
    initial: float = 0.5
    pass_step: float = 0.05  # score += step * (1 - score)
    fail_factor: float = 0.5  # score *= factor
    max_failures: int = 3
    ban_below: float = 0.05


@dataclass(frozen=True)
class ReputationUpdate:
    reputation: float
    banned: bool
    routing_weight: float  # the scheduler's reputation multiplier (0 when banned)
    reason: str


def update_reputation(reputation: float, failures: int, passed: bool,
                      policy: ReputationPolicy = ReputationPolicy()) -> ReputationUpdate:
    """`failures` counts failed audits including this one when `passed` is False."""
    if passed:
        r = reputation + policy.pass_step * (1.0 - reputation)
    else:
        r = reputation * policy.fail_factor
    banned = (not passed and failures >= policy.max_failures) or r < policy.ban_below
    reason = "pass" if passed else ("ban: repeated failures" if banned else "audit failed")
    return ReputationUpdate(reputation=float(min(max(r, 0.0), 1.0)), banned=banned,
                            routing_weight=0.0 if banned else float(r), reason=reason)


# ---------------------------------------------------------------- verifier choice
@dataclass(frozen=True)
class VerifierCandidate:
    node_id: str
    operator_id: str
    models: Sequence[str]
    reputation: float
    online: bool = True
    banned: bool = False
    free_slots: int = 1
    passes: int = 0  # its own audits passed
    stake: int = 0  # its bonded stake (nano-USD)
    trusted: bool = False  # the operator's own verifier: its verdicts need no confirmation


@dataclass(frozen=True)
class VerifierPolicy:
    """Who has earned the right to judge others: a node verifies only after passing
    `min_passes` of its own audits, with reputation and stake at risk; the operator's
    trusted verifiers always may."""

    min_passes: int = 5
    min_reputation: float = 0.6
    min_stake: int = 0

    def qualifies(self, c: VerifierCandidate) -> bool:
        return c.trusted or (c.passes >= self.min_passes and c.reputation >= self.min_reputation
                             and c.stake >= self.min_stake)


def eligible_verifiers(audited_node: str, audited_operator: str, model: str,
                       candidates: Sequence[VerifierCandidate], policy: VerifierPolicy = VerifierPolicy(),
                       exclude: Sequence[str] = ()) -> list[VerifierCandidate]:
    """Live, unbanned candidates serving the model with a free slot, of another operator than
    the audited node (and than anyone in `exclude`: operator ids), that qualify."""
    barred = {audited_operator, *exclude}
    return [c for c in candidates
            if c.node_id != audited_node and c.operator_id not in barred and model in c.models
            and c.online and not c.banned and c.free_slots > 0 and policy.qualifies(c)]


def select_verifier(audited_node: str, audited_operator: str, model: str, candidates: Sequence[VerifierCandidate],
                    rng: random.Random | None = None, policy: VerifierPolicy = VerifierPolicy(),
                    exclude: Sequence[str] = (), prefer_trusted: bool = False) -> str | None:
    """A verifier's node id, or None when no node qualifies (the audit then waits, and
    expires if none comes). Reputation-weighted; with `prefer_trusted` (a confirmation)
    the operator's trusted verifiers go first."""
    pool = eligible_verifiers(audited_node, audited_operator, model, candidates, policy, exclude)
    if prefer_trusted and any(c.trusted for c in pool):
        pool = [c for c in pool if c.trusted]
    if not pool:
        return None
    rng = rng or random.Random()
    return rng.choices([c.node_id for c in pool], weights=[max(c.reputation, 1e-3) for c in pool])[0]


# ---------------------------------------------------------------- economics
def deterrent_slash(job_value: int, audit_rate: float, *, detection_prob: float = 0.99, margin: float = 3.0,
                    floor: int = 0) -> int:
    """The stake to slash when a job is caught cheating, so that cheating loses money in
    expectation: audit_rate × detection × (slash + the job's earnings clawed back) is at
    least `margin` × the job's value (a cheater's gain is at most what it was paid)."""
    p = max(audit_rate, 1e-6) * detection_prob
    return max(int(floor), math.ceil(max(margin * job_value / p - job_value, 0.0)))


@dataclass(frozen=True)
class CheatEconomics:
    gain_per_job: float  # what a cheater gains per job at most: its pay (nano-dollars)
    audit_rate: float
    detection_prob: float  # P(an audited cheating job fails verification)
    slash: float  # stake the code slashes per caught job (capped by the stake), plus the clawed-back pay
    expected_penalty_per_job: float
    ratio: float  # expected penalty / gain
    margin: float
    deterrent: bool  # ratio >= margin
    min_slash: int  # the smallest slash that makes cheating lose by `margin`
    min_audit_rate: float  # the smallest audit rate that does, at this slash
    details: dict = field(default_factory=dict)


def cheating_economics(*, price_out: int, tokens_per_job: int, stake: int, audit_rate: float,
                       detection_prob: float = 0.99, margin: float = 3.0, floor: int = 0) -> CheatEconomics:
    """Whether cheating has negative expected value, with exactly what the code slashes:
    `deterrent_slash` for a job of this value at this audit rate, capped by the stake the
    node holds (a node short of stake is not deterred, and says so)."""
    earnings = price_out * tokens_per_job / 1e6
    gain = earnings
    wanted = deterrent_slash(math.ceil(earnings), audit_rate, detection_prob=detection_prob, margin=margin,
                             floor=floor)
    slashed = min(wanted, stake)
    p = audit_rate * detection_prob
    penalty = p * (slashed + earnings)
    ratio = penalty / gain if gain > 0 else math.inf
    min_rate = (margin * gain / (detection_prob * (slashed + earnings))) if slashed + earnings > 0 else math.inf
    return CheatEconomics(
        gain_per_job=gain, audit_rate=audit_rate, detection_prob=detection_prob, slash=slashed + earnings,
        expected_penalty_per_job=penalty, ratio=ratio, margin=margin, deterrent=ratio >= margin,
        min_slash=wanted, min_audit_rate=min(min_rate, math.inf),
        details=dict(earnings_per_job=earnings, stake=stake, slash_wanted=wanted, slash_capped_by_stake=slashed < wanted),
    )
