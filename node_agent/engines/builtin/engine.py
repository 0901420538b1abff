"""The built-in torch engine: continuous batching in a background thread.

One engine thread owns the model and its KV cache. Each iteration it takes new requests,
cancellations and scoring jobs from an inbox, admits waiting requests into free cache slots
(`max_batch` slots, fewer if the KV memory budget `kv_cache_bytes` holds fewer
`max_seq_len`-token sequences; at most `prefill_budget` prompt tokens per iteration),
prefills them as one batch, then runs one batched decode step for every running request.

Prefix cache (`prefix_cache.py`): the KV blocks of every prompt and, when a request ends,
of its generated tokens stay in a pool (LRU, `prefix_cache_bytes`); a new request copies
the longest cached run of whole blocks of its context into its slot and prefills only the
rest. On by default (within noise of no cache on fresh workloads, see the figures above
DEFAULT_PREFILL_CHUNK); off with `prefix_cache=False` or AGORA_NODE_PREFIX_CACHE=false.

Chunked prefill: while streams are decoding, an iteration prefills at most `prefill_chunk`
prompt tokens per prompt that could start this iteration (the staged one and the waiting
ones with a free slot), so a single long prompt is chunked finely and a burst still fills
the batch in a few iterations (0: off, whole prompts; on by default, see
DEFAULT_PREFILL_CHUNK). A prompt that does not fit is prefilled
chunk by chunk in a staging slot (one slot beyond the decode batch), one chunk per
iteration riding in that iteration's decode step, so the running streams keep their
inter-token latency; when its last chunk is done it moves into the decode batch. The
staged prompt's chunk is steered by an ITL budget (`itl_slack`): an iteration carrying it
may take at most 1.5x a decode-only one (moving average), never fewer than MIN_CHUNK rows. With
nothing decoding an iteration takes up to `prefill_budget` tokens. Every chunk attends
to the slot's earlier positions through the same kernel as a whole prompt, so the
output does not depend on the chunking.
Events go back to each request's asyncio queue with `loop.call_soon_threadsafe`, one call
per loop per step. Finished or cancelled requests leave at once; the last running request
moves into the freed slot so slots 0..B-1 are always the decode batch. Decode attention reads
each row's own length (the native kernel; on the torch path, slots are re-ordered longest
first after admissions and attention runs per group of similar lengths).

Per-token log-probabilities are the log-softmax of the raw logits (before temperature and
top-k/top-p). Sampled requests draw from their own seeded generator, so a seed gives the
same tokens whatever else is in the batch. EOS ends a request with finish_reason "stop"
(its event carries the EOS id and empty text) unless `ignore_eos`; a stop string ends it
with "stop" and its tokens are not emitted (see textstream.StopStream); `max_tokens` or the
end of the context ends it with "length".
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import torch

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent
from node_agent.engines.builtin.chunk_steer import DEFAULT_ITL_SLACK, MIN_CHUNK, ChunkSteer  # noqa: F401 (MIN_CHUNK: re-exported)
from node_agent.engines.builtin.loading import (
    default_kv_budget, env_flag, load_without_omp_pool, model_identity, one_thread,
)
from node_agent.engines.builtin.model import QUANTIZATIONS
from node_agent.engines.builtin.prefix_cache import PrefixCache
from node_agent.engines.builtin.sampling import make_generator, select_with_top
from node_agent.engines.builtin.textstream import Detokenizer, StopStream
from node_agent.engines.builtin.tokenizer import HFTokenizer
from node_agent.errors import EngineError, ModelLoadError, RequestTooLong

log = logging.getLogger(__name__)

# Bump when a change makes the engine faster or slower: cached benchmarks are re-measured.
ENGINE_REVISION = 5
# Prompt tokens prefilled per iteration while other streams decode. Measured (bench/engine.py,
# tiny-20m, 2 shared cores; 16 streams decoding when a 3,000-token prompt arrives; median
# inter-token gap during its prefill / before it, prefill time; serving workload of 32):
#   chunk 16: x2.3, 1.9 s;   32: x2.9, 1.1 s, serving 2.2x slower (admissions throttled);
#   64: x3.7, 0.8 s, serving within 3%;   128: x6, 0.65 s;   whole prompt: x100+, 0.44 s.
# 64 keeps the streams near their pace at the serving workload's throughput. Each chunk
# rides in the decode step's forward pass (LlamaModel.step); what remains is its attention
# over the prompt's earlier positions, which at 3,000 positions costs a small model about as
# much as the whole decode step.
# Defaults, measured on fresh serving workloads (32 requests of 16-512 prompt tokens and
# 8-256 new ones, three seeds, so the cache gets no hits; engines taking turns against the
# commit before these changes with neither feature; 1 torch thread because the 2 shared cores
# had a busy neighbour; tok/s ratios, +-10% run-to-run noise on tiny's ~1 s runs):
#   prefix cache alone: tiny 1.02, tiny-20m 1.00 -> on by default (AGORA_NODE_PREFIX_CACHE=
#     false turns it off). It cost 30% before its pool was made of lazily allocated segments
#     (growing one contiguous pool zeroed and copied up to 256 MiB at a time) and its block
#     copies went through numpy instead of resizing torch's OpenMP team around each copy.
#   cache and chunked prefill (64): tiny 0.92-0.99, tiny-20m 1.01-1.05 -> chunking stayed off (until the ITL budget below)
#     by default (AGORA_NODE_PREFILL_CHUNK=64 turns it on): on tiny it still measured 3-6%
#     slower, about what its fused step costs (LlamaModel.step with chunk rows: 677 vs 650 ms
#     of model time per run). It cost 45% before the per-iteration budget became
#     `prefill_chunk` per prompt that can start (a burst now fills the batch in a few steps).
# PREFILL_CHUNK is the chunk size measured for inter-token latency when it is switched on.
#   With the ITL budget (2026-12-01, 1 torch thread, a busy neighbour; tiny-20m, 16 streams,
#   3,000-token prompt, two interleaved rounds): p99 gap during / median before x3.1-3.6
#   (fixed 64-token chunks x5.4-6.3, whole prompt x107-127); the long prompt's prefill 5.4 s
#   (fixed 64: 2.4 s, whole 1.7 s). Serving (32 requests at once, fresh, on/off taking turns
#   twice per seed, 2 threads): tiny-20m tok/s 1.04 of chunking off (2 seeds), tiny 0.94-1.03
#   (3 seeds, median 1.00) -- once the ITL steering stopped applying while prompts queue
#   behind the staged one (steering a burst measured 0.45-0.87 of unchunked on tiny). On by
#   default: a long prompt no longer stalls every stream on the node for its whole prefill
#   (x100+), at ~3x its own TTFT.
PREFILL_CHUNK = 64
DEFAULT_PREFILL_CHUNK = PREFILL_CHUNK
# Tokens per prefix-cache block.
DEFAULT_PREFIX_BLOCK = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Running:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    tokens: list[int]  # prompt + prefix + generated
    remaining: int
    detok: Detokenizer
    stops: StopStream
    gen: torch.Generator | None
    slot: int = -1
    done: int = 0  # context positions whose K and V are in the slot (during a chunked prefill)
    hashes: list = field(default_factory=list)  # prefix-cache keys of its blocks, memoised
    finished: bool = False
    cancelled: bool = False
    outbox: list = field(default_factory=list)


class BuiltinEngine(Engine):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_batch: int = 32,
        max_seq_len: int | None = None,
        prefill_budget: int = 4096,
        kv_cache_bytes: int | None = None,
        prefix_cache: bool | None = None,
        prefix_cache_bytes: int | None = None,
        prefix_block: int = DEFAULT_PREFIX_BLOCK,
        prefill_chunk: int | None = None,
        itl_slack: float | None = None,
        quantization: str | None = None,
    ):
        """`prefix_cache`: keep and reuse KV blocks across requests (default: on unless
        AGORA_NODE_PREFIX_CACHE is false); `prefix_cache_bytes`: its pool (default: what the
        KV budget leaves after the slots, at most half the budget; AGORA_NODE_PREFIX_CACHE_MB);
        `prefill_chunk`: prompt tokens per iteration while streams decode (default
        DEFAULT_PREFILL_CHUNK = 64 or AGORA_NODE_PREFILL_CHUNK; 0 prefills whole prompts; the
        budget is this per prompt that can start in an iteration, see `_plan_prefill`);
        `itl_slack`: while streams decode, the staged long prompt's chunk is sized so that an
        iteration takes at most this many times a decode-only one (default DEFAULT_ITL_SLACK or
        AGORA_NODE_ITL_SLACK; 0 keeps the chunk at `prefill_chunk`), see `chunk_steer.py`;
        `quantization`: "int8" quantises the attention and MLP weights at load time (per
        output channel, see linear.Int8Linear; declared in the offer); None or "none": the
        checkpoint's weights in `dtype`."""
        if dtype not in DTYPES:
            raise EngineError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if quantization in ("none", ""):
            quantization = None
        if quantization not in QUANTIZATIONS:
            raise EngineError(f"quantization {quantization!r} is not supported by the built-in engine (int8 or none)")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError(f"device {device!r} requested but CUDA is not available")
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.device, self.dtype = device, dtype
        self.quantization = quantization  # declared in the offer (node_agent.agent.capabilities)
        if not self.model_dir.is_dir():
            raise ModelLoadError(f"model folder {self.model_dir} does not exist")
        self.model = load_without_omp_pool(self.model_dir, device, DTYPES[dtype], quantization)
        self.tokenizer = HFTokenizer(self.model_dir)
        c = self.model.cfg
        self.max_seq_len = min(max_seq_len or c.max_position_embeddings, c.max_position_embeddings)
        # The KV cache is one slot of max_seq_len positions per request: the memory budget
        # bounds the batch.
        per_slot = 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.model.embed.element_size() * self.max_seq_len
        budget = kv_cache_bytes if kv_cache_bytes is not None else default_kv_budget(device)
        if budget < per_slot:
            raise EngineError(f"KV cache budget of {budget} bytes cannot hold one {self.max_seq_len}-token sequence "
                              f"({per_slot} bytes); lower max_seq_len")
        self.max_batch = min(max_batch, budget // per_slot)
        self.kv_cache_bytes = self.max_batch * per_slot
        self.prefill_budget = prefill_budget
        if prefill_chunk is None:
            prefill_chunk = int(os.environ.get("AGORA_NODE_PREFILL_CHUNK", DEFAULT_PREFILL_CHUNK))
        if prefill_chunk < 0:
            raise EngineError(f"prefill_chunk must be >= 0, not {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if itl_slack is None:
            itl_slack = float(os.environ.get("AGORA_NODE_ITL_SLACK", DEFAULT_ITL_SLACK))
        if itl_slack != 0 and itl_slack <= 1:
            raise EngineError(f"itl_slack must be > 1 (or 0: fixed chunks), not {itl_slack}")
        self.itl_slack = itl_slack
        self.steer = ChunkSteer(prefill_chunk, itl_slack)  # the staged prompt's chunk (chunk_steer.py)
        if prefix_cache is None:
            prefix_cache = env_flag("AGORA_NODE_PREFIX_CACHE", True)
        if prefix_cache_bytes is None and os.environ.get("AGORA_NODE_PREFIX_CACHE_MB"):
            prefix_cache_bytes = int(float(os.environ["AGORA_NODE_PREFIX_CACHE_MB"]) * (1 << 20))
        if prefix_cache_bytes is None:
            prefix_cache_bytes = max(0, min(budget - self.kv_cache_bytes, budget // 2))
        if prefix_block < 1:
            raise EngineError(f"prefix_block must be >= 1, not {prefix_block}")
        self.prefix_block = prefix_block
        self.prefix_cache_bytes = prefix_cache_bytes if prefix_cache else 0
        self._cache_seed = model_identity(self.model_dir, dtype, quantization)
        self.prefix_cache: PrefixCache | None = None  # made by start(), dropped by close()
        self._staged: _Running | None = None  # the prompt being prefilled chunk by chunk
        self._to_store: list[_Running] = []  # prefilled last iteration: blocks to cache
        self._inbox: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._running: list[_Running] = []
        self._waiting: deque[_Running] = deque()
        self._pending: dict[int, _Running] = {}  # requests with undelivered events
        self._unsorted = False  # slots no longer ordered by length

    # ------------------------------------------------------------------ Engine API
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def render_chat(self, messages: list[dict]) -> str:
        return self.tokenizer.render_chat(messages)

    @property
    def bench_key(self) -> str:
        """Names this engine build in benchmark cache keys: cached figures of an older or
        other build (torch path vs native kernels) or precision (int8 weights) are not reused."""
        key = f"builtin{ENGINE_REVISION}-{'native' if self.model.kernels is not None else 'torch'}"
        return f"{key}-{self.quantization}" if self.quantization else key

    @property
    def eos_ids(self) -> frozenset[int]:
        return self.tokenizer.eos_ids

    @property
    def staging_slot(self) -> int:
        return self.max_batch

    def prefix_stats(self) -> dict:
        """Prefix-cache counters (tokens looked up and found, blocks stored and evicted) and
        its size; read them between requests (they are updated by the engine thread)."""
        pc = self.prefix_cache
        if pc is None:
            return {"enabled": False}
        return {"enabled": True, "block": pc.block, "blocks": len(pc), "capacity_blocks": pc.capacity,
                "bytes": pc.nbytes, **pc.stats}

    def prefix_block_keys(self, limit: int | None = None) -> list[bytes]:
        """The cached blocks' chain keys (16 bytes each), most recently used first."""
        return self.prefix_cache.block_keys(limit) if self.prefix_cache is not None else []

    def prefix_keys(self, prompt_ids: list[int]) -> list[bytes]:
        """The cache keys of the prompt's whole blocks (what serving it stores), [] without a cache."""
        pc = self.prefix_cache
        return pc.hashes(prompt_ids, [], len(prompt_ids) // pc.block) if pc is not None and pc.capacity else []

    def held_prefix_keys(self) -> set[bytes]:
        """The keys of the blocks cached now; safe to call from the agent's thread."""
        pc = self.prefix_cache
        for _ in range(3):
            try:
                return set(pc._lru) if pc is not None else set()
            except RuntimeError:  # the engine thread changed it meanwhile: read again
                continue
        return set()

    async def start(self) -> None:
        if self._thread is None:
            # One slot more than the decode batch: the staging slot of a chunked prefill.
            slots = self.max_batch + (1 if self.prefill_chunk else 0)
            one_thread(self.device, self.model.allocate_cache, slots, self.max_seq_len)
            # A fresh cache on every start: nothing cached survives a restart or a reload.
            self.prefix_cache = None
            if self.prefix_cache_bytes:
                pc = PrefixCache(self.model, self.prefix_cache_bytes, self.prefix_block, self._cache_seed)
                self.prefix_cache = pc if pc.capacity else None
            self._thread = threading.Thread(target=self._main, name=f"agora-engine-{self.model_name}", daemon=True)
            self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
            self._thread = None
            self.model.k_cache = self.model.v_cache = None
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineError(f"the engine thread died: {self._dead!r}")
        if self._thread is None:
            raise EngineError("engine not started (await engine.start() first)")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        self._check_alive()
        context = list(request.prompt_ids) + list(request.prefix_ids)
        if not context:
            raise EngineError("empty prompt")
        if len(context) >= self.max_seq_len:
            raise RequestTooLong(
                f"prompt of {len(context)} tokens does not fit the context of {self.max_seq_len} tokens"
            )
        bad = [t for t in context if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary of {self.model.cfg.vocab_size}")
        remaining = request.sampling.max_tokens - len(request.prefix_ids)
        if remaining <= 0:
            return
        loop = asyncio.get_running_loop()
        r = _Running(
            request=request, loop=loop, queue=asyncio.Queue(), tokens=context, remaining=remaining,
            detok=Detokenizer(self.tokenizer.decode, list(request.prompt_ids)[-6:], list(request.prefix_ids)),
            stops=StopStream(list(request.sampling.stop)), gen=make_generator(request.sampling),
        )
        self._inbox.put(("add", r))
        try:
            while True:
                item = await r.queue.get()
                if isinstance(item, BaseException):
                    raise item
                for ev in item:
                    yield ev
                if item and item[-1].finish_reason:
                    return
        finally:
            if not r.finished:
                self._inbox.put(("cancel", r))

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        if not prompt_ids:
            raise EngineError("scoring needs at least one prompt token")
        ids = list(prompt_ids) + list(completion_ids)
        if len(ids) > self.max_seq_len:
            raise RequestTooLong(f"{len(ids)} tokens exceed the context of {self.max_seq_len}")
        if not completion_ids:
            return []

        def job() -> list[float]:
            logits = self.model.forward_full(ids)[len(prompt_ids) - 1 : -1]
            logp = torch.log_softmax(logits.float(), -1)
            return logp.gather(1, torch.tensor(completion_ids, device=logp.device)[:, None])[:, 0].tolist()

        return await self.call(job)

    async def rescore(self, prompt_ids: list[int], claimed_ids: list[int], sampling):
        """Full-vocabulary rescoring (`node_agent.rescoring.rescore`) on the engine thread."""
        from node_agent.rescoring import rescore

        if len(prompt_ids) + len(claimed_ids) > self.max_seq_len:
            raise RequestTooLong(f"{len(prompt_ids) + len(claimed_ids)} tokens exceed the context of {self.max_seq_len}")
        return await rescore(self, prompt_ids, claimed_ids, sampling)

    async def call(self, fn: Callable[[], object]):
        """Run `fn` on the engine thread between steps (serialises use of the model)."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(("call", (fn, loop, fut)))
        return await fut

    # ------------------------------------------------------------------ engine thread
    def _main(self) -> None:
        # Measured (tiny-20m, 2 cores, libgomp): this thread's OpenMP team is throttled when
        # another thread (e.g. the main one, which loaded the model or ran transformers) also
        # owns an OpenMP pool: libgomp then stops spinning between parallel regions (more
        # managed threads than CPUs) and every region pays a futex wake-up. A batch-2 decode
        # step takes 5.2 ms here vs 2.6 ms when this thread owns the only pool; the 32-request
        # serving run 5.0 s vs 3.7 s. So the model is loaded with one thread in the caller
        # (`loading.load_without_omp_pool`), and benchmarks run baselines in another process.
        torch.set_grad_enabled(False)
        try:
            while True:
                if not self._drain(block=not (self._running or self._waiting)):
                    break
                try:
                    self._step()
                except Exception as exc:  # a failed step fails its requests, the engine goes on
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"engine step failed: {exc!r}"))
                self._flush()
        except BaseException as exc:  # pragma: no cover - last resort: never leave callers hanging
            self._dead = exc
            self._fail_all(EngineError(f"the engine thread died: {exc!r}"))
            self._flush()
            raise
        self._fail_all(EngineError("engine closed"))
        self._flush()

    def _drain(self, block: bool) -> bool:
        while True:
            try:
                kind, arg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self._waiting.append(arg)
            elif kind == "cancel":
                arg.cancelled = True
                if arg in self._waiting:
                    self._waiting.remove(arg)
                elif arg is self._staged:
                    self._staged = None
                    arg.slot = -1
                elif not arg.finished and arg.slot >= 0:
                    self._release(arg)
            elif kind == "call":
                fn, loop, fut = arg
                try:
                    res = fn()
                    loop.call_soon_threadsafe(_set_result, fut, res, None)
                except Exception as exc:
                    loop.call_soon_threadsafe(_set_result, fut, None, EngineError(f"engine call failed: {exc!r}"))

    def _step(self) -> None:
        """One iteration: plan this iteration's prefill (`_plan_prefill`), then one forward
        pass (`LlamaModel.step`) that decodes the running streams and prefills the planned
        prompt pieces; requests whose prompt is complete join the decode batch."""
        if self._to_store:
            # Prompts prefilled last iteration go into the prefix cache now, after their
            # first tokens went out (a request released since was stored by _release).
            for r in self._to_store:
                if r.slot >= 0 and not r.finished:
                    self.prefix_cache.store(r.slot, r.tokens, r.hashes, len(r.tokens) - 1)
            self._to_store.clear()
        if self._running and self._unsorted and self.model.kernels is None:
            self._sort_slots()
        batch = list(self._running)
        pieces, admitted = self._plan_prefill()
        if not batch and not pieces:
            return
        toks = pos = groups = None
        if batch:
            dev = self.model.device
            lens = [len(r.tokens) for r in batch]
            toks = torch.tensor([r.tokens[-1] for r in batch], device=dev)
            pos = torch.tensor([n - 1 for n in lens], device=dev)
            groups = None if self.model.kernels is not None else _span_groups(lens)  # torch path only
        t0 = time.perf_counter()
        dec_logits, chunk_logits = self.model.step(toks, pos, [(r.slot, r.tokens[a:e], a) for r, a, e in pieces],
                                                   groups)
        self.steer.timed(time.perf_counter() - t0, bool(batch), pieces, self._staged)
        done_rows, joined = [], []
        for row, (r, a, e) in enumerate(pieces):
            r.done = e
            if e == len(r.tokens):
                done_rows.append(row)
                joined.append(r)
                if self.prefix_cache is not None:
                    self._to_store.append(r)
        st = self._staged
        if st is not None and st.done == len(st.tokens):  # its last chunk: into the decode batch
            self._staged = None
            st.slot = len(self._running) + len(admitted)
            self.model.move_slot(self.staging_slot, st.slot, st.done)
            admitted.append(st)
        # slots len(running).. hold the admitted requests, in this order
        self._running.extend(admitted)
        if admitted:
            self._unsorted = True
        if batch:
            self._accept(batch, dec_logits)
        if joined:
            self._accept(joined, chunk_logits[done_rows])

    def _plan_prefill(self) -> tuple[list[tuple[_Running, int, int]], list[_Running]]:
        """This iteration's prompt pieces (request, first position, end position): the next
        chunk of the staged prompt, then waiting requests (FIFO) while the token budget
        lasts: whole prompts into slots after the decode batch, or, with chunking, the first
        chunk of one that does not fit into the staging slot. Each request's cached prefix
        is copied into its slot first and not recomputed. Returns the pieces and the
        requests admitted whole (slots len(running), len(running) + 1, ...)."""
        chunking = self.prefill_chunk > 0
        budget = self.prefill_budget
        if chunking and self._running:
            # `prefill_chunk` per prompt that could start this iteration (the staged one and
            # the waiting ones that have a slot): one long prompt arriving among decoding
            # streams is chunked finely, a burst fills the decode batch in a few iterations.
            free = self.max_batch - len(self._running) - (self._staged is not None)
            starters = (self._staged is not None) + min(len(self._waiting), max(0, free))
            budget = min(self.prefill_budget, self.prefill_chunk * max(1, starters))
        pieces: list[tuple[_Running, int, int]] = []
        st = self._staged
        if st is not None:
            n = min(len(st.tokens) - st.done, self.steer.rows(budget, bool(self._waiting)) if self._running else budget)
            pieces.append((st, st.done, st.done + n))
            budget -= n
        admitted: list[_Running] = []
        while (self._waiting and budget > 0
               and len(self._running) + len(admitted) + (self._staged is not None) < self.max_batch):
            r = self._waiting[0]
            cached = self.prefix_cache.match(r.tokens, r.hashes) if self.prefix_cache is not None else []
            need = len(r.tokens) - len(cached) * self.prefix_block
            if need <= budget or (not chunking and not pieces):
                slot = len(self._running) + len(admitted)
            elif chunking and self._staged is None:
                slot = self.staging_slot
            else:
                break
            self._waiting.popleft()
            start = self.prefix_cache.load(slot, r.tokens, r.hashes) if cached else 0
            end = len(r.tokens)
            r.slot = slot
            if slot == self.staging_slot:
                self._staged = r
                self.steer.restart()  # a cautious first chunk, then steered
                end = min(end, start + (self.steer.rows(budget, bool(self._waiting)) if self._running else budget))
            else:
                admitted.append(r)
            pieces.append((r, start, end))
            budget -= end - start
        return pieces, admitted

    def _sort_slots(self) -> None:
        """Order slots by length, longest first, so the torch attention path can skip most
        padding (the native kernel reads each row's own length: no sort). Done after
        admissions only: a release moves the last (shortest) row into the hole, which costs
        one padded row, where re-sorting would copy the whole cache."""
        self._unsorted = False
        order = sorted(range(len(self._running)), key=lambda i: -len(self._running[i].tokens))
        if order == list(range(len(order))):
            return
        self.model.permute_slots(order, len(self._running[order[0]].tokens))
        self._running = [self._running[i] for i in order]
        for i, r in enumerate(self._running):
            r.slot = i

    def _accept(self, batch: list[_Running], logits: torch.Tensor) -> None:
        ids, lps, tops = select_with_top(logits, [r.request.sampling for r in batch], [r.gen for r in batch])
        for r, tid, lp, top in zip(batch, ids, lps, tops):
            r.tokens.append(tid)
            r.remaining -= 1
            ev = TokenEvent(tid, lp, r.detok.add(tid))
            if top is not None:
                ev.top = [(t, self.tokenizer.decode([t]), v) for t, v in top]
            sp = r.request.sampling
            if tid in self.tokenizer.eos_ids and not sp.ignore_eos:
                ev.text += r.detok.flush()
                r.outbox += r.stops.finish(ev, "stop")
            elif r.remaining <= 0 or len(r.tokens) >= self.max_seq_len:
                ev.text += r.detok.flush()
                r.outbox += r.stops.finish(ev, "length")
            else:
                r.outbox += r.stops.push(ev)
            if r.outbox:
                self._pending[id(r)] = r
                r.finished = bool(r.outbox[-1].finish_reason)
        for r in batch:
            if r.finished and r.slot >= 0:
                self._release(r)

    def _release(self, r: _Running) -> None:
        if self.prefix_cache is not None:
            # K and V are in the slot for every token but the last (not yet run through the model)
            self.prefix_cache.store(r.slot, r.tokens, r.hashes, len(r.tokens) - 1)
        s, last = r.slot, self._running[-1]
        if last is not r:
            self.model.move_slot(last.slot, s, len(last.tokens))
            last.slot = s
            self._running[s] = last
        self._running.pop()
        r.slot = -1

    def _fail_all(self, err: EngineError) -> None:
        staged = [self._staged] if self._staged is not None else []
        self._staged = None
        self._to_store.clear()
        for r in list(self._running) + list(self._waiting) + staged:
            r.finished = True
            r.slot = -1
            r.outbox = []
            r.loop.call_soon_threadsafe(r.queue.put_nowait, err)
        self._running.clear()
        self._waiting.clear()

    def _flush(self) -> None:
        by_loop: dict = {}
        pending, self._pending = self._pending, {}
        for r in pending.values():
            if r.outbox:
                by_loop.setdefault(r.loop, []).append((r.queue, r.outbox))
                r.outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed
                pass


def _span_groups(lens: list[int], min_rows: int = 4, slack: float = 0.75) -> list[tuple[int, int, int]]:
    """Split rows sorted by length (longest first) into (start, end, span) groups: a new group
    starts once a row is shorter than `slack` of its group's span (and the group has
    `min_rows` rows). Unsorted input still works, just with less benefit."""
    groups, start, span = [], 0, max(lens)
    for i, n in enumerate(lens):
        if i - start >= min_rows and n < slack * span:
            groups.append((start, i, span))
            start, span = i, max(lens[i:])
    groups.append((start, len(lens), span))
    return groups


def _deliver(items) -> None:
    for q, events in items:
        q.put_nowait(events)


def _set_result(fut: asyncio.Future, res, exc) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)
