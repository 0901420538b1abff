"""Native CPU kernels of the built-in engine, compiled on first use.

`decode_attention` (csrc/decode_attention.c) is built with the machine's C compiler
(`cc -O3 -march=native -fopenmp`) into the cache folder (AGORA_HOME or ~/.cache/agora,
under `native/`, keyed by the source, the flags and this CPU) and loaded with ctypes.
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

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_loaded: "DecodeAttention | None | bool" = False  # False: not tried yet


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


def build(source: Path = SOURCE, cache_dir: Path | None = None) -> Path:
    """Compile `source` into a shared library (once per source, flags and CPU) and return
    its path. Raises RuntimeError with the compiler's message when that fails."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    key = hashlib.sha256(
        source.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([cc, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-800:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class DecodeAttention:
    """The fused decode-attention kernel: writes a step's K/V into one layer's cache and
    returns attention over each row's positions 0..pos (see the C source for layouts)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        fn = self.lib.agora_decode_attention
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q [rows, kv_heads, groups, head_dim]; k, v [rows, kv_heads, head_dim]; pos int64
        [rows]; k_cache, v_cache one layer [slots, kv_heads, max_len, head_dim], float32."""
        rows, kvh, groups, hd = q.shape
        q, k, v, pos = q.contiguous(), k.contiguous(), v.contiguous(), pos.contiguous()
        for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
            if t.dtype != torch.float32 or t.device.type != "cpu":
                raise TypeError(f"{name} must be a float32 CPU tensor")
        if pos.dtype != torch.int64 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise TypeError("pos must be int64 and the caches contiguous")
        if k_cache.shape[0] < rows or k_cache.shape[1:] != v_cache.shape[1:] or k_cache.shape[3] != hd:
            raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit q {tuple(q.shape)}")
        max_len = k_cache.shape[2]
        if rows and int(pos.max()) >= max_len:
            raise ValueError(f"position {int(pos.max())} is past the cache length {max_len}")
        out = torch.empty_like(q)
        rc = self._fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), pos.data_ptr(), k_cache.data_ptr(),
                      v_cache.data_ptr(), out.data_ptr(), rows, kvh, groups, hd, max_len, scale,
                      torch.get_num_threads())
        if rc != 0:
            raise MemoryError("decode attention kernel could not allocate its score buffer")
        return out


def load() -> DecodeAttention | None:
    """The compiled kernel, or None where it is disabled or cannot be built here."""
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
                    _loaded = DecodeAttention(build())
                except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                    log.warning("native decode attention unavailable (%s); using the torch path", exc)
        return _loaded
