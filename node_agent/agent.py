"""The node agent's main loop: register, heartbeat, hold the work channel, serve work.

The agent dials out to the coordinator (one WebSocket), so it works behind NAT. Each
assignment runs as its own task on the engine (which batches concurrent requests);
tokens stream back as they are generated with their log-probs, and every request ends
with a signed receipt committing to the token ids and log-probs delivered (or, for an
engine that cannot name its tokens, to the text and token counts: see `Chunker`).

A node registered `verify_only` (`agora verifier`) is never sold work: it only rescores
other nodes' jobs for audits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

import httpx
import websockets
from pydantic import ValidationError

from node_agent.prefix_report import PrefixReport
from node_agent.engines.base import Engine, GenerationRequest, SamplingParams, TokenEvent
from node_agent.engines.throttle import ThrottledEngine
from node_agent.errors import CoordinatorRejected, EngineError
from node_agent.identity import Identity
from node_agent.settings import NodeSettings
from protocol import (
    Assignment, ChannelHello, Done, Heartbeat, ModelOffer, Receipt, Registration, TokenChunk,
    TokenCommitment, TopLogprob, VerifyJob, VerifyResult, WorkError, fresh_stamp, quantize_logprob,
)
from protocol.commitment import NO_LOGPROB

log = logging.getLogger("agora.node")
_ABSENT_DTYPES = (None, "", "auto", "remote", "unknown")
BEAT_ACK_EVERY = 6  # one beat in this many asks the coordinator for an ack (30 s at the default 5 s)


def core_engine(engine: Engine) -> Engine:
    """The engine that computes: the throttle only paces generation, so what the node can
    do (ids, log-probs, verifying) and its scoring are the wrapped engine's."""
    while isinstance(engine, ThrottledEngine):
        engine = engine.inner
    return engine


def capabilities(engine: Engine, declared_dtype: str | None = None) -> dict:
    """The offer fields that say what this engine can do and what it computes in."""
    core = core_engine(engine)
    can_verify = getattr(core, "can_verify", None)
    if can_verify is None:  # an engine that does not say: it can verify if it implements rescore
        can_verify = type(core).rescore is not Engine.rescore
    dtype = getattr(core, "dtype", None)
    dtype = str(dtype).removeprefix("torch.") if dtype not in _ABSENT_DTYPES else (declared_dtype or "float32")
    return dict(dtype=dtype[:16], quantization=getattr(core, "quantization", None),
                token_ids=bool(getattr(core, "token_ids", True)), logprobs=bool(getattr(core, "logprobs", True)),
                can_verify=bool(can_verify))


