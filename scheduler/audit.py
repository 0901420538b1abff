"""Audit policy: how often each node is audited, who verifies, how reputation moves, and
whether cheating pays. Pure functions over plain data; the coordinator stores the state.

- `AuditPolicy.rate(history)`: 1.0 for a new node's first jobs, then falling with its
  verified history (rate = new_rate * half_life / (half_life + passes), never below the
  floor); after a failure, every job is audited again until `recheck_passes` more passes,
  and the floor rises with each failure. `should_audit(...)` decides *after* the receipt
  arrives, from a random draw the caller supplies, so audits look like normal traffic.
- `select_verifier(...)`: a different node, of a different operator, serving the model,
  not banned, with reputation at or above a bar; reputation-weighted random choice.
- `update_reputation(...)`: a pass moves reputation a step toward 1; a failure halves it;
  `max_failures` failures (or reputation under `ban_below`) ban the node.
- `cheating_economics(...)`: audit_rate x P(detect) x slash against `margin` x the gain from
  cheating, with the minimum slash and audit rate that would make cheating lose.
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


@dataclass(frozen=True)
class AuditPolicy:
    new_rate: float = 1.0  # a brand-new node: audit every job
    new_jobs: int = 20  # ... for its first jobs
    half_life: float = 20.0  # passes after which the rate has halved
    floor: float = 0.03  # long-run rate of an established node
    failure_floor_step: float = 0.10  # the floor rises this much per past failure
    recheck_passes: int = 20  # after a failure, audit every job until this many passes

    @property
    def long_run_rate(self) -> float:
        return self.floor

    def rate(self, h: NodeHistory) -> float:
        if h.failures and h.passes_since_failure < self.recheck_passes:
            return 1.0
        if h.jobs < self.new_jobs:
            return self.new_rate
        r = self.new_rate * self.half_life / (self.half_life + h.passes)
        return float(min(1.0, max(r, self.floor + self.failure_floor_step * h.failures)))


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


def eligible_verifiers(audited_node: str, audited_operator: str, model: str,
                       candidates: Sequence[VerifierCandidate], min_reputation: float = 0.7) -> list[VerifierCandidate]:
    return [c for c in candidates
            if c.node_id != audited_node and c.operator_id != audited_operator and model in c.models
            and c.online and not c.banned and c.free_slots > 0 and c.reputation >= min_reputation]


def select_verifier(audited_node: str, audited_operator: str, model: str, candidates: Sequence[VerifierCandidate],
                    rng: random.Random | None = None, min_reputation: float = 0.7) -> str | None:
    """A verifier's node id, or None when no node qualifies (the coordinator then keeps the
    job pending or checks it with its own reference engine)."""
    pool = eligible_verifiers(audited_node, audited_operator, model, candidates, min_reputation)
    if not pool:
        return None
    rng = rng or random.Random()
    return rng.choices([c.node_id for c in pool], weights=[c.reputation for c in pool])[0]


# ---------------------------------------------------------------- economics
@dataclass(frozen=True)
class CheatEconomics:
    gain_per_job: float  # what a cheater saves per job (nano-dollars)
    audit_rate: float
    detection_prob: float  # P(an audited cheating job fails verification)
    slash: float  # stake slashed per caught job (nano-dollars), plus the clawed-back earnings
    expected_penalty_per_job: float
    ratio: float  # expected penalty / gain
    margin: float
    deterrent: bool  # ratio >= margin
    min_slash: int  # the smallest slash that makes cheating lose by `margin`
    min_audit_rate: float  # the smallest audit rate that does, at this slash
    details: dict = field(default_factory=dict)


def cheating_economics(*, price_out: int, tokens_per_job: int, stake: int, audit_rate: float,
                       detection_prob: float = 0.99, slash_fraction: float = 1.0, saving_fraction: float = 1.0,
                       margin: float = 3.0) -> CheatEconomics:
    """price_out in nano-dollars per million tokens. The gain is the share of the job's
    earnings a cheater keeps without doing the work (1.0: all of it, the worst case); a
    caught job loses its earnings (claw-back) and `slash_fraction` of the stake."""
    earnings = price_out * tokens_per_job / 1e6
    gain = earnings * saving_fraction
    slash = stake * slash_fraction + earnings
    p = audit_rate * detection_prob
    penalty = p * slash
    ratio = penalty / gain if gain > 0 else math.inf
    min_slash = math.ceil(max(margin * gain / p - earnings, 0.0)) if p > 0 else None
    min_rate = (margin * gain / (detection_prob * slash)) if slash > 0 and detection_prob > 0 else math.inf
    return CheatEconomics(
        gain_per_job=gain, audit_rate=audit_rate, detection_prob=detection_prob, slash=slash,
        expected_penalty_per_job=penalty, ratio=ratio, margin=margin, deterrent=ratio >= margin,
        min_slash=min_slash if min_slash is not None else 2**63 - 1, min_audit_rate=min(min_rate, math.inf),
        details=dict(earnings_per_job=earnings, stake=stake, slash_fraction=slash_fraction),
    )
