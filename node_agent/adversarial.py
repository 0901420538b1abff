"""TEST TOOL — adversarial node modes. Never use these to serve real buyers.

Engines that cheat in the ways an open market invites, so tests, the simulator and
`bench/verify.py` can show that verification catches them:

- `other_model`: serves another model (another seed, or a smaller preset) under the
  claimed name; claims that model's own log-probs.
- `noise`: the claimed model with 1% Gaussian noise (of each weight tensor's standard
  deviation) added to its linear weights — a checkpoint someone "fine-tuned" or corrupted.
- `int4` / `int8`: serves the claimed model with its linear weights quantised per group
  (round-to-nearest with a zero point), claims the quantised model's log-probs. int8 sits
  close to bf16's own rounding noise: it is a measurement, not a detection target.
- `random` / `random_plausible` / `random_oracle`: returns random tokens, claiming random
  log-probs, honest-looking ones (drawn like a peaked model's), or exactly the reference
  model's log-probs of those random tokens (the strongest forger: log-prob comparison alone
  cannot see it; the likelihood of the tokens can).
- `truncate`: stops after part of the requested tokens, ends with an end-of-sequence token
  claimed at an honest-looking log-prob and finish "stop".
- `cheat_then_stall`: streams honest-looking random tokens for half the requested tokens,
  then stalls (never finishes, keeps the connection): the coordinator fails the request over
  to another node and pays this one for its segment, so the segment must be audited.

Agent-level modes (the node agent wires them; they change receipts and adverts, not tokens)
are plain data in `AGENT_MODES`: inflated token counts, replayed receipts, over-claimed
tok/s.

All engines keep the claimed `model_name`; the private copies never touch the real engine's
files or the model cache.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import AsyncIterator

import torch

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent

STREAM_MODES = ("cheat_then_stall",)  # never finish a job: exercised through the market, not the bench
ENGINE_MODES = ("other_model", "smaller_model", "int4", "int8", "noise", "random", "random_plausible",
                "random_oracle", "truncate") + STREAM_MODES
# Near bf16's own rounding noise: a node declaring bf16 passes single audits with these, and
# the evidence across its audits (scheduler/evidence.py) is what catches it.
PRECISION_MODES = ("int8", "noise")
DETECTION_TARGETS = tuple(m for m in ENGINE_MODES if m not in PRECISION_MODES + STREAM_MODES)


@dataclass(frozen=True)
class AgentMode:
    """A cheat at the agent level (receipts and adverts), for the node agent's test flag."""

    name: str
    description: str
    factor: float
    caught_by: str


AGENT_MODES: dict[str, AgentMode] = {
    "inflate_tokens": AgentMode(
        "inflate_tokens", "receipt claims completion_tokens = factor x tokens actually streamed", 1.5,
        "settlement counts relayed tokens; receipt count must equal the committed token list",
    ),
    "replay_receipt": AgentMode(
        "replay_receipt", "re-sends an earlier signed receipt (same nonce/commitment) for a new request", 1.0,
        "nonce already seen / request id mismatch / commitment of another token stream",
    ),
    "overclaim_tps": AgentMode(
        "overclaim_tps", "advertises factor x its benchmarked tokens_per_s at registration", 3.0,
        "coordinator's own EWMA of relayed tok/s and canary requests (claim ratio)",
    ),
    "overbill_prompt": AgentMode(
        "overbill_prompt", "receipt claims factor x the prompt tokens its tokenizer counted (plus 5)", 3.0,
        "the verifier counts the prompt again in every audit (prompt_overbilled)",
    ),
}


