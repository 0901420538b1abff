"""Network round-trip times between regions, as a symmetric lookup table.

The default table ships in `scheduler/data/region_rtt_ms.csv` (public inter-region RTTs of
the big clouds); the routing policy only needs `matrix()`. A node's own round trip to the
coordinator is measured on its work channel (`Node.rtt_ms`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).with_name("data")
DEFAULT_RTT_CSV = DATA_DIR / "region_rtt_ms.csv"
UNKNOWN_RTT_MS = 150.0  # a pair the table does not know: assume an intercontinental hop
SAME_REGION_RTT_MS = 4.0


@dataclass(frozen=True)
class RttTable:
    pairs: dict[tuple[str, str], float] = field(default_factory=dict)
    unknown_ms: float = UNKNOWN_RTT_MS

    @classmethod
    def from_rows(cls, rows: list[tuple[str, str, float]], unknown_ms: float = UNKNOWN_RTT_MS) -> RttTable:
        pairs: dict[tuple[str, str], float] = {}
        for a, b, ms in rows:
            pairs[(a, b)] = float(ms)
            pairs[(b, a)] = float(ms)
        return cls(pairs, unknown_ms)

    @classmethod
    def from_csv(cls, path: str | Path = DEFAULT_RTT_CSV) -> RttTable:
        with open(path, newline="") as fh:
            rows = [(r["from"], r["to"], float(r["rtt_ms"])) for r in csv.DictReader(fh)]
        return cls.from_rows(rows)

    @property
    def regions(self) -> list[str]:
        return sorted({a for a, _ in self.pairs})

    def rtt_ms(self, a: str | None, b: str | None) -> float:
        if a is None or b is None:
            return self.unknown_ms
        if a == b:
            return self.pairs.get((a, b), SAME_REGION_RTT_MS)
        return self.pairs.get((a, b), self.unknown_ms)

    def matrix(self, rows: list[str | None], cols: list[str | None]) -> np.ndarray:
        """RTT in ms for every (row region, column region) pair, as float64."""
        ur = sorted({r for r in rows if r is not None} | {c for c in cols if c is not None})
        idx = {r: i for i, r in enumerate(ur)}
        small = np.array([[self.rtt_ms(a, b) for b in ur] for a in ur], dtype=np.float64).reshape(len(ur), len(ur))
        out_r = np.array([idx.get(r, -1) for r in rows], dtype=np.int64)
        out_c = np.array([idx.get(c, -1) for c in cols], dtype=np.int64)
        full = np.full((len(ur) + 1, len(ur) + 1), self.unknown_ms)
        full[: len(ur), : len(ur)] = small
        return full[out_r[:, None], out_c[None, :]]

_DEFAULT: RttTable | None = None


def default_rtt_table() -> RttTable:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = RttTable.from_csv()
    return _DEFAULT
