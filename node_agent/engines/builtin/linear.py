"""Linear layers with weights pre-packed for oneDNN on CPU.

Measured on this 2-core AMD EPYC (fp32, 100M-parameter decoder, batch 1): `F.linear`
(MKL GEMV) reads weights at about 19 GB/s; oneDNN with weights reordered once for a
batch hint of 32 reads them at about 65 GB/s (the machine's copy bandwidth is about 78
GB/s), and is also faster at batch 8-512. Elsewhere (CUDA, float16, no oneDNN) the
plain `F.linear` is used.
"""

from __future__ import annotations

import threading

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
        self.params = weight.numel() + (bias.numel() if bias is not None else 0)
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


# ---------------------------------------------------------------- int8 weight-only
# Rows up to which the native int8 kernel runs; above, the weights are de-quantised by the
# native kernel into a scratch buffer shared by all layers (one layer's float32 weights at
# most, DEQUANT_CHUNK floats) and oneDNN multiplies all rows by them (prefill). Measured
# (2 shared cores, weights streamed from memory, per layer, int8 kernel vs the packed float32
# layer above): 5632x768 at 1 row 4.5-5x faster, 8 rows 2.5-2.9x, 64 rows 1.03-1.05x, 256 rows
# 0.9x; 768x2816: 3.1-4.7x, 2.1-2.5x, 1.1-1.2x, 0.7x. The de-quantise + oneDNN path vs the
# float32 layer: 160 rows 0.7-1.0x, 512-2048 rows 0.95-1.0x (de-quantising 4.3M weights takes
# ~0.75 ms; MKL's sgemm, `F.linear`, on the same de-quantised weights is 2-2.5x slower than
# oneDNN on this AMD CPU, and torch's per-call `.to(float32) * scale` path was 0.4-0.6x).
# Serving A/B (32 requests, prompts 16-512, same build, int8 vs float32 taking turns, best of
# 2 per workload, machine shared and noisy): tiny-20m 1.01-1.18x float32 (previous path 0.8x),
# tiny-100m 1.10x (previous 0.77x).
INT8_KERNEL_ROWS = 128
# Most float32 weights de-quantised at once (64 MiB); a larger layer runs in channel blocks.
DEQUANT_CHUNK = 1 << 24

_scratch = threading.local()


def _dequant_scratch(numel: int) -> torch.Tensor:
    """This thread's float32 scratch buffer of at least `numel` elements (grown, never
    shrunk: at most DEQUANT_CHUNK floats)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = _scratch.buf = torch.empty(numel, dtype=torch.float32)
    return buf


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: scale = absmax(row) / 127, q = round(w / scale),
    computed in float32 (deterministic for given weights). Returns (q int8 [N, K], scale
    float32 [N]); an all-zero row gets scale 0 and q 0."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Linear:
    """y = x @ (q * scale[:, None]).T + b: int8 weights (per-output-channel scales),
    activations in the compute dtype.

    Paths: CPU float32 with the native kernels: the int8 kernel (weights kept in its packed
    layout only) for up to INT8_KERNEL_ROWS rows; above, the native de-quantiser into a
    shared scratch buffer + oneDNN's float32 GEMM (`_many_rows`); else
    torch's `_weight_int8pack_mm` where this build runs it for the dtype and device (CPU
    bfloat16, measured at 1 row: 2-3.5x faster than the float32 layer; its float32 input is
    a scalar path, ~10x slower, so it is not used for float32), else the weights
    de-quantised for each call (correct, not fast)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        from node_agent.engines.builtin import native

        self.out_features, self.in_features = weight.shape
        self.dtype, self.device = dtype, torch.device(device)
        q, scale = quantize_int8(weight)
        self.params = q.numel() + (bias.numel() if bias is not None else 0)
        self.nbytes = q.numel() + scale.numel() * 4 + (bias.numel() * bias.element_size() if bias is not None else 0)
        self.bias = bias.to(device=self.device, dtype=dtype).contiguous() if bias is not None else None
        self.kernels = native.load() if self.device.type == "cpu" and dtype == torch.float32 else None
        self.path = "dequant"
        self.q = self.packed = None
        if self.kernels is not None:
            self.packed, self.scale = native.pack_int8(q), scale
            self.path = "native"
            self.onednn = _can_pack(torch.zeros(1, dtype=torch.float32))
            return
        self.q = q.to(self.device)
        self.scale = scale.to(device=self.device, dtype=dtype)
        if hasattr(torch.ops.aten, "_weight_int8pack_mm") and dtype != torch.float32:
            # float32 inputs take a scalar path in torch 2.13 on CPU (measured ~10x slower
            # than the float32 GEMV): only for half types
            try:
                probe = torch.zeros(1, self.in_features, dtype=dtype, device=self.device)
                torch.ops.aten._weight_int8pack_mm(probe, self.q, self.scale)
                self.path = "int8pack"
            except (RuntimeError, NotImplementedError):
                pass

    def int8_weight(self) -> torch.Tensor:
        """The int8 weights [out_features, in_features] (a copy when stored packed)."""
        if self.q is not None:
            return self.q
        from node_agent.engines.builtin import native

        return native.unpack_int8(self.packed, self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        """q * scale in the compute dtype, [out_features, in_features]."""
        w = self.int8_weight().to(device=self.device, dtype=torch.float32) * self.scale.to(self.device, torch.float32)[:, None]
        return w.to(self.dtype)

    def _gemm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.onednn:
            try:
                return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
            except RuntimeError:  # this build cannot run it on plain weights
                self.onednn = False
        return F.linear(x, w, bias)

    def _many_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Native path above INT8_KERNEL_ROWS: blocks of output channels de-quantised into
        the shared scratch buffer (the whole layer when it fits DEQUANT_CHUNK), each block
        multiplied by all rows. No float32 copy of the weights outlives the call."""
        n, k = self.out_features, self.in_features
        step = max(4, DEQUANT_CHUNK // k // 4 * 4)
        buf = _dequant_scratch(min(n, step) * k)
        if step >= n:
            return self._gemm(x, self.kernels.int8_dequant(self.packed, self.scale, buf, 0, n, k), self.bias)
        y = torch.empty(x.shape[0], n, dtype=torch.float32)
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            w = self.kernels.int8_dequant(self.packed, self.scale, buf, n0, n1, k)
            y[:, n0:n1] = self._gemm(x, w, self.bias[n0:n1] if self.bias is not None else None)
        return y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.path == "native":
            if x2.shape[0] <= INT8_KERNEL_ROWS:
                y = self.kernels.int8_linear(x2, self.packed, self.scale, self.bias, self.out_features)
            else:
                y = self._many_rows(x2.contiguous())
        elif self.path == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.q, self.scale)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.view(*shape[:-1], self.out_features)
