"""An engine that forwards to any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama).

    agora node --upstream http://127.0.0.1:8000/v1 --model NAME [--tokenizer /path/to/model]

Requests go to `POST {upstream}/completions` with `stream: true`. Per-token
log-probabilities are asked for (`logprobs: 1`, and vLLM's `return_tokens_as_token_ids`
so token ids come back exactly); servers that send none yield events with logprob 0.0 and
`logprobs_available` is set False on the engine, which the agent reports (such a node
cannot pass log-prob verification).

Tokens: with a local tokenizer folder (the model's tokenizer.json), encode/decode are
exact and prompts travel as token ids. Without one, text travels as text: `encode` maps
text to its UTF-8 bytes (a lossless stand-in that `decode` reverses), and real token counts
come from the server's `usage`, kept per request in `usage`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import AsyncIterator

import httpx

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent
from node_agent.errors import EngineError, RequestTooLong

_TOO_LONG = ("maximum context length", "context length", "too long", "context_length_exceeded")


class OpenAICompatEngine(Engine):
    def __init__(
        self,
        upstream: str,
        model: str | None = None,
        *,
        tokenizer_dir: str | Path | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.upstream = upstream.rstrip("/")
        self.model_name = model or ""
        self.device, self.dtype = "remote", "remote"
        self.logprobs_available = True
        self.usage: dict[str, dict] = {}
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self.tokenizer = None
        if tokenizer_dir is not None:
            from node_agent.engines.builtin.tokenizer import HFTokenizer

            self.tokenizer = HFTokenizer(Path(tokenizer_dir))

    # ------------------------------------------------------------------ lifecycle
    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, headers=self._headers, transport=self._transport)
        return self._client

    async def start(self) -> None:
        data = await self._get("/models")
        ids = [m.get("id") for m in data.get("data", [])]
        if not self.model_name:
            if not ids:
                raise EngineError(f"upstream {self.upstream} serves no models")
            self.model_name = ids[0]
        elif ids and self.model_name not in ids:
            raise EngineError(f"upstream {self.upstream} does not serve {self.model_name!r} (it serves {ids})")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
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

    def _prompt(self, ids: list[int]):
        return list(ids) if self.tokenizer else self.decode(ids)

    # ------------------------------------------------------------------ HTTP
    async def _get(self, path: str) -> dict:
        try:
            r = await self._http().get(self.upstream + path)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} unreachable: {exc!r}") from exc
        _raise_for(r, r.text)
        return r.json()

    async def _post(self, body: dict) -> dict:
        try:
            r = await self._http().post(self.upstream + "/completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} failed: {exc!r}") from exc
        _raise_for(r, r.text)
        return r.json()

    # ------------------------------------------------------------------ Engine API
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        sp = request.sampling
        remaining = sp.max_tokens - len(request.prefix_ids)
        if remaining <= 0:
            return
        body = {
            "model": self.model_name,
            "prompt": self._prompt(list(request.prompt_ids) + list(request.prefix_ids)),
            "max_tokens": remaining,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "stream": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
            "stream_options": {"include_usage": True},
        }
        if sp.top_k:
            body["top_k"] = sp.top_k
        if sp.seed is not None:
            body["seed"] = sp.seed
        if sp.stop:
            body["stop"] = list(sp.stop)
        if sp.ignore_eos:
            body["ignore_eos"] = True
        held: TokenEvent | None = None
        finish: str | None = None
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
                    if chunk.get("usage"):
                        self.usage[request.request_id] = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        for ev in self._events(choice):
                            if held is not None:
                                yield held
                            held = ev
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as exc:
            raise EngineError(f"upstream {self.upstream} failed mid-stream: {exc!r}") from exc
        except ValueError as exc:  # bad JSON in the stream
            raise EngineError(f"upstream {self.upstream} sent an unreadable stream: {exc}") from exc
        if held is not None:
            held.finish_reason = "length" if finish == "length" else "stop"
            yield held

    def _events(self, choice: dict) -> list[TokenEvent]:
        text = choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        tokens, logprobs = lp.get("tokens") or [], lp.get("token_logprobs") or []
        if not tokens:
            if not text:
                return []
            self.logprobs_available = False
            ids = self.encode(text) if self.tokenizer else [-1]
            return [TokenEvent(i, 0.0, text if k == len(ids) - 1 else "") for k, i in enumerate(ids)]
        events = []
        for k, (tok, logp) in enumerate(zip(tokens, logprobs)):
            events.append(TokenEvent(self._token_id(tok), float(logp or 0.0), text if k == len(tokens) - 1 else ""))
        return events

    def _token_id(self, tok: str) -> int:
        if tok.startswith("token_id:"):
            return int(tok[9:])
        if self.tokenizer is not None:
            ids = self.tokenizer.tok.encode(tok, add_special_tokens=False).ids
            if len(ids) == 1:
                return ids[0]
        return -1

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Teacher-forced log-probs via `echo` + `logprobs` with max_tokens 0 (vLLM). Needs
        exact token ids, so a local tokenizer folder."""
        if not completion_ids:
            return []
        if self.tokenizer is None:
            raise EngineError("scoring through an upstream needs a local tokenizer folder (--tokenizer)")
        data = await self._post({
            "model": self.model_name, "prompt": list(prompt_ids) + list(completion_ids),
            "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0,
        })
        try:
            lps = data["choices"][0]["logprobs"]["token_logprobs"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EngineError(f"upstream {self.upstream} returned no prompt log-probs (echo unsupported?)") from exc
        n = len(completion_ids)
        if lps is None or len(lps) < len(prompt_ids) + n:
            raise EngineError(f"upstream {self.upstream} returned {len(lps or [])} prompt log-probs, "
                              f"expected {len(prompt_ids) + n}")
        return [float(x) for x in lps[len(prompt_ids) : len(prompt_ids) + n]]


def _raise_for(r: httpx.Response, body: str) -> None:
    if r.status_code < 400:
        return
    msg = body[:500]
    try:
        err = json.loads(body)
        msg = str((err.get("error") or {}).get("message") or err.get("detail") or err.get("message") or msg)
    except (ValueError, AttributeError):
        pass
    if r.status_code in (400, 413, 422) and any(s in msg.lower() for s in _TOO_LONG):
        raise RequestTooLong(f"upstream: {msg}")
    raise EngineError(f"upstream returned HTTP {r.status_code}: {msg}")
