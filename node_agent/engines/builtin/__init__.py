"""The built-in torch engine (Llama family, continuous batching) and its factory."""

from __future__ import annotations

from pathlib import Path

from node_agent.engines.builtin.engine import BuiltinEngine
from node_agent.errors import ModelLoadError

__all__ = ["BuiltinEngine", "load_builtin_engine"]


def load_builtin_engine(
    model: str,
    device: str = "cpu",
    dtype: str = "float32",
    max_batch: int = 32,
    *,
    cache_dir: str | Path | None = None,
    **kw,
) -> BuiltinEngine:
    """A BuiltinEngine for a preset name ("tiny", "tiny-20m@seed=7") or a model folder.

    Extra keyword arguments (max_seq_len, prefill_budget) go to BuiltinEngine. Call
    `await engine.start()` before generating."""
    from node_agent.tiny_model import resolve_model

    try:
        folder = resolve_model(model, cache_dir=cache_dir)
    except FileNotFoundError as exc:
        raise ModelLoadError(str(exc)) from exc
    return BuiltinEngine(folder, model_name=model, device=device, dtype=dtype, max_batch=max_batch, **kw)
