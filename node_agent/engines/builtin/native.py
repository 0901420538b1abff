"""Native CPU kernels of the built-in engine, compiled on first use.

The C sources in csrc/ (decode attention, causal prefill attention, the int8 weight-only
linear layer) are built with the
machine's C compiler (`cc -O3 -march=native -fopenmp`) into one library in the cache folder
(AGORA_HOME or ~/.cache/agora, under `native/`, keyed by the sources, the flags and this
CPU) and loaded with ctypes.
Where it cannot be built (no compiler, another platform) or AGORA_NATIVE_KERNELS=0,
`load()` returns None and the model uses its torch path; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name("csrc") / n
                for n in ("decode_attention.c", "prefill_attention.c", "int8_linear.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_loaded: "Kernels | None | bool" = False  # False: not tried yet


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    home = os.environ.get("AGORA_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "agora") / "native"


def build(sources: tuple[Path, ...] = SOURCES, cache_dir: Path | None = None, extra_flags: tuple[str, ...] = ()
          ) -> Path:
    """Compile `sources` into one shared library (once per sources, flags and CPU) and
    return its path. Raises RuntimeError with the compiler's message when that fails."""
    flags = [*FLAGS, *extra_flags]
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(
        b"".join(s.read_bytes() for s in sources) + " ".join([cc, *flags]).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"agora_kernels-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, *map(str, sources), "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-800:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _check(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
            raise TypeError(f"{name} must be a contiguous float32 CPU tensor")


class Kernels:
    """The compiled kernels (see the C sources for layouts and limits)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
        self._decode = self.lib.agora_decode_attention
        self._decode.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, f, ctypes.c_int]
        self._decode.restype = ctypes.c_int
        self._prefill = self.lib.agora_prefill_attention
        self._prefill.argtypes = [p, p, p, p, p, i, i, i, i, f, ctypes.c_int]
        self._prefill.restype = ctypes.c_int
        self._prefill_cache = self.lib.agora_prefill_attention_cache
        self._prefill_cache.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, f, ctypes.c_int]
        self._prefill_cache.restype = ctypes.c_int
        self._int8_linear = self.lib.agora_int8_linear
        self._int8_linear.argtypes = [p, p, p, p, p, i, i, i, ctypes.c_int]
        self._int8_linear.restype = ctypes.c_int
        self._int8_dequant = self.lib.agora_int8_dequant
        self._int8_dequant.argtypes = [p, p, p, i, i, i, i, ctypes.c_int]
        self._int8_dequant.restype = ctypes.c_int

    def int8_linear(self, x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    out_features: int) -> torch.Tensor:
        """y = x @ (W * scale[:, None]).T + bias for int8 W [out_features, K] in the kernel's
        packed layout (`pack_int8`); x float32 [rows, K]. Returns float32 [rows, out_features]."""
        x = x.contiguous()
        _check(x=x, scale=scale, **({"bias": bias} if bias is not None else {}))
        rows, k = x.shape
        tiles = (out_features + 3) // 4
        if (packed.dtype != torch.int8 or not packed.is_contiguous() or packed.numel() != tiles * 4 * ((k + 15) // 16 * 16)
                or scale.shape != (out_features,) or (bias is not None and bias.shape != (out_features,))):
            raise ValueError(f"packed weights {tuple(packed.shape)}, scale {tuple(scale.shape)} do not fit "
                             f"x {tuple(x.shape)} -> {out_features} outputs")
        out = torch.empty(rows, out_features, dtype=torch.float32)
        self._int8_linear(x.data_ptr(), packed.data_ptr(), scale.data_ptr(),
                          bias.data_ptr() if bias is not None else None, out.data_ptr(), rows, out_features, k,
                          torch.get_num_threads())
        return out

    def int8_dequant(self, packed: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, n0: int, n1: int,
                     in_features: int) -> torch.Tensor:
        """Channels [n0, n1) of the packed int8 W [len(scale), in_features] times their scales,
        written into `out` (contiguous float32 with at least (n1 - n0) * in_features elements,
        n0 a multiple of 4). Returns out[:(n1 - n0) * in_features] viewed as [n1 - n0, in_features]."""
        n, k = scale.numel(), in_features
        if (n0 % 4 or not 0 <= n0 < n1 <= n or packed.dtype != torch.int8 or not packed.is_contiguous()
                or packed.numel() != (n + 3) // 4 * 4 * ((k + 15) // 16 * 16)):
            raise ValueError(f"channels [{n0}, {n1}) of packed weights {tuple(packed.shape)} -> {n}x{k}")
        _check(scale=scale, out=out)
        if out.numel() < (n1 - n0) * k:
            raise ValueError(f"out holds {out.numel()} floats, {(n1 - n0) * k} needed")
        self._int8_dequant(packed.data_ptr(), scale.data_ptr(), out.data_ptr(), n, k, n0, n1,
                           torch.get_num_threads())
        return out.view(-1)[:(n1 - n0) * k].view(n1 - n0, k)

    def decode_attention(self, qkv: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                         pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                         scale: float) -> torch.Tensor:
        """One layer's decode attention from the fused projection's output: rotary embedding
        of q and k, K/V written at each row's position, attention over positions 0..pos.
        qkv [rows, (heads + 2 * kv_heads) * head_dim]; cos, signed_sin [rows, head_dim] (sin
        with its first half negated); pos int64 [rows]; k_cache, v_cache one layer
        [slots, kv_heads, max_len, head_dim]. Returns [rows, heads * head_dim]."""
        rows = qkv.shape[0]
        _, kvh, max_len, hd = k_cache.shape
        qkv, pos = qkv.contiguous(), pos.contiguous()
        cos, signed_sin = cos.reshape(rows, -1).contiguous(), signed_sin.reshape(rows, -1).contiguous()
        _check(qkv=qkv, cos=cos, signed_sin=signed_sin, k_cache=k_cache, v_cache=v_cache)
        if pos.dtype != torch.int64 or pos.shape != (rows,):
            raise TypeError("pos must be an int64 tensor with one position per row")
        if (k_cache.shape[0] < rows or k_cache.shape != v_cache.shape or heads % kvh
                or qkv.shape[1] != (heads + 2 * kvh) * hd or cos.shape != (rows, hd) or signed_sin.shape != (rows, hd)):
            raise ValueError(f"qkv {tuple(qkv.shape)}, rope {tuple(cos.shape)} and cache {tuple(k_cache.shape)} "
                             f"do not fit {heads} heads")
        out = torch.empty(rows, heads * hd, dtype=qkv.dtype)
        rc = self._decode(qkv.data_ptr(), cos.data_ptr(), signed_sin.data_ptr(), pos.data_ptr(), k_cache.data_ptr(),
                          v_cache.data_ptr(), out.data_ptr(), rows, heads, kvh, hd, max_len, scale,
                          torch.get_num_threads())
        if rc == -2:
            raise ValueError(f"positions must lie in the cache length {max_len}")
        if rc != 0:
            raise MemoryError("decode attention kernel could not allocate its buffers")
        return out

    def prefill_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int],
                          scale: float) -> torch.Tensor | None:
        """Causal attention of prompts packed back to back (each from position 0): q
        [tokens, heads, head_dim], k, v [tokens, kv_heads, head_dim]; returns
        [tokens, heads, head_dim], or None where the kernel does not cover the shape
        (head_dim not a multiple of 16, no AVX-512): the caller falls back."""
        _check(q=q, k=k, v=v)
        tokens, heads, hd = q.shape
        if k.shape != v.shape or k.shape[0] != tokens or k.shape[2] != hd or sum(lengths) != tokens:
            raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and lengths {sum(lengths)} disagree")
        starts = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0, out=starts[1:])
        out = torch.empty_like(q)
        rc = self._prefill(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), starts.data_ptr(),
                           len(lengths), heads, k.shape[1], hd, scale, torch.get_num_threads())
        if rc < 0:
            raise MemoryError("prefill attention kernel could not allocate its buffers")
        return out if rc == 0 else None

    def prefill_cache_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                pieces: list[tuple[int, int, int]], scale: float) -> torch.Tensor | None:
        """Causal attention of new rows continuing sequences in the cache: q [tokens, heads,
        head_dim] packs the pieces back to back; piece (slot, start, n) is n rows at positions
        start.. of `slot`, whose K and V (positions 0..start+n) are already in k_cache, v_cache
        (one layer, [slots, kv_heads, max_len, head_dim]). Returns [tokens, heads, head_dim], or
        None where the kernel does not cover the shape (the caller falls back)."""
        _check(q=q, k_cache=k_cache, v_cache=v_cache)
        tokens, heads, hd = q.shape
        nslots, kvh, max_len, chd = k_cache.shape
        if k_cache.shape != v_cache.shape or chd != hd or sum(n for *_, n in pieces) != tokens:
            raise ValueError(f"q {tuple(q.shape)}, cache {tuple(k_cache.shape)} and pieces disagree")
        if any(not 0 <= s < nslots for s, _, _ in pieces):
            raise ValueError(f"slot outside the cache's {nslots} slots")
        meta = torch.tensor([[0, s, st] for s, st, _ in pieces], dtype=torch.int64).reshape(-1, 3)
        starts = torch.zeros(len(pieces) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([n for *_, n in pieces], dtype=torch.int64), 0, out=starts[1:])
        slots, past = meta[:, 1].contiguous(), meta[:, 2].contiguous()
        out = torch.empty_like(q)
        rc = self._prefill_cache(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), starts.data_ptr(),
                                 slots.data_ptr(), past.data_ptr(), len(pieces), heads, kvh, hd, max_len, scale,
                                 torch.get_num_threads())
        if rc == -2:
            raise ValueError(f"positions must lie in the cache length {max_len}")
        if rc < 0:
            raise MemoryError("prefill attention kernel could not allocate its buffers")
        return out if rc == 0 else None


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] in the layout of the int8 linear kernel: tiles of 4 output
    channels, each ceil(K / 16) blocks of [4 channels][16 columns] (zero-padded), so that one
    tile is read front to back, one 64-byte line per 16 columns."""
    n, k = q.shape
    np_, kp = (n + 3) // 4 * 4, (k + 15) // 16 * 16
    padded = torch.zeros(np_, kp, dtype=torch.int8)
    padded[:n, :k] = q
    return padded.view(np_ // 4, 4, kp // 16, 16).permute(0, 2, 1, 3).contiguous().view(-1)


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [N, K] int8 weights back from `pack_int8`'s layout."""
    np_, kp = (n + 3) // 4 * 4, (k + 15) // 16 * 16
    return packed.view(np_ // 4, kp // 16, 4, 16).permute(0, 2, 1, 3).reshape(np_, kp)[:n, :k]


def load() -> Kernels | None:
    """The compiled kernels, or None where they are disabled or cannot be built here."""
    global _loaded
    with _lock:
        if _loaded is False:
            _loaded = None
            if os.environ.get("AGORA_NATIVE_KERNELS", "1").lower() in ("0", "false", "no", "off"):
                log.info("native kernels disabled by AGORA_NATIVE_KERNELS")
            elif not sys.platform.startswith("linux"):
                log.info("native kernels are built on Linux only; using the torch path")
            else:
                try:
                    _loaded = Kernels(build())
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log.warning("native kernels unavailable (%s); using the torch path", exc)
        return _loaded
