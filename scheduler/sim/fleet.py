"""A simulated fleet that looks like a real GPU rental market.

Decode speed comes from the memory-bandwidth roofline (every generated token reads all
weights once): `tok/s = bandwidth × efficiency / weight bytes`, with efficiency drawn in
50–80%. Prefill is compute-bound: `tok/s = FLOP/s × 40% / (2 × params)`. Prices follow
each card's typical hourly rent spread over the tokens it makes at half utilisation, times
a seller's markup. Some sellers over-claim their speed (and price as if they had it);
some nodes fail now and then. Used by `scheduler.sim.simulation` and `bench/routing.py`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scheduler.batching import ThroughputCurve

CATALOG_CSV = Path(__file__).resolve().parent.parent / "data" / "gpu_catalog.csv"
REGIONS = ("us-east", "us-west", "eu-west", "ap-southeast")
# (class, weight in the fleet): consumer cards are common and cheap, datacentre cards fast.
DEFAULT_MIX = (
    ("H100-SXM", 0.12), ("A100-SXM-80GB", 0.14), ("MI300X", 0.06), ("L40S", 0.12),
    ("RTX-4090", 0.22), ("RTX-3090", 0.22), ("L4", 0.12),
)
NANO = 1_000_000_000


@dataclass(frozen=True)
class GpuClass:
    name: str
    memory_gib: float
    bandwidth_tb_s: float
    bf16_tflops: float
    rent_usd_per_hour: float


def load_catalog(path: str | Path = CATALOG_CSV) -> dict[str, GpuClass]:
    with open(path, newline="") as fh:
        return {
            r["gpu"]: GpuClass(
                r["gpu"], float(r["memory_gib"]), float(r["memory_bandwidth_tb_s"]),
                float(r["bf16_dense_tflops"]), float(r["typical_rent_usd_per_hour"]),
            )
            for r in csv.DictReader(fh)
        }


def roofline_tokens_per_s(gpu: GpuClass, params_b: float, efficiency: float, bytes_per_param: float = 2.0) -> float:
    return gpu.bandwidth_tb_s * 1e12 * efficiency / (params_b * 1e9 * bytes_per_param)


@dataclass
class SimNode:
    id: str
    gpu: str
    region: str
    price_in: int  # nano-$ per Mtok
    price_out: int
    curve: ThroughputCurve  # the truth
    prefill_tokens_per_s: float
    overhead_ms: float
    advertised_tokens_per_s: float
    advertised_ttft_ms: float  # at a 640-token prompt
    advertised_prefill_tokens_per_s: float
    overclaims: bool = False
    mtbf_s: float | None = None  # mean time between failures (None: never fails)
    downtime_s: float = 15.0
    kv_cache_gib: float = 0.0  # memory left for KV blocks after the weights (streams and prefix cache)

    def ttft_ms(self, prompt_tokens: int) -> float:
        """Node-side time to first token (no network)."""
        return self.overhead_ms + 1000.0 * prompt_tokens / self.prefill_tokens_per_s


def build_fleet(
    n_nodes: int,
    seed: int = 0,
    model_params_b: float = 8.0,
    mix: tuple[tuple[str, float], ...] = DEFAULT_MIX,
    regions: tuple[str, ...] = REGIONS,
    overclaim_share: float = 0.15,
    failing_share: float = 0.05,
    slowdown_per_stream: float = 0.015,
    kv_gib_per_stream: float = 0.25,
) -> list[SimNode]:
    rng = np.random.default_rng(seed)
    catalog = load_catalog()
    names = [m for m, _ in mix]
    weights = np.array([w for _, w in mix]) / sum(w for _, w in mix)
    weights_gib = model_params_b * 2.0
    gpus = rng.choice(len(names), n_nodes, p=weights)
    over = rng.random(n_nodes) < overclaim_share
    failing = rng.random(n_nodes) < failing_share
    fleet = []
    for i in range(n_nodes):
        gpu = catalog[names[gpus[i]]]
        eff = rng.uniform(0.5, 0.8)
        tps = roofline_tokens_per_s(gpu, model_params_b, eff)
        max_batch = int(max(4, min(64, (gpu.memory_gib - weights_gib - 2.0) / kv_gib_per_stream)))
        curve = ThroughputCurve(tps, slowdown_per_stream, max_batch)
        prefill = gpu.bf16_tflops * 1e12 * 0.4 / (2.0 * model_params_b * 1e9)
        overhead = rng.uniform(20.0, 60.0)
        claim = rng.uniform(1.8, 3.0) if over[i] else rng.uniform(0.97, 1.05)
        # Price: rent over the tokens made at batch 16, half utilisation, times a markup;
        # an over-claimer prices as if its claim were true (bait).
        agg_tokens_h = curve.aggregate(16) * (claim if over[i] else 1.0) * 3600 * 0.5
        usd_per_mtok = gpu.rent_usd_per_hour / agg_tokens_h * 1e6 * rng.uniform(0.9, 1.4)
        price_out = int(usd_per_mtok * NANO)
        fleet.append(
            SimNode(
                id=f"node-{i:04d}", gpu=gpu.name, region=regions[rng.integers(len(regions))],
                price_in=price_out // 4, price_out=price_out, curve=curve,
                prefill_tokens_per_s=prefill, overhead_ms=overhead,
                advertised_tokens_per_s=tps * claim,
                advertised_ttft_ms=(overhead + 640_000.0 / prefill) / (claim if over[i] else 1.0),
                advertised_prefill_tokens_per_s=prefill * (claim if over[i] else 1.0),
                overclaims=bool(over[i]),
                mtbf_s=float(rng.uniform(20.0, 60.0)) if failing[i] else None,
                kv_cache_gib=max(0.0, gpu.memory_gib - weights_gib - 2.0),
            )
        )
    return fleet
