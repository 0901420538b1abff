"""Trust figures for bench/verify.py: what the market does with verdicts, beyond one audit.

- `precision(...)`: int8 weights served as bf16, caught by the evidence CUSUM across audits
  (`scheduler.evidence`): jobs to detect (99th percentile over bootstrap sequences of
  measured jobs) and false alarms per honest audit (bootstrap lifetimes of honest bf16
  audits). Weights calibrated on other request seeds than the ones measured here.
- `swap(...)`: a node with 100+ clean jobs restarts on a tampered checkpoint: audited at
  the session rate after the reconnect (`AuditPolicy`), plus the reconnect's canary.
- `hostile(...)`: an honest node whose only qualified auditor is a cheater who fails every
  job it judges, through the coordinator's real verdict code on SQLite: penalties applied.
- `economics(...)`: cheating's expected penalty / gain with the slash the code takes, over
  audit rates and job sizes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from scheduler.audit import AuditPolicy, NodeHistory, cheating_economics
from scheduler.evidence import PrecisionEvidence, calibrate, jobs_to_alarm, token_z
from scheduler.verification import noise_scale_for


def _deltas(jobs, reference_lps, scale):
    return [token_z(j["lps"], ref, scale) for j, ref in zip(jobs, reference_lps)]


def precision(honest_cal, int8_cal, honest_meas, int8_meas, model: str, reps: int = 2000, lifetime: int = 5000,
              seed: int = 0) -> dict:
    """Each argument: (jobs, reference log-prob vectors) as bench/verify.py makes them. The
    figures are for the shipped weights (scheduler.evidence); the weights this run's
    calibration seeds would give are reported beside them, to see they are stable."""
    scale = noise_scale_for(model)
    weights = calibrate(_deltas(*honest_cal, scale), _deltas(*int8_cal, scale))  # what this run's seeds would give
    ev = PrecisionEvidence()  # what the coordinator ships (calibrated once, on other seeds)
    llr = lambda pop: np.array([ev.audit_llr(j["lps"], ref, scale) for j, ref in zip(*pop)])  # noqa: E731
    l0, l1 = llr(honest_meas), llr(int8_meas)
    rng = np.random.default_rng(seed)
    det = _detections(ev, l1, rng, reps)
    lives = max(200, reps // 4)
    alarms = 0
    for _ in range(lives):  # an honest bf16 node's audits, one lifetime at a time (reset after each alarm)
        s = 0.0
        for v in rng.choice(l0, lifetime):
            s, alarm = ev.update(s, float(v))
            if alarm:
                alarms, s = alarms + 1, 0.0
    return dict(int8_as_bf16_jobs_to_detect=float(np.percentile(det, 99)),
                int8_as_bf16_detected_within_20=float(np.mean(det <= 20)),
                precision_false_alarms_per_audit=alarms / (lives * lifetime),
                precision_weights_recalibrated=list(weights), precision_audit_llr={"honest_mean": float(l0.mean()),
                                                                      "int8_mean": float(l1.mean())})


def swap(detection_prob: float, honest_jobs: int = 120, canary: bool = True, reps: int = 20000, seed: int = 0) -> dict:
    """Jobs a swapped checkpoint sells before an audit catches it (99th percentile), after
    `honest_jobs` clean ones, with the policy's raised rate after the reconnect."""
    policy = AuditPolicy()
    rng = np.random.default_rng(seed)

    def one(with_canary: bool) -> int:
        passes = int(honest_jobs * 0.6)  # the audits its clean jobs passed (rate falls as they pass)
        for k in range(1, 10_000):
            h = NodeHistory(jobs=honest_jobs + k, passes=passes, session_jobs=k - 1)
            audited = (with_canary and k == 1) or rng.random() < policy.rate(h)
            if audited and rng.random() < detection_prob:
                return k
        return 10_000

    out = {}
    for name, c in (("swap_jobs_to_detect", canary), ("swap_jobs_to_detect_without_canary", False)):
        out[name] = float(np.percentile([one(c) for _ in range(reps // 4)], 99))
    return out


def economics(detection_prob: float, stake: int = 100 * 10**9) -> dict:
    """min expected penalty / gain over audit rates from the floor to 1 and jobs of 16 to
    4096 tokens at $0.2-$20 per million, with the slash the code takes (stake $100)."""
    policy = AuditPolicy()
    ratios = []
    for rate in (policy.floor, 0.05, 0.1, policy.session_rate, 0.5, 1.0):
        for tokens in (16, 256, 4096):
            for price in (200_000_000, 2_000_000_000, 20_000_000_000):
                e = cheating_economics(price_out=price, tokens_per_job=tokens, stake=stake, audit_rate=rate,
                                       detection_prob=detection_prob)
                ratios.append(e.ratio)
    return dict(cheat_ev_ratio_min=float(min(ratios)), cheat_ev_stake_nano_usd=stake)


def hostile(n_jobs: int = 30) -> dict:
    """The coordinator's own verdict code (SQLite): an honest node audited only by a cheater
    who fails everything it judges; then the operator's verifier comes online. Returns the
    penalties the honest node took (the target is 0) and what the cheater lost."""
    from coordinator.audits import assign_verifier, maybe_select
    from coordinator.db import create_all, make_engine
    from coordinator.models import Audit, InferenceRequest, Node
    from coordinator.runtime import Runtime
    from coordinator.settings import CoordinatorSettings
    from coordinator.verdicts import apply_result
    from tests.coordinator.test_audits import IDS, LPS, _node, _reply
    from tests.coordinator.test_settlement import _receipt, _request
    from coordinator.settlement import Relayed, settle
    from protocol import commitment_of

    with tempfile.TemporaryDirectory() as tmp:
        settings = CoordinatorSettings(home=Path(tmp), database_url=f"sqlite:///{tmp}/b.db", run_worker_in_process=False,
                                       audit_expiry_s=3600)
        engine = make_engine(settings.effective_database_url)
        create_all(engine)
        rt = Runtime(settings, engine=engine)
        try:
            honest = _node(rt, "honest", stake=10**10)
            cheat = _node(rt, "cheat", passes=5, stake=10**10)  # qualified: passed audits of its own
            audits = []
            for _ in range(n_jobs):
                rid, _ = _request(rt, honest, max_tokens=len(IDS))
                with rt.session() as s:
                    settle(s, _receipt(honest, rid, IDS, LPS), honest.public_key_hex,
                           Relayed(len(IDS), commitment_of(rid, IDS, LPS)), settings)
                    audit = maybe_select(s, s.get(InferenceRequest, rid), s.get(Node, honest.public_key_hex),
                                         IDS, LPS, "length", settings, u=0.0)
                audits.append(audit.id)
                with rt.session() as s:
                    assign_verifier(s, s.get(Audit, audit.id), settings)
                with rt.session() as s:
                    apply_result(s, _reply(audit.id, False), cheat.public_key_hex, settings)  # a lie
            with rt.session() as s:
                before = s.get(Node, honest.public_key_hex).audits_failed
            _node(rt, "operator", trusted=True)
            for aid in audits:  # the second opinions
                with rt.session() as s:
                    got = assign_verifier(s, s.get(Audit, aid), settings)
                if got is not None:
                    with rt.session() as s:
                        apply_result(s, _reply(aid, True), got[0], settings)
            with rt.session() as s:
                h, c = s.get(Node, honest.public_key_hex), s.get(Node, cheat.public_key_hex)
                return dict(hostile_verifier_false_penalties=before + h.audits_failed,
                            hostile_verifier_overturned=c.verdicts_overturned,
                            hostile_verifier_reputation_after=round(c.reputation, 6),
                            hostile_verifier_jobs=n_jobs, hostile_honest_passes=h.audits_passed)
        finally:
            rt.stop()
            engine.dispose()


def _detections(ev, llrs, rng, reps: int) -> np.ndarray:
    """Audited jobs until the alarm, for `reps` cheaters drawn from these per-audit LLRs."""
    return np.array([jobs_to_alarm(rng.choice(llrs, 200), ev.threshold) or 10**6 for _ in range(reps)])


def held_out(pop, model: str, name: str, reps: int = 2000, seed: int = 1) -> dict:
    """A tampering the evidence was not calibrated on (e.g. 1% weight noise served as bf16)."""
    ev, scale = PrecisionEvidence(), noise_scale_for(model)
    llrs = np.array([ev.audit_llr(j["lps"], ref, scale) for j, ref in zip(*pop)])
    det = _detections(ev, llrs, np.random.default_rng(seed), reps)
    return {f"{name}_as_bf16_jobs_to_detect": float(np.percentile(det, 99)),
            f"{name}_as_bf16_detected_within_20": float(np.mean(det <= 20))}


def section(model: str, quick: bool, population, detection_prob: float) -> dict:
    """Every trust figure for bench/verify.py. `population(mode, seed_base, n)` gives (jobs,
    reference log-prob vectors) for "honest" bf16 or a tampered mode ("int8", "noise") served as
    bf16. The precision
    evidence is calibrated on request seeds 9000.. and measured on 12000.. (other prompts,
    other sampling seeds)."""
    import sys

    n = 100 if quick else 400
    out = precision(population("honest", 9000, n), population("int8", 9000, n), population("honest", 12000, n),
                    population("int8", 12000, n), model)
    out.update(held_out(population("noise", 12000, n), model, "noise"))
    out.update(swap(detection_prob))
    out.update(economics(detection_prob))
    out.update(hostile(12 if quick else 30))
    print(f"int8 served as bf16: caught within {out['int8_as_bf16_jobs_to_detect']:.0f} audited jobs (p99; 1% weight "
          f"noise, not calibrated on: {out['noise_as_bf16_jobs_to_detect']:.0f}), "
          f"false alarms {out['precision_false_alarms_per_audit']:.2e} per honest audit; swap caught within "
          f"{out['swap_jobs_to_detect']:.0f} jobs (p99; {out['swap_jobs_to_detect_without_canary']:.0f} without the "
          f"canary); hostile verifier: {out['hostile_verifier_false_penalties']} false penalties in "
          f"{out['hostile_verifier_jobs']} lies; cheating EV ratio >= {out['cheat_ev_ratio_min']:.2f}", file=sys.stderr)
    return out
