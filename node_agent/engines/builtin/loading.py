"""Loading the built-in engine's model: weights without starting an OpenMP pool in the
calling thread, the model's identity (which seeds the prefix cache's keys), the default KV
budget, and boolean settings from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from node_agent.engines.builtin.model import LlamaModel


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    return raw.strip().lower() not in ("0", "false", "no", "off")


def model_identity(folder: Path, dtype: str, quantization: str | None = None) -> bytes:
    """Seeds the prefix cache's block keys: the same tokens under other weights, another
    dtype or another quantisation are other keys."""
    parts = [dtype.encode()] + ([f"quantization={quantization}".encode()] if quantization else [])
    for f in sorted(folder.glob("*.json")) + sorted(folder.glob("*.safetensors")):
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    parts.append((folder / "config.json").read_bytes() if (folder / "config.json").exists() else b"")
    return b"|".join(parts)


def load_without_omp_pool(folder: Path, device: str, dtype: torch.dtype, quantization: str | None = None
                           ) -> LlamaModel:
    """Load (and pre-pack) the weights with one intra-op thread in the calling thread, so that
    the caller (usually the main thread) does not start an OpenMP pool of its own just for
    loading: see the note in `engine.BuiltinEngine._main` on libgomp throttling the engine thread's team."""
    return one_thread(device, lambda: LlamaModel(folder, device=device, dtype=dtype, quantization=quantization))


def one_thread(device: str, fn, *args, **kwargs):
    threads = torch.get_num_threads()
    if device.startswith("cuda") or threads <= 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


def default_kv_budget(device: str) -> int:
    """A quarter of the device's memory (CPU: physical RAM), at most 16 GiB."""
    try:
        if device.startswith("cuda"):
            total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 << 30
    return min(total // 4, 16 << 30)
