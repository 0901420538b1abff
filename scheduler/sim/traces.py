"""Request traces for the simulator: Poisson and bursty arrivals, mixed lengths,
preferences and latency targets (interactive chat, batch-ish jobs, price hunters)."""

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