class Chunker:
    """Turns an engine's events into `TokenChunk`s and keeps the commitment the receipt signs.

    Events with token ids become one id-level chunk each. An engine that cannot name its
    tokens gives text-level chunks, under the coordinator's bound: the running count may
    not exceed the text bytes relayed (+1 for a final end token), or the chunk is refused
    and never paid. Tokens that add no text (an end token, half of a multi-byte character)
    wait until enough text has gone out, and whatever is still waiting at the end goes in
    one last empty chunk, as much of it as the bound allows."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.commitment = TokenCommitment(request_id)
        self.count = 0  # tokens sent: the receipt's completion_tokens
        self.text_bytes = 0  # text sent in text-level chunks: the coordinator's bound
        self.textual = False
        self.pending: list[int | None] = []  # quantised log-probs of tokens not sent yet

    def add(self, ev: TokenEvent) -> TokenChunk | None:
        lp = None if ev.logprob is None else quantize_logprob(ev.logprob)
        if ev.token_id is not None and not self.textual:
            chunk = self._emit([ev.token_id], None if lp is None else [lp], ev.text, 1)
            if ev.top is not None:  # the buyer asked for alternatives (not committed: never audited)
                chunk.top_logprobs = [[TopLogprob(token_id=t, text=text[:256], logprob=quantize_logprob(v))
                                       for t, text, v in ev.top[:20]]]
            return chunk
        if self.count and not self.textual:  # ids, then none: the bound would refuse the rest
            raise EngineError("the engine stopped naming its tokens mid-stream")
        self.textual = True
        self.pending += [lp] + [None] * (max(ev.count, 1) - 1)
        return self._text(ev.text, final=False)

    def finish(self) -> TokenChunk | None:
        if not self.pending:
            return None
        chunk = self._text("", final=True)
        if self.pending:
            log.warning("request %s: %d token(s) the text cannot carry were not counted", self.request_id,
                        len(self.pending))
        return chunk

    def _text(self, text: str, final: bool) -> TokenChunk | None:
        room = self.text_bytes + len(text.encode("utf-8", "surrogatepass")) + (1 if final else 0) - self.count
        n = max(0, min(len(self.pending), room))
        if n == 0 and not text:
            return None
        lps, self.pending = self.pending[:n], self.pending[n:]
        logprobs = None if all(q is None for q in lps) else [NO_LOGPROB if q is None else q for q in lps]
        return self._emit(None, logprobs, text, n)

    def _emit(self, ids: list[int] | None, logprobs: list[int] | None, text: str, n: int) -> TokenChunk:
        chunk = TokenChunk(request_id=self.request_id, start=self.count, token_ids=ids, logprobs=logprobs,
                           count=None if ids is not None else n, text=text)
        self.commitment.update_chunk(ids, logprobs, text, n)
        self.count += n
        if ids is None:
            self.text_bytes += len(text.encode("utf-8", "surrogatepass"))
        return chunk


class NodeAgent:
    def __init__(self, settings: NodeSettings, engine: Engine, identity: Identity,
                 benchmark: dict | None = None, http: httpx.AsyncClient | None = None):
        self.settings, self.engine, self.identity = settings, engine, identity
        self.benchmark = benchmark or {}
        self.http = http or httpx.AsyncClient(base_url=settings.http_base, timeout=10.0)
        self.tasks: dict[str, asyncio.Task] = {}
        self.ready = asyncio.Event()  # set once the work channel is open
        self._ws = None
        self._send_lock = asyncio.Lock()
        self._beat_sent: float | None = None  # monotonic time of the last beat that asked for an ack
        self._beat_acked = 0.0
        self._beats = 0  # beats sent on this channel
        self._first_receipt: Receipt | None = None  # for the replay_receipt test mode
        core = core_engine(engine)
        # what the engine's prefix cache holds, reported in beats (prefix_report.py); None
        # for engines whose cache cannot be read (vLLM, upstream servers)
        self.prefix_report = PrefixReport(core.held_prefix_keys) if hasattr(core, "held_prefix_keys") else None

    @property
    def node_id(self) -> str:
        return self.identity.public_key_hex

    # ------------------------------------------------------------------ control plane
    def registration(self) -> Registration:
        summary = self.benchmark.get("summary", {})
        tps = self.settings.advertised_tokens_per_s or summary.get("tokens_per_s") or 1.0
        b1 = summary.get("tokens_per_s_b1")
        if self.settings.adversary == "overclaim_tps":  # TEST TOOL: claim 3x the benchmark
            tps, b1 = tps * 3, (b1 * 3 if b1 else None)
        core = core_engine(self.engine)
        verify_only = self.settings.verify_only
        offer = ModelOffer(
            model=self.settings.market_model, price_in=0 if verify_only else self.settings.price_in,
            price_out=0 if verify_only else self.settings.price_out, tokens_per_s=tps,
            tokens_per_s_b1=b1, ttft_ms=summary.get("ttft_ms"),
            max_context=getattr(core, "max_context", None) or getattr(core, "max_seq_len", None) or 2048,
            **capabilities(self.engine, self.settings.dtype),
        )
        reg = Registration(node_id=self.node_id, **fresh_stamp(), models=[offer],
                           region=self.settings.region, max_concurrency=self.settings.max_concurrency,
                           engine=self.settings.engine, benchmark=self.benchmark, name=self.settings.name,
                           operator=self.settings.operator, verify_only=verify_only)
        return reg.sign(self.identity)

    async def register(self) -> dict:
        resp = await self.http.post("/v1/nodes/register", json=self.registration().model_dump(mode="json"))
        if resp.status_code != 200:
            raise CoordinatorRejected(f"registration refused ({resp.status_code}): {resp.text}")
        return resp.json()

    async def heartbeat_once(self) -> None:
        hb = Heartbeat(node_id=self.node_id, **fresh_stamp()).sign(self.identity)
        resp = await self.http.post("/v1/nodes/heartbeat", json=hb.model_dump(mode="json"))
        if resp.status_code == 404:  # the coordinator forgot us (new database): register again
            await self.register()
        elif resp.status_code != 200:
            raise CoordinatorRejected(f"heartbeat refused ({resp.status_code}): {resp.text}")

    async def _heartbeats(self) -> None:
        """Liveness: a `beat` frame on the open work channel (the coordinator notes it and
        writes liveness in batches: no signature, no HTTP round trip); every
        BEAT_ACK_EVERY-th beat (the first on a new channel among them) asks for a `beat_ack`,
        and the signed HTTP heartbeat takes over while the channel is down or when that ack
        did not come by the next beat (a coordinator that predates beats). A dead
        connection is also found by websockets' own keepalive pings."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            acked = self._beat_sent is None or self._beat_acked >= self._beat_sent
            if self.ready.is_set() and self._ws is not None and acked:
                now, ask = time.monotonic(), self._beats % BEAT_ACK_EVERY == 0
                self._beats += 1
                if ask:
                    self._beat_sent = now
                beat = {"type": "beat", "t": now, "ack": ask}
                if self.prefix_report is not None:  # the first beat on a channel says everything
                    beat.update(self.prefix_report.beat_fields(full=self._beats == 1))
                try:
                    await self._send_raw(beat)
                    continue
                except (OSError, websockets.WebSocketException) as exc:
                    log.debug("beat not sent (%s): heartbeat over HTTP", exc)
            self._beat_sent, self._beats = None, 0  # and the next beat asks again
            try:
                await self.heartbeat_once()
            except (httpx.HTTPError, CoordinatorRejected) as exc:
                log.warning("heartbeat failed: %s", exc)

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        delay = 0.2
        while True:  # register, retrying until the coordinator answers
            try:
                await self.register()
                break
            except httpx.HTTPError as exc:
                log.info("coordinator not reachable yet (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
        hb = asyncio.create_task(self._heartbeats())
        try:
            await self._channel_forever()
        finally:
            hb.cancel()
            for t in self.tasks.values():
                t.cancel()

    async def _channel_forever(self) -> None:
        delay = 0.2
        while True:
            try:
                await self._channel_once()
                delay = 0.2
            except (OSError, websockets.WebSocketException, CoordinatorRejected) as exc:
                log.warning("work channel lost (%s); reconnecting in %.1fs", exc, delay)
            self.ready.clear()
            await asyncio.sleep(delay + random.random() * delay / 2)
            delay = min(delay * 2, self.settings.reconnect_max_s)

    async def _channel_once(self) -> None:
        async with websockets.connect(self.settings.ws_url, max_size=2**24, ping_interval=20) as ws:
            hello = ChannelHello(node_id=self.node_id, **fresh_stamp()).sign(self.identity)
            await ws.send(hello.model_dump_json())
            welcome = json.loads(await ws.recv())
            if welcome.get("type") != "welcome":
                if "unknown node" in str(welcome.get("reason", "")):
                    await self.register()
                raise CoordinatorRejected(f"channel refused: {welcome.get('reason')}")
            self._ws, self._beats, self._beat_sent = ws, 0, None
            self.ready.set()
            log.info("work channel open as node %s…", self.node_id[:12])
            async for raw in ws:
                self._on_frame(json.loads(raw))

    def _on_frame(self, frame: dict) -> None:
        kind = frame.get("type")
        if kind == "assign":
            try:
                a = Assignment.model_validate(frame)
            except ValidationError as exc:
                log.warning("malformed assignment: %s", exc)
                return
            if self.settings.verify_only:  # never sold work; say so rather than let the buyer wait
                asyncio.create_task(self._send(WorkError(request_id=a.request_id, code="verify_only",
                                                         message="this node only verifies")))
            elif a.request_id not in self.tasks:
                self.tasks[a.request_id] = asyncio.create_task(self._serve(a))
        elif kind == "cancel":
            task = self.tasks.get(frame.get("request_id", ""))
            if task is not None:
                task.cancel()
        elif kind == "verify":
            try:
                job = VerifyJob.model_validate(frame)
            except ValidationError as exc:
                log.warning("malformed verify job: %s", exc)
                return
            asyncio.create_task(self._verify(job))
        elif kind == "ping":
            asyncio.create_task(self._send_raw({"type": "pong", "t": frame.get("t")}))
        elif kind == "beat_ack":
            self._beat_acked = time.monotonic()
        elif kind == "notice":  # the market tells the seller something it must act on
            level = logging.ERROR if frame.get("level") == "error" else logging.WARNING
            log.log(level, "coordinator: %s", frame.get("message", ""))
        elif kind == "refused":
            log.error("coordinator closed the work channel: %s", frame.get("reason", ""))

    async def _send(self, frame) -> None:
        await self._send_raw(frame.model_dump_json())

    async def _send_raw(self, data: str | dict) -> None:
        async with self._send_lock:
            if self._ws is not None:
                await self._ws.send(data if isinstance(data, str) else json.dumps(data))

    # ------------------------------------------------------------------ serving one request
    def _request(self, a: Assignment, prompt_ids: list[int]) -> GenerationRequest:
        """The engine request, continuing after what earlier nodes delivered (failover): their
        token ids when all of them had ids and this engine tokenises exactly, else their text;
        `prefix_tokens` of max_tokens are spent either way."""
        s = a.sampling
        sampling = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, seed=s.seed, stop=list(s.stop), top_logprobs=s.top_logprobs)
        if a.prefix_token_ids and getattr(core_engine(self.engine), "encodes_exactly", True):
            prefix = list(a.prefix_token_ids)
        else:
            prefix = self.engine.encode(a.prefix_text) if a.prefix_text else []
        delivered = a.prefix_tokens or (len(prefix) if a.prefix_token_ids else 0)
        return GenerationRequest.continuing(a.request_id, prompt_ids, sampling, prefix, delivered)

    async def _serve(self, a: Assignment) -> None:
        chunks = Chunker(a.request_id)
        prompt_tokens, finish = 0, "stop"
        try:
            try:
                text = self.engine.render_chat(a.messages or []) if a.kind == "chat" else (a.prompt or "")
                prompt_ids = self.engine.encode(text)
                prompt_tokens = len(prompt_ids)
                async for ev in self.engine.generate(self._request(a, prompt_ids)):
                    chunk = chunks.add(ev)
                    if chunk is not None:
                        await self._send(chunk)
                    if ev.finish_reason:
                        finish = ev.finish_reason
            except asyncio.CancelledError:
                finish = "cancelled"
            last = chunks.finish()
            if last is not None:
                await self._send(last)
            usage = core_engine(self.engine).take_usage(a.request_id) or {}
            prompt_tokens = int(usage.get("prompt_tokens") or prompt_tokens)
            if self.prefix_report is not None and finish != "cancelled" and not (a.prefix_token_ids or a.prefix_text):
                try:  # a hint for routing: never fails the request
                    self.prefix_report.served(a.model, {"messages": a.messages, "prompt": a.prompt},
                                              core_engine(self.engine).prefix_keys(prompt_ids))
                except Exception:  # noqa: BLE001
                    log.exception("prefix report: could not note %s", a.request_id)
        except EngineError as exc:
            await self._send(WorkError(request_id=a.request_id, code=exc.code, message=str(exc)))
            return
        except Exception as exc:  # an engine bug must not hang the buyer
            log.exception("engine failed on %s", a.request_id)
            await self._send(WorkError(request_id=a.request_id, code="engine_error",
                                       message=f"{type(exc).__name__}: {exc}"))
            return
        finally:
            self.tasks.pop(a.request_id, None)
        receipt = Receipt(node_id=self.node_id, **fresh_stamp(), request_id=a.request_id, model=a.model,
                          prompt_tokens=prompt_tokens, completion_tokens=chunks.count,
                          commitment=chunks.commitment.hex, finish_reason=finish).sign(self.identity)
        receipt = self._cheat_receipt(receipt)
        await self._send(Done(request_id=a.request_id, receipt=receipt))

    def _cheat_receipt(self, receipt: Receipt) -> Receipt:
        """TEST TOOL (--adversary): dishonest receipts, to prove the coordinator refuses them."""
        mode = self.settings.adversary
        if mode == "overbill_prompt":  # the prompt count is the node's own: claim three times it
            receipt.prompt_tokens = receipt.prompt_tokens * 3 + 5
            return receipt.sign(self.identity)
        if mode == "inflate_tokens":
            receipt.completion_tokens = int(receipt.completion_tokens * 1.5) + 1
            return receipt.sign(self.identity)
        if mode == "replay_receipt":
            if self._first_receipt is None:
                self._first_receipt = receipt
            return self._first_receipt.model_copy(update={"request_id": receipt.request_id}) \
                if self._first_receipt is not receipt else receipt
        return receipt

    # ------------------------------------------------------------------ verifying another node
    async def _verify(self, job: VerifyJob) -> None:
        """Rescore another node's claimed output with one teacher-forced forward pass, on
        whatever engine this node runs (one that cannot score says so in `error`)."""
        engine = core_engine(self.engine)
        try:
            text = engine.render_chat(job.messages or []) if job.kind == "chat" else (job.prompt or "")
            prompt_ids = engine.encode(text)
            result = await engine.rescore(prompt_ids, job.claimed_ids, job.sampling)
            reply = result.to_dict()
            reply["meta"]["eos_ids"] = sorted(int(t) for t in getattr(engine, "eos_ids", ()) or ())
            if getattr(engine, "encodes_exactly", True):  # the prompt re-counted: over-billing shows
                reply["meta"]["prompt_tokens"] = len(prompt_ids)
            frame = VerifyResult(audit_id=job.audit_id, rescore=reply)
        except Exception as exc:  # this engine cannot verify (or the job is bad): say so
            frame = VerifyResult(audit_id=job.audit_id, error=f"{type(exc).__name__}: {exc}")
        await self._send(frame)

    async def close(self) -> None:
        await self.http.aclose()
