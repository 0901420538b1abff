"""A minimal, fast OpenAI-compatible server: the upstream behind `agora node --engine openai`
in tests, and the direct baseline of the proxy-overhead benchmark.

    python bench/upstream.py --port 8011 --mode ids --model tiny
    python bench/upstream.py --port 8011 --fixed            # canned answers, no engine
    python bench/upstream.py --fixed --mode text            # ... and no log-probs or ids (bench/overhead.py)

Serves `GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions` (stream and
not, `stream_options.include_usage`, `usage`) from the built-in engine on a generated tiny
model, so text and log-probs are real and a verifier can check them. `--mode` says what
kind of server it imitates, which is what the node agent must cope with:

- `ids` (vLLM): per-token `logprobs`, tokens named `token_id:N` when the request sends
  `return_tokens_as_token_ids`; `echo` with `max_tokens` 0 returns the prompt's log-probs
  and `top_logprobs` (how an OpenAI-compatible seller verifies others' jobs).
- `tokens`: log-probs with token strings only (no ids, whatever the request asks).
- `text`: no log-probs at all; `echo` ignored; chunks that add no text are not sent (their
  tokens appear only in `usage`), like servers that stream text deltas.

HTTP is a few lines of asyncio (keep-alive, Content-Length bodies, chunked SSE): no web
framework, so the server's own cost per request stays far below a relay's (the benchmark
measures the relay, not this). `--fixed` answers without any engine (torch is never
imported): the same canned tokens every time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

MODES = ("ids", "tokens", "text")
FIXED_PIECES = ["Hello", ",", " this", " is", " a", " canned", " answer", " from", " the", " fixed",
                " upstream", ".", " It", " costs", " almost", " nothing", "."]
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class FixedBackend:
    """Canned tokens (ids 3, 4, ..., log-prob -0.25 each): no engine, no model; `delay_s`
    between tokens."""

    dtype, vocab_size, max_seq_len = None, 512, 1 << 20

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s

    def encode(self, text: str) -> list[int]:
        return [3] * max(1, math.ceil(len(text.encode()) / 4))

    def name(self, tid: int) -> str:
        return FIXED_PIECES[(tid - 3) % len(FIXED_PIECES)]

    def render_chat(self, messages: list[dict]) -> str:
        return "".join(str(m.get("content") or "") for m in messages)

    async def generate(self, ids: list[int], body: dict):
        n = min(int(body.get("max_tokens") or 16), len(FIXED_PIECES))
        for i in range(n):
            if self.delay_s and i:
                await asyncio.sleep(self.delay_s)
            yield 3 + i, -0.25, FIXED_PIECES[i], ("length" if i == n - 1 else None)

    async def prompt_logprobs(self, ids: list[int], k: int):
        raise HTTPError(400, "echo is not supported by the fixed upstream")


class EngineBackend:
    """The built-in engine on a (generated) model folder."""

    def __init__(self, model: str, max_batch: int, max_seq_len: int, threads: int):
        import torch

        from node_agent.engines.builtin import load_builtin_engine

        torch.set_num_threads(threads)  # a tiny model gains nothing from more; tests run several of these

        self.engine = load_builtin_engine(model, max_batch=max_batch, max_seq_len=max_seq_len)
        self.dtype, self.max_seq_len = self.engine.dtype, self.engine.max_seq_len
        self.vocab_size = self.engine.model.cfg.vocab_size
        self.encode, self.render_chat = self.engine.encode, self.engine.render_chat

    def name(self, tid: int) -> str:
        return self.engine.decode([tid])

    async def generate(self, ids: list[int], body: dict):
        from node_agent.engines.base import GenerationRequest, SamplingParams

        stop = body.get("stop") or []
        sp = SamplingParams(max_tokens=int(body.get("max_tokens") or 16), temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)), top_k=max(int(body.get("top_k") or 0), 0),
                            seed=body.get("seed"), stop=[stop] if isinstance(stop, str) else list(stop),
                            ignore_eos=bool(body.get("ignore_eos")))
        async for ev in self.engine.generate(GenerationRequest(uuid.uuid4().hex, ids, sp)):
            yield ev.token_id, ev.logprob, ev.text, ev.finish_reason

    async def prompt_logprobs(self, ids: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Per prompt position: (log-prob of the prompt token, top-k (id, log-prob)); None first."""
        import torch

        model = self.engine.model

        def job():
            logp = torch.log_softmax(model.forward_full(ids)[:-1].float(), -1)
            top = torch.topk(logp, max(k, 1), -1) if k > 0 else None
            out: list = [None]
            for i in range(1, len(ids)):
                pairs = list(zip(top.indices[i - 1].tolist(), top.values[i - 1].tolist())) if top is not None else []
                out.append((float(logp[i - 1, ids[i]]), pairs))
            return out

        return await self.engine.call(job)