# ---------------------------------------------------------------- quantised weights
def quantize_groupwise(w: torch.Tensor, bits: int, group_size: int = 64) -> torch.Tensor:
    """Round-to-nearest asymmetric quantisation per group of `group_size` input columns;
    returns the de-quantised float tensor (what a quantised kernel effectively multiplies by)."""
    out_f, in_f = w.shape
    g = group_size if in_f % group_size == 0 else in_f
    x = w.float().reshape(out_f, in_f // g, g)
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return ((q - zero) * scale).reshape(out_f, in_f).to(w.dtype)


def quantize_engine_weights(engine, bits: int, group_size: int = 64) -> None:
    """Replace a private built-in engine's linear layers (not the output head) by quantised
    copies, reading the original weights from its folder. Call before `start()`."""
    tamper_engine_weights(engine, lambda full: quantize_groupwise(full, bits, group_size))


def add_weight_noise(engine, relative: float = 0.01, seed: int = 0) -> None:
    """Perturb every linear layer's weights by Gaussian noise of `relative` x the tensor's
    own standard deviation (a "1% noise" checkpoint). Call before `start()`."""
    gen = torch.Generator().manual_seed(seed)
    tamper_engine_weights(engine, lambda full: full + relative * full.std() * torch.randn(full.shape, generator=gen))


def tamper_engine_weights(engine, fn) -> None:
    """Replace a private built-in engine's linear layers (not the output head) by `fn` of
    the original float32 weights read from its folder (q, k, v and gate, up fused)."""
    from safetensors.torch import load_file

    from node_agent.engines.builtin.linear import Linear

    w: dict[str, torch.Tensor] = {}
    for f in sorted(engine.model_dir.glob("*.safetensors")):
        w.update(load_file(str(f)))
    model = engine.model
    dev, dt = model.device, model.dtype

    def q(*names):
        full = torch.cat([w[n] for n in names], 0).float()
        return fn(full).to(device=dev, dtype=dt).contiguous()

    for i, layer in enumerate(model.layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        layer.qkv = Linear(q(a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), layer.qkv.bias)
        layer.o = Linear(q(a + "o_proj.weight"), layer.o.bias)
        layer.gate_up = Linear(q(m + "gate_proj.weight", m + "up_proj.weight"), layer.gate_up.bias)
        layer.down = Linear(q(m + "down_proj.weight"), layer.down.bias)


# ---------------------------------------------------------------- wrappers
class _Wrapper(Engine):
    def __init__(self, inner: Engine, model_name: str | None = None):
        self.inner = inner
        self.model_name = model_name or inner.model_name

    def encode(self, text):
        return self.inner.encode(text)

    def decode(self, ids):
        return self.inner.decode(ids)

    def render_chat(self, messages):
        return self.inner.render_chat(messages)

    async def score(self, prompt_ids, completion_ids):
        return await self.inner.score(prompt_ids, completion_ids)

    async def start(self):
        await self.inner.start()

    async def close(self):
        await self.inner.close()


class RandomTokenEngine(_Wrapper):
    """TEST TOOL: random non-special tokens, max_tokens of them, finish "length".
    claim: "random" (log-probs uniform in [-12, 0]), "plausible" (drawn like a peaked
    model's: -Exponential(mean 2)), "oracle" (the inner model's exact teacher-forced
    log-probs of the random tokens)."""

    def __init__(self, inner: Engine, claim: str = "random", seed: int = 0, vocab_size: int | None = None,
                 first_id: int = 3, model_name: str | None = None):
        super().__init__(inner, model_name)
        if claim not in ("random", "plausible", "oracle"):
            raise ValueError(f"unknown claim style {claim!r}")
        self.claim = claim
        self.rng = random.Random(seed)
        self.first_id = first_id
        self.vocab_size = vocab_size or getattr(getattr(getattr(inner, "model", None), "cfg", None), "vocab_size", 512)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        n = max(request.sampling.max_tokens - len(request.prefix_ids), 0)
        ids = [self.rng.randrange(self.first_id, self.vocab_size) for _ in range(n)]
        if self.claim == "oracle":
            lps = await self.inner.score(list(request.prompt_ids) + list(request.prefix_ids), ids)
        elif self.claim == "plausible":
            lps = [-min(self.rng.expovariate(0.5), 15.0) for _ in ids]
        else:
            lps = [-self.rng.uniform(0.0, 12.0) for _ in ids]
        for i, (t, lp) in enumerate(zip(ids, lps)):
            yield TokenEvent(t, float(lp), self.decode([t]), "length" if i == n - 1 else None)


class TruncatingEngine(_Wrapper):
    """TEST TOOL: passes through the first `keep_fraction` of max_tokens, then emits an
    end-of-sequence token claimed at `eos_logprob` and finishes with "stop"."""

    def __init__(self, inner: Engine, eos_id: int = 2, keep_fraction: float = 0.5, eos_logprob: float = -0.7,
                 model_name: str | None = None):
        super().__init__(inner, model_name)
        self.eos_id, self.keep_fraction, self.eos_logprob = eos_id, keep_fraction, eos_logprob

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        keep = max(int(request.sampling.max_tokens * self.keep_fraction) - 1, 0)
        emitted = 0
        agen = self.inner.generate(request)
        try:
            async for ev in agen:
                if ev.finish_reason or emitted >= keep:
                    if ev.finish_reason and emitted < keep:  # finished honestly first
                        yield ev
                        return
                    break
                yield ev
                emitted += 1
        finally:
            await agen.aclose()
        yield TokenEvent(self.eos_id, self.eos_logprob, "", "stop")


class StallingEngine(_Wrapper):
    """TEST TOOL: passes through the first `keep_fraction` of max_tokens, then stalls until
    cancelled (a node that goes silent mid-stream, keeping its connection). The node's own
    start-up benchmark is left alone."""

    def __init__(self, inner: Engine, keep_fraction: float = 0.5, model_name: str | None = None):
        super().__init__(inner, model_name)
        self.keep_fraction = keep_fraction

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        agen = self.inner.generate(request)
        if request.request_id.startswith("bench-"):  # its own speed benchmark runs through
            async for ev in agen:
                yield ev
            return
        keep = max(int(request.sampling.max_tokens * self.keep_fraction), 1)
        try:
            emitted = 0
            async for ev in agen:
                if emitted >= keep:
                    break
                yield ev if not ev.finish_reason else TokenEvent(ev.token_id, ev.logprob, ev.text, None)
                emitted += 1
        finally:
            await agen.aclose()
        await asyncio.Event().wait()  # silent until the coordinator cancels the job
        yield TokenEvent(0, 0.0, "", "stop")  # never reached


# ---------------------------------------------------------------- factories
def make_adversarial_engine(mode: str, model: str = "tiny", *, dtype: str = "float32", max_batch: int = 32,
                            seed: int = 0, cache_dir=None, **kw) -> Engine:
    """TEST TOOL: an engine that cheats in `mode` while claiming to serve `model`.

    other_model: `model@seed=<seed+7>` (or `kw["actual"]`); smaller_model: the "tiny" preset
    (or `kw["actual"]`) under a larger preset's name; int4/int8: `kw["group_size"]` (64)."""
    from node_agent.engines.builtin import load_builtin_engine

    base = model.split("@")[0]
    if mode in ("other_model", "smaller_model"):
        if mode == "other_model":
            actual = kw.get("actual", f"{base}@seed={seed + 7}")
        else:
            actual = kw.get("actual", "tiny" if base != "tiny" else "tiny@seed=1")
        eng = load_builtin_engine(actual, dtype=dtype, max_batch=max_batch, cache_dir=cache_dir)
        eng.model_name = model
        return eng
    honest = load_builtin_engine(model, dtype=dtype, max_batch=max_batch, cache_dir=cache_dir)
    if mode in ("int4", "int8"):
        quantize_engine_weights(honest, 4 if mode == "int4" else 8, kw.get("group_size", 64))
        return honest
    if mode == "noise":
        add_weight_noise(honest, kw.get("relative", 0.01), seed)
        return honest
    if mode.startswith("random"):
        claim = {"random": "random", "random_plausible": "plausible", "random_oracle": "oracle"}[mode]
        return RandomTokenEngine(honest, claim=claim, seed=seed)
    if mode == "cheat_then_stall":
        return StallingEngine(RandomTokenEngine(honest, claim="plausible", seed=seed), kw.get("keep_fraction", 0.5))
    if mode == "truncate":
        eos = min(honest.eos_ids) if honest.eos_ids else 2
        return TruncatingEngine(honest, eos_id=eos, keep_fraction=kw.get("keep_fraction", 0.5))
    raise ValueError(f"unknown adversarial mode {mode!r}; known: {ENGINE_MODES + tuple(AGENT_MODES)}")
