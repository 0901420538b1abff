"""Linear layers with weights pre-packed for oneDNN on CPU.

Measured on this 2-core AMD EPYC (fp32, 100M-parameter decoder, batch 1): `F.linear`
(MKL GEMV) reads weights at about 19 GB/s; oneDNN with weights reordered once for a
batch hint of 32 reads them at about 65 GB/s (the machine's copy bandwidth is about 78
GB/s), and is also faster at batch 8-512. Elsewhere (CUDA, float16, no oneDNN) the
plain `F.linear` is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_HINT = 32
# Below this many weights, a oneDNN call costs more (~10 us) than MKL's for a few rows
# (~4 us): such small layers keep both layouts and use the plain one for <= SMALL_ROWS rows.
# Measured at 1-8 rows, 1 and 2 threads, weights streamed from memory: 128x128 and 256x128
# MKL 3-8 us vs oneDNN 10-11 us; 512x512 MKL 44-88 us vs oneDNN 21-46 us; 1024x512 MKL
# 120-220 us vs oneDNN 40-83 us (MKL's GEMV reads at ~13 GB/s here, oneDNN's at ~27-50).
SMALL_WEIGHT = 1 << 17
SMALL_ROWS = 8


def _can_pack(w: torch.Tensor) -> bool:
    return (
        w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class Linear:
    """y = x @ W.T + b, with W in whatever layout is fastest on its device."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size() + (
            bias.numel() * bias.element_size() if bias is not None else 0
        )
        self.bias = bias.contiguous() if bias is not None else None
        self.packed = None
        self.weight = weight.contiguous()
        if pack and _can_pack(weight):
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_HINT)
                probe = torch.zeros(1, self.in_features, dtype=weight.dtype)
                torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
                self.packed = packed
                if weight.numel() >= SMALL_WEIGHT:
                    self.weight = None
            except RuntimeError:  # this build cannot run it: keep the plain layout
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and (self.weight is None or x.numel() > SMALL_ROWS * self.in_features):
            shape = x.shape
            y = torch.ops.mkldnn._linear_pointwise(
                x.reshape(-1, self.in_features), self.packed, self.bias, "none", [], ""
            )
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)