class Upstream:
    def __init__(self, backend, model: str, mode: str):
        self.backend, self.model, self.mode = backend, model, mode

    # ---------------------------------------------------------------- routes
    async def handle(self, method: str, path: str, body: bytes, out: Responder) -> None:
        path = path.split("?", 1)[0].rstrip("/")
        try:
            if path in ("/v1/models", "/models") and method == "GET":
                return await out.json(200, self.models())
            if path in ("/health", "/healthz"):
                return await out.json(200, {"ok": True})
            chat = path.endswith("/chat/completions")
            if path.endswith("/completions") and method == "POST":
                try:
                    req = json.loads(body or b"{}")
                except ValueError as exc:
                    raise HTTPError(400, f"invalid JSON: {exc}") from None
                return await self.complete(req, chat, out)
            raise HTTPError(404 if method in ("GET", "POST") else 405, f"no route {method} {path}")
        except Exception as exc:  # noqa: BLE001 - every failure is an OpenAI-style error, never a dropped socket
            status = exc.status if isinstance(exc, HTTPError) else 500
            err = {"error": {"message": str(exc), "type": "BadRequestError" if status < 500 else "InternalServerError",
                             "code": status}}
            if not out.started:
                return await out.json(status, err)
            await out.event(err)  # mid-stream: an error event, then the end of the stream
            await out.end_sse()

    def models(self) -> dict:
        entry = {"id": self.model, "object": "model", "created": 0, "owned_by": "agora-bench",
                 "max_model_len": self.backend.max_seq_len, "vocab_size": self.backend.vocab_size}
        if self.backend.dtype:
            entry["dtype"] = self.backend.dtype
        return {"object": "list", "data": [entry]}

    async def complete(self, req: dict, chat: bool, out: Responder) -> None:
        if req.get("model", self.model) != self.model:
            raise HTTPError(404, f"The model `{req.get('model')}` does not exist.")
        ids, prompt_text = self._prompt(req, chat)
        max_tokens = int(req.get("max_tokens") if req.get("max_tokens") is not None else 16)
        if len(ids) + max_tokens > self.backend.max_seq_len:
            raise HTTPError(400, f"This model's maximum context length is {self.backend.max_seq_len} tokens. "
                                 f"However, you requested {len(ids) + max_tokens} tokens.")
        lp_k = (int(req.get("top_logprobs") or 0) if req.get("logprobs") else None) if chat else req.get("logprobs")
        lp_k = None if self.mode == "text" or lp_k is None else int(lp_k)
        as_ids = self.mode == "ids" and bool(req.get("return_tokens_as_token_ids"))
        echo = bool(req.get("echo")) and not chat and self.mode != "text"
        if max_tokens < (0 if echo else 1):
            raise HTTPError(400, "max_tokens must be at least 1")
        name = (lambda t: f"token_id:{t}") if as_ids else self.backend.name
        rid, created = f"cmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": self.model}
        pre_text, pre_lp = "", None
        if echo:
            pre_text = prompt_text
            if lp_k is not None:
                pre_lp = await self._echo_logprobs(ids, lp_k, name)
        events = self.backend.generate(ids, dict(req, max_tokens=max_tokens)) if max_tokens else _nothing()
        usage = {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
        if req.get("stream"):
            await out.start_sse()
            if echo:
                await out.event({**head, "choices": [{"index": 0, "text": pre_text, "logprobs": pre_lp,
                                                      "finish_reason": None if max_tokens else "length"}]})
            async for tid, lp, text, finish in events:
                usage["completion_tokens"] += 1
                if self.mode == "text" and not text and not finish:
                    continue
                choice = self._choice(chat, True, [(tid, lp)], text, lp_k, name, finish)
                await out.event({**head, "choices": [choice]})
            if (req.get("stream_options") or {}).get("include_usage"):
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                await out.event({**head, "choices": [], "usage": usage})
            return await out.end_sse()
        toks, texts, finish = [], [], "length"
        async for tid, lp, text, fin in events:
            toks.append((tid, lp))
            texts.append(text)
            finish = fin or finish
        usage["completion_tokens"] = len(toks)
        usage["total_tokens"] = usage["prompt_tokens"] + len(toks)
        choice = self._choice(chat, False, toks, "".join(texts), lp_k, name, finish)
        if echo:
            choice["text"] = pre_text + choice["text"]
            if pre_lp is not None:
                choice["logprobs"] = {k: pre_lp[k] + ((choice["logprobs"] or {}).get(k) or []) for k in pre_lp}
        await out.json(200, {**head, "object": "chat.completion" if chat else "text_completion",
                             "choices": [choice], "usage": usage})

    # ---------------------------------------------------------------- pieces
    def _prompt(self, req: dict, chat: bool) -> tuple[list[int], str]:
        if chat:
            msgs = req.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise HTTPError(400, "messages must be a non-empty list")
            text = self.backend.render_chat([{"role": m.get("role"), "content": _content(m)} for m in msgs])
            return self.backend.encode(text), text
        p = req.get("prompt", "")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, list) and all(isinstance(t, int) and 0 <= t < self.backend.vocab_size for t in p) and p:
            return list(p), "".join(self.backend.name(t) for t in p)
        if not isinstance(p, str) or not p:
            raise HTTPError(400, "prompt must be a non-empty string or a list of token ids")
        return self.backend.encode(p), p

    async def _echo_logprobs(self, ids: list[int], k: int, name) -> dict:
        rows = await self.backend.prompt_logprobs(ids, k)
        tops = [None]
        for tid, row in zip(ids[1:], rows[1:]):
            d = {name(t): lp for t, lp in row[1]}
            d[name(tid)] = row[0]
            tops.append(d)
        return {"tokens": [name(t) for t in ids], "token_logprobs": [None] + [r[0] for r in rows[1:]],
                "top_logprobs": tops, "text_offset": [0] * len(ids)}

    def _choice(self, chat: bool, stream: bool, toks: list, text: str, lp_k, name, finish) -> dict:
        lp = None
        if lp_k is not None:
            names = [name(t) for t, _ in toks]
            if chat:
                lp = {"content": [{"token": n, "logprob": v, "bytes": list(n.encode()),
                                   "top_logprobs": [{"token": n, "logprob": v}] if lp_k else []}
                                  for n, (_, v) in zip(names, toks)]}
            else:
                lp = {"tokens": names, "token_logprobs": [v for _, v in toks],
                      "top_logprobs": [{n: v} for n, (_, v) in zip(names, toks)] if lp_k else None,
                      "text_offset": [0] * len(toks)}
        if chat:
            return {"index": 0, ("delta" if stream else "message"): {"role": "assistant", "content": text},
                    "logprobs": lp, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}


