"""Request traces for the simulator: Poisson and bursty arrivals, mixed lengths,
preferences and latency targets (interactive chat, batch-ish jobs, price hunters), and
multi-turn conversations (growing context, think time between turns)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.sim.fleet import REGIONS


@dataclass
class SimRequest:
    id: str
    arrival_ms: float
    prompt_tokens: int
    max_tokens: int
    output_tokens: int  # what the model will actually generate (≤ max_tokens)
    region: str
    sort: str | None = None
    max_ttft_ms: float | None = None
    min_tokens_per_s: float | None = None
    max_price: int | None = None
    # Multi-turn conversations: turn k > 0 arrives `think_ms` after turn k-1 (`after`) ends,
    # so its `arrival_ms` is set by the simulation; its prompt repeats the whole earlier
    # conversation (system prompt, every user message and answer) plus a new user message.
    conversation: str | None = None
    turn: int = 0
    after: str | None = None
    think_ms: float = 0.0


def _requests(arrivals_ms: np.ndarray, rng: np.random.Generator, model_regions: tuple[str, ...]) -> list[SimRequest]:
    n = len(arrivals_ms)
    prompt = np.clip(rng.lognormal(np.log(400), 1.0, n), 16, 8000).astype(int)
    max_tokens = np.clip(rng.lognormal(np.log(256), 0.8, n), 16, 2048).astype(int)
    output = np.maximum(1, (max_tokens * rng.uniform(0.4, 1.0, n)).astype(int))
    region = rng.integers(len(model_regions), size=n)
    kind = rng.random(n)
    out = []
    for i in range(n):
        k = kind[i]
        if k < 0.125:  # latency-sensitive chat
            sort, ttft, tps = "latency", 1000.0, 15.0
        elif k < 0.25:  # wants fast streaming
            sort, ttft, tps = "throughput", 3000.0, 40.0
        elif k < 0.45:  # price hunters, patient
            sort, ttft, tps = "price", 10000.0, None
        else:  # default balanced with an ordinary target
            sort = None
            ttft = float(rng.choice([2000.0, 3000.0, 5000.0]))
            tps = float(rng.choice([0.0, 10.0, 20.0]))
            tps = tps or None
        max_price = 900_000_000 if rng.random() < 0.1 else None  # $0.90 / Mtok output
        out.append(
            SimRequest(
                id=f"req-{i:06d}", arrival_ms=float(arrivals_ms[i]), prompt_tokens=int(prompt[i]),
                max_tokens=int(max_tokens[i]), output_tokens=int(output[i]),
                region=model_regions[region[i]], sort=sort, max_ttft_ms=ttft,
                min_tokens_per_s=tps, max_price=max_price,
            )
        )
    return out


def poisson_trace(n: int, rate_per_s: float, seed: int = 0, regions: tuple[str, ...] = REGIONS) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1000.0 / rate_per_s, n))
    return _requests(arrivals, rng, regions)


def bursty_trace(
    n: int,
    rate_per_s: float,
    burst_factor: float = 6.0,
    burst_share: float = 0.1,
    mean_burst_s: float = 2.0,
    seed: int = 0,
    regions: tuple[str, ...] = REGIONS,
) -> list[SimRequest]:
    """Two-state Markov-modulated Poisson: calm at a lower rate, bursts at `burst_factor`
    times it, spending `burst_share` of the time in bursts; the mean rate is `rate_per_s`."""
    rng = np.random.default_rng(seed)
    calm_rate = rate_per_s / (1.0 - burst_share + burst_share * burst_factor)
    mean_calm_s = mean_burst_s * (1.0 - burst_share) / burst_share
    t, arrivals, bursting = 0.0, [], False
    state_end = rng.exponential(mean_calm_s * 1000.0)
    while len(arrivals) < n:
        rate = calm_rate * (burst_factor if bursting else 1.0)
        t += rng.exponential(1000.0 / rate)
        while t > state_end:
            bursting = not bursting
            state_end += rng.exponential((mean_burst_s if bursting else mean_calm_s) * 1000.0)
        arrivals.append(t)
    return _requests(np.array(arrivals), rng, regions)


def conversation_trace(
    n_conversations: int,
    rate_per_s: float,
    seed: int = 0,
    min_turns: int = 4,
    max_turns: int = 8,
    think_s: float = 8.0,
    system_tokens: float = 1500.0,
    regions: tuple[str, ...] = REGIONS,
) -> list[SimRequest]:
    """Chat sessions: conversations start as a Poisson process at `rate_per_s`; each has
    `min_turns`..`max_turns` turns. A conversation has a system prompt or document (≈`system_tokens`,
    lognormal), each turn a user message (≈80) and an answer (≈250); turn k's prompt is the
    system prompt plus every earlier message and answer plus its own message, so the context
    grows turn by turn. Between turns the user thinks (lognormal around `think_s`, 1–60 s)
    after the answer has ended. Interactive preferences: balanced with a 5 s TTFT target, or
    sort=latency with 3 s. Turn 0 arrives at its start time; later turns' `arrival_ms` are
    placeholders the simulation overwrites (see `SimRequest.after`)."""
    rng = np.random.default_rng(seed)
    starts = np.cumsum(rng.exponential(1000.0 / rate_per_s, n_conversations))
    out: list[SimRequest] = []
    for c in range(n_conversations):
        turns = int(rng.integers(min_turns, max_turns + 1))
        system = int(np.clip(rng.lognormal(np.log(system_tokens), 0.8), 100, 8000))
        region = regions[rng.integers(len(regions))]
        latency = rng.random() < 0.3
        sort, ttft = ("latency", 3000.0) if latency else (None, 5000.0)
        context, prev = system, None
        for k in range(turns):
            user = int(np.clip(rng.lognormal(np.log(80), 0.8), 8, 800))
            answer = int(np.clip(rng.lognormal(np.log(250), 0.6), 20, 1000))
            prompt = context + user
            rid = f"conv-{c:04d}-t{k}"
            out.append(SimRequest(
                id=rid, arrival_ms=float(starts[c]), prompt_tokens=prompt, max_tokens=1024,
                output_tokens=answer, region=region, sort=sort, max_ttft_ms=ttft,
                conversation=f"conv-{c:04d}", turn=k, after=prev,
                think_ms=0.0 if k == 0 else float(np.clip(rng.lognormal(np.log(think_s * 1000.0), 0.6), 1000.0, 60000.0)),
            ))
            context, prev = prompt + answer, rid
    return out
