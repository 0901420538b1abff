"""An engine that forwards to any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama).

    agora node --engine openai --upstream http://127.0.0.1:8000/v1 --model NAME [--tokenizer DIR]

Requests go to `POST {upstream}/completions` with `stream: true`, asking for per-token
log-probs (`logprobs: 1`) and vLLM's `return_tokens_as_token_ids` (tokens come back as
`token_id:N`, exact). Servers differ in what they return, so `start()` sends one probe
(`echo` + `logprobs` + one generated token) and records what this upstream can do; the
agent puts it in the market offer:

- `token_ids`: the node can name its tokens (the server says `token_id:N`, or a local
  `--tokenizer` maps its token strings);
- `logprobs`: the server reports per-token log-probs;
- `can_verify`: `echo` returns prompt log-probs with `top_logprobs` by id, so this node can
  rescore other nodes' jobs (`rescore`: `echo` + `logprobs=K` + `max_tokens` 0 ->
  `rescoring.rescore_topk`).

An engine that cannot name a token never invents an id: its events carry `token_id=None`
and the agent commits to the text instead. Each streamed chunk of text counts as one
token; at the end the server's `usage` is the truth: if it counted more tokens than the
chunks (tokens that added no text), one last event carries the difference. The server's
`usage.prompt_tokens` is what the receipt claims for the prompt (`take_usage`).

Text without a local tokenizer travels as text: `encode` maps text to its UTF-8 bytes (a
lossless stand-in that `decode` reverses), so prompts and failover prefixes stay text.
Chat prompts are rendered with the tokenizer's chat template, or ChatML without one.

dtype / quantization (the audit tolerance) come from the upstream's `/v1/models` entry when
it says, else from the operator's flags; an OpenAI-compatible server is assumed to serve
bfloat16 unless told.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import AsyncIterator

import httpx

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent
from node_agent.errors import EngineError, RequestTooLong

_TOO_LONG = ("maximum context length", "context length", "too long", "context_length_exceeded")
PROBE_PROMPT = "The market opens before sunrise."
RESCORE_TOP_K = 20  # top log-probs per position asked for when rescoring (vLLM's default max)
UNKNOWN_VOCAB = 1 << 17  # the tail size assumed when neither tokenizer nor server says


class OpenAICompatEngine(Engine):
    def __init__(
        self,
        upstream: str,
        model: str | None = None,
        *,
        tokenizer_dir: str | Path | None = None,
        api_key: str | None = None,
        dtype: str | None = None,
        quantization: str | None = None,
        timeout: float = 600.0,
        rescore_top_k: int = RESCORE_TOP_K,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.model_name = model or ""
        self.device = "remote"
        self.dtype, self.quantization = dtype or "bfloat16", quantization
        self.rescore_top_k = rescore_top_k
        self.tokenizer = None
        if tokenizer_dir is not None:
            from node_agent.engines.builtin.tokenizer import HFTokenizer

            self.tokenizer = HFTokenizer(Path(tokenizer_dir))
        # What the upstream can do: assumed until start() probes it.
        self.server_ids = False
        self.logprobs = True
        self.token_ids = self.tokenizer is not None
        self.can_verify = False
        self.encodes_exactly = self.tokenizer is not None  # encode() gives the model's own ids
        self.vocab_size: int | None = self.tokenizer.vocab_size if self.tokenizer else None
        self.eos_ids: frozenset[int] = self.tokenizer.eos_ids if self.tokenizer else frozenset()
        self.max_context: int | None = None
        self.usage: dict[str, dict] = {}
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._client_loop = None

    @property
    def logprobs_available(self) -> bool:
        return self.logprobs

    # ------------------------------------------------------------------ lifecycle
    def _http(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:  # a client belongs to one loop
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=self._transport)
            self._client_loop = loop
        return self._client

    async def start(self) -> None:
        data = await self._get("/models")
        entries = {m.get("id"): m for m in data.get("data", []) if isinstance(m, dict)}
        if not self.model_name:
            if not entries:
                raise EngineError(f"upstream {self.upstream} serves no models")
            self.model_name = next(iter(entries))
        elif self.model_name not in entries:
            raise EngineError(f"upstream {self.upstream} does not serve {self.model_name!r} "
                              f"(it serves {', '.join(map(repr, entries)) or 'nothing'})")
        self._read_model_entry(entries[self.model_name])
        await self._probe()

    def _read_model_entry(self, entry: dict) -> None:
        meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
        dtype = entry.get("dtype") or meta.get("dtype")
        if isinstance(dtype, str) and dtype:
            self.dtype = dtype.removeprefix("torch.")[:16]
        quant = entry.get("quantization") or meta.get("quantization")
        if isinstance(quant, str) and quant:
            self.quantization = quant[:16]
        for key, attr in (("max_model_len", "max_context"), ("vocab_size", "vocab_size")):
            value = entry.get(key) or meta.get(key)
            if isinstance(value, int) and value > 0 and (attr == "max_context" or self.tokenizer is None):
                setattr(self, attr, value)

    async def _probe(self) -> None:
        """One request that shows what the server returns: log-probs? ids? echo?"""
        body = {"model": self.model_name, "prompt": PROBE_PROMPT, "max_tokens": 1, "temperature": 0.0,
                "echo": True, "logprobs": 1, "return_tokens_as_token_ids": True}
        echo = True
        try:
            data = await self._post(body)
        except RequestTooLong:
            raise
        except EngineError as exc:
            if "HTTP 4" not in str(exc):
                raise
            echo = False  # the server refuses echo (or our extras): ask plainly
            data = await self._post({k: v for k, v in body.items() if k not in ("echo", "return_tokens_as_token_ids")})
        choice = (data.get("choices") or [{}])[0]
        lp = choice.get("logprobs") or {}
        tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
        self.logprobs = any(v is not None for v in values)
        self.server_ids = bool(tokens) and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens)
        self.token_ids = self.logprobs and (self.server_ids or self.tokenizer is not None)
        generated = int((data.get("usage") or {}).get("completion_tokens") or 1)
        tops = (lp.get("top_logprobs") or [])[1:max(len(tokens) - generated, 1)]
        echo = echo and len(tokens) > generated and any(isinstance(t, dict) and t for t in tops)
        self.can_verify = echo and self.token_ids

    async def close(self) -> None:
        if self._client is not None:
            try:
                await self._client.aclose()
            except RuntimeError:  # its loop is gone
                pass
            self._client = None

    # ------------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if self.tokenizer else list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer:
            return self.tokenizer.decode(ids)
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict]) -> str:
        if self.tokenizer:
            return self.tokenizer.render_chat(messages)
        return "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages) + (
            "<|im_start|>assistant\n"
        )

    def take_usage(self, request_id: str) -> dict | None:
        return self.usage.pop(request_id, None)

    # ------------------------------------------------------------------ HTTP
    async def _get(self, path: str) -> dict:
        try:
            r = await self._http().get(self.upstream + path)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} unreachable: {exc!r}") from exc
        _raise_for(r, r.text)
        try:
            return r.json()
        except ValueError as exc:
            raise EngineError(f"upstream {self.upstream}{path} did not answer JSON: {r.text[:120]!r}") from exc

    async def _post(self, body: dict) -> dict:
        try:
            r = await self._http().post(self.upstream + "/completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} failed: {exc!r}") from exc
        _raise_for(r, r.text)
        try:
            return r.json()
        except ValueError as exc:
            raise EngineError(f"upstream {self.upstream} did not answer JSON: {r.text[:120]!r}") from exc

    # ------------------------------------------------------------------ generation
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        sp = request.sampling
        remaining = request.max_new_tokens
        if remaining <= 0:
            return
        context = list(request.prompt_ids) + list(request.prefix_ids)
        body = {
            "model": self.model_name,
            "prompt": context if self.tokenizer else self.decode(context),
            "max_tokens": remaining, "temperature": sp.temperature, "top_p": sp.top_p,
            "stream": True, "stream_options": {"include_usage": True},
        }
        if self.logprobs:  # the buyer's top_logprobs pass through (at least the chosen token's)
            body.update(logprobs=max(1, sp.top_logprobs), return_tokens_as_token_ids=True)
        for key, value in (("top_k", sp.top_k or None), ("seed", sp.seed), ("stop", list(sp.stop) or None),
                           ("ignore_eos", sp.ignore_eos or None)):
            if value is not None:
                body[key] = value
        held: TokenEvent | None = None
        finish: str | None = None
        counted, usage = 0, None
        try:
            async with self._http().stream("POST", self.upstream + "/completions", json=body) as r:
                if r.status_code >= 400:
                    _raise_for(r, (await r.aread()).decode(errors="replace"))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise EngineError(f"upstream error: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        for ev in self._events(choice, sp.top_logprobs):
                            if held is not None:
                                yield held
                            held, counted = ev, counted + ev.count
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} failed mid-stream: {exc!r}") from exc
        except ValueError as exc:  # bad JSON in the stream
            raise EngineError(f"upstream {self.upstream} sent an unreadable stream: {exc}") from exc
        self._keep_usage(request, usage)
        finish = "length" if finish == "length" else "stop"
        # Text-level streams: the server's count is the truth for tokens that sent no text.
        missing = int((usage or {}).get("completion_tokens") or 0) - counted
        if (held is None or held.token_id is None) and missing > 0:
            if held is not None:
                yield held
            yield TokenEvent(None, None, "", finish, count=missing)
        elif held is not None:
            held.finish_reason = finish
            yield held

    def _keep_usage(self, request: GenerationRequest, usage: dict | None) -> None:
        usage = dict(usage or {})
        if not usage.get("prompt_tokens") and self.tokenizer is None:
            # No count from the server: about 4 bytes a token, rounded down (never over-claim).
            usage["prompt_tokens"] = max(1, len(request.prompt_ids) // 4)
        self.usage[request.request_id] = usage
        while len(self.usage) > 4096:  # requests nobody asked about (benchmarks) must not pile up
            self.usage.pop(next(iter(self.usage)))

    def _events(self, choice: dict, top_k: int = 0) -> list[TokenEvent]:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        if not tokens:  # no per-token detail: one chunk of text, counted as one token
            return [TokenEvent(None, None, text)] if text else []
        values = lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or []
        last = len(tokens) - 1
        events = [TokenEvent(self._token_id(tok), _float(values[k] if k < len(values) else None),
                             text if k == last else "") for k, tok in enumerate(tokens)]
        if top_k > 0:
            for k, ev in enumerate(events):
                ev.top = self._alternatives(tops[k] if k < len(tops) else None, top_k)
        return events

    def _alternatives(self, top, k: int) -> list[tuple[int | None, str, float]] | None:
        """The upstream's top log-probs of one position as (id, text, log-prob), best first;
        an alternative whose text cannot be told (an id without a local tokenizer) is left out."""
        if not isinstance(top, dict):
            return None
        out = []
        for key, v in top.items():
            value, tid = _float(v), self._token_id(key)
            if value is None or not isinstance(key, str):
                continue
            if key.startswith("token_id:"):
                if tid is None or self.tokenizer is None:
                    continue
                key = self.tokenizer.decode([tid])
            out.append((tid, key, value))
        return sorted(out, key=lambda a: -a[2])[:k]

    def _token_id(self, tok) -> int | None:
        if isinstance(tok, str) and tok.startswith("token_id:"):
            try:
                tid = int(tok[9:])
            except ValueError:
                return None
            return tid if 0 <= tid < 2**32 else None
        if self.tokenizer is not None and isinstance(tok, str):
            ids = self.tokenizer.tok.encode(tok, add_special_tokens=False).ids
            if len(ids) == 1:
                return ids[0]
        return None

    # ------------------------------------------------------------------ scoring
    async def _echo(self, prompt, k: int) -> tuple[dict, int]:
        """Prompt log-probs (`echo`, no generation): the logprobs object and the prompt length."""
        data = await self._post({"model": self.model_name, "prompt": prompt, "max_tokens": 0, "echo": True,
                                 "logprobs": k, "temperature": 0.0, "return_tokens_as_token_ids": True})
        try:
            lp = data["choices"][0]["logprobs"]
            n = int((data.get("usage") or {}).get("prompt_tokens") or len(lp["tokens"]))
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"upstream {self.upstream} returned no prompt log-probs (echo unsupported?)") from exc
        if not lp or len(lp.get("tokens") or []) < n or len(lp.get("token_logprobs") or []) < n:
            raise EngineError(f"upstream {self.upstream} returned no prompt log-probs (echo unsupported?)")
        return lp, n

    async def _context_ids(self, prompt_ids: list[int]) -> list[int]:
        """The model's token ids for a prompt: exact with a tokenizer; else the prompt is text
        and the server names its tokens through `echo`."""
        if self.tokenizer is not None:
            return list(prompt_ids)
        if not self.server_ids:
            raise EngineError(f"upstream {self.upstream} does not name its tokens: scoring needs --tokenizer")
        lp, n = await self._echo(self.decode(prompt_ids), 0)
        ids = [self._token_id(t) for t in lp["tokens"][:n]]
        if any(t is None for t in ids):
            raise EngineError(f"upstream {self.upstream} did not name every prompt token")
        return ids

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Teacher-forced log-probs of `completion_ids` via `echo` (vLLM-style servers)."""
        if not completion_ids:
            return []
        ids = await self._context_ids(prompt_ids)
        lp, n = await self._echo(ids + list(completion_ids), 0)
        values = lp["token_logprobs"][len(ids):n]
        if len(values) != len(completion_ids) or any(v is None for v in values):
            raise EngineError(f"upstream {self.upstream} returned {len(values)} log-probs for "
                              f"{len(completion_ids)} tokens")
        return [float(v) for v in values]

    async def rescore(self, prompt_ids: list[int], claimed_ids: list[int], sampling):
        """A verifier's statistics from the upstream's top-K prompt log-probs (one prefill)."""
        from node_agent.rescoring import rescore_topk

        if not self.can_verify:
            raise EngineError(f"upstream {self.upstream} cannot verify (no echo log-probs by token id)")
        ids = await self._context_ids(prompt_ids)
        if not ids:
            raise EngineError("rescoring needs at least one prompt token")
        claimed = [int(t) for t in claimed_ids]
        vocab = self.vocab_size or max([UNKNOWN_VOCAB, *(t + 1 for t in claimed)])
        if not claimed:
            return rescore_topk([], [], sampling, vocab)
        lp, n = await self._echo(ids + claimed, self.rescore_top_k)
        tokens, values, tops = lp["tokens"], lp["token_logprobs"], lp.get("top_logprobs") or []
        if n != len(ids) + len(claimed) or [self._token_id(t) for t in tokens[len(ids):n]] != claimed:
            raise EngineError(f"upstream {self.upstream} did not score the claimed tokens as sent")
        top: list[dict[int, float]] = []
        for i in range(len(ids), n):
            seen = {}
            for key, v in ((tops[i] if i < len(tops) else None) or {}).items():
                tid = self._token_id(key)
                if tid is not None and _float(v) is not None:
                    seen[tid] = float(v)
            if values[i] is not None:
                seen[claimed[i - len(ids)]] = float(values[i])
            top.append(seen)
        try:
            result = rescore_topk(claimed, top, sampling, vocab)
        except ValueError as exc:
            raise EngineError(f"cannot rescore from the upstream's log-probs: {exc}") from exc
        result.meta["vocab_size"] = vocab
        return result


def _float(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) or f == -math.inf else None


def _raise_for(r: httpx.Response, body: str) -> None:
    if r.status_code < 400:
        return
    msg = body[:500]
    try:
        err = json.loads(body)
        msg = str((err.get("error") or {}).get("message") or err.get("detail") or err.get("message") or msg)
    except (ValueError, AttributeError):
        pass
    msg = " ".join(msg.split())  # one line
    if r.status_code in (400, 413, 422) and any(s in msg.lower() for s in _TOO_LONG):
        raise RequestTooLong(f"upstream: {msg}")
    raise EngineError(f"upstream returned HTTP {r.status_code}: {msg}")