def _content(m: dict) -> str:
    c = m.get("content")
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in c if isinstance(p, dict))
    return c or ""


async def _nothing():
    for _ in ():  # an empty async generator (echo with max_tokens 0)
        yield


class Responder:
    """Writes one HTTP/1.1 response: a JSON body, or SSE events in chunked encoding."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.w, self.started = writer, False

    async def json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.w.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        await self.w.drain()

    async def start_sse(self) -> None:
        self.started = True
        self.w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")

    async def event(self, obj) -> None:
        await self._chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    async def end_sse(self) -> None:
        await self._chunk(b"data: [DONE]\n\n")
        self.w.write(b"0\r\n\r\n")
        await self.w.drain()

    async def _chunk(self, data: bytes) -> None:
        self.w.write(b"%x\r\n%s\r\n" % (len(data), data))
        await self.w.drain()


async def serve_connection(app: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ", 2)[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(headers.get("content-length") or 0))
            await app.handle(method, target, body, Responder(writer))
            if headers.get("connection", "").lower() == "close":
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        writer.close()


async def run(args: argparse.Namespace) -> None:
    backend = FixedBackend(args.delay_ms / 1000) if args.fixed else EngineBackend(args.model, args.max_batch, args.max_seq_len, args.threads)
    if not args.fixed:
        await backend.engine.start()
    app = Upstream(backend, args.served_name or args.model, args.mode)
    server = await asyncio.start_server(lambda r, w: serve_connection(app, r, w), args.host, args.port,
                                        reuse_address=True, limit=1 << 24)
    port = server.sockets[0].getsockname()[1]
    print(f"upstream ({'fixed' if args.fixed else args.mode}) on http://{args.host}:{port}/v1", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--mode", choices=MODES, default="ids")
    p.add_argument("--model", default="tiny", help="tiny preset or model folder (served under this name)")
    p.add_argument("--served-name", help="the model id clients ask for (default: --model)")
    p.add_argument("--fixed", action="store_true", help="canned answers, no engine (overhead benchmarks)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="between tokens (--fixed)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    args = p.parse_args(argv)
    try:
        asyncio.run(run(args))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
