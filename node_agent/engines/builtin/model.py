"""A Llama-family decoder (Llama, Qwen2, Mistral) over a slot-based KV cache.

RMSNorm, rotary embeddings (rope_theta, "linear" and "llama3" scaling), grouped-query
attention, SwiGLU MLP; q/k/v and gate/up projections are fused into one matrix each.
The cache is pre-allocated: K and V each as `[layers, slots, kv_heads, max_len, head_dim]`;
request i of a decode batch always lives in slot i (the engine keeps slots compact), so
decode attention reads plain views of the cache. On CPU in float32, decode attention is the
fused kernel of native.py (it reads each (slot, kv head)'s K and V as two contiguous runs:
measured 2x faster than baddbmm/softmax/bmm once the cache is larger than the L3 cache);
elsewhere, or where it cannot be built, the torch path below.
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from node_agent.engines.builtin import native
from node_agent.engines.builtin.linear import Int8Linear, Linear
from node_agent.errors import ModelLoadError

SUPPORTED_TYPES = {"llama", "qwen2", "mistral"}
# Weight quantisations the model can apply at load time (None: the checkpoint's precision).
QUANTIZATIONS = (None, "int8")
# Tokens per row block in prefill (see LlamaModel.prefill).
PREFILL_ROWS = 512


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    model_type: str

    @classmethod
    def from_folder(cls, folder: Path) -> "LlamaConfig":
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read {folder / 'config.json'}: {exc}") from exc
        mtype = raw.get("model_type", "llama")
        if mtype not in SUPPORTED_TYPES:
            raise ModelLoadError(f"model_type {mtype!r} is not supported (supported: {sorted(SUPPORTED_TYPES)})")
        # transformers >= 5 writes rope settings as `rope_parameters`; older files as
        # `rope_theta` + `rope_scaling`.
        rope = dict(raw.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or raw.get("rope_theta", 10000.0)
        scaling = raw.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        try:
            heads = raw["num_attention_heads"]
            return cls(
                vocab_size=raw["vocab_size"],
                hidden_size=raw["hidden_size"],
                intermediate_size=raw["intermediate_size"],
                num_layers=raw["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=raw.get("num_key_value_heads") or heads,
                head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
                rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
                rope_theta=float(theta),
                rope_scaling=scaling,
                max_position_embeddings=raw.get("max_position_embeddings", 2048),
                tie_word_embeddings=raw.get("tie_word_embeddings", False),
                model_type=mtype,
            )
        except KeyError as exc:
            raise ModelLoadError(f"config.json in {folder} lacks {exc.args[0]!r}") from exc


def _rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / sc["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
        return torch.where(is_mid, mid, scaled).float()
    raise ModelLoadError(f"rope_scaling type {kind!r} is not supported")


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise ModelLoadError(f"cannot read weights {f}: {exc}") from exc
    return out


def _huge_zeros(shape, device, dtype) -> torch.Tensor:
    """A zeroed tensor; on Linux CPU, backed by transparent huge pages where the kernel allows
    them (madvise before the first touch). Decode reads the KV cache in many short runs and
    writes K with a stride of max_len: with 4 KiB pages nearly every access is a TLB miss."""
    t = torch.empty(shape, device=device, dtype=dtype)
    if t.device.type == "cpu" and sys.platform.startswith("linux") and t.nbytes >= 4 << 20:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            page = 2 << 20
            start = (t.data_ptr() + page - 1) // page * page
            end = (t.data_ptr() + t.nbytes) // page * page
            if end > start:
                libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 14)  # MADV_HUGEPAGE
        except (OSError, AttributeError):
            pass
    return t.zero_()


class Layer:
    def __init__(self, w: dict, p: str, cfg: LlamaConfig, dtype, device, quantization: str | None = None):
        def t(name):
            if name not in w:
                raise ModelLoadError(f"weight {name!r} is missing")
            return w[name]

        def opt(name):
            return w.get(name)

        def linear(names: list[str], biases: list | None = None):
            # q/k/v and gate/up fused into one matrix; int8: quantised per output channel
            # from the checkpoint's weights (in float32), so fusing does not change the scales
            b = torch.cat(biases, 0) if biases and all(x is not None for x in biases) else None
            if quantization == "int8":
                return Int8Linear(torch.cat([t(n) for n in names], 0), b, dtype=dtype, device=device)
            full = torch.cat([t(n) for n in names], 0).to(device=device, dtype=dtype).contiguous()
            return Linear(full, b.to(device=device, dtype=dtype).contiguous() if b is not None else None)

        self.ln1 = t(p + "input_layernorm.weight").to(device=device, dtype=dtype)
        self.ln2 = t(p + "post_attention_layernorm.weight").to(device=device, dtype=dtype)
        a = p + "self_attn."
        self.qkv = linear([a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                          [opt(a + f"{n}_proj.bias") for n in "qkv"])
        self.o = linear([a + "o_proj.weight"])
        m = p + "mlp."
        self.gate_up = linear([m + "gate_proj.weight", m + "up_proj.weight"])
        self.down = linear([m + "down_proj.weight"])

    def linears(self) -> list[Linear | Int8Linear]:
        return [self.qkv, self.o, self.gate_up, self.down]


class LlamaModel:
    """Weights plus the forward passes the engine needs; no nn.Module machinery."""

    def __init__(self, folder: Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 quantization: str | None = None):
        """`quantization` "int8": the attention and MLP projections' weights are quantised at
        load time (int8, one scale per output channel; see linear.Int8Linear); the embedding,
        norms and output head stay in `dtype`."""
        if quantization not in QUANTIZATIONS:
            raise ModelLoadError(f"quantization {quantization!r} is not supported (supported: int8)")
        self.cfg = cfg = LlamaConfig.from_folder(folder)
        self.device, self.dtype = torch.device(device), dtype
        self.quantization = quantization
        w = _load_tensors(folder)
        try:
            self.embed = w["model.embed_tokens.weight"].to(device=device, dtype=dtype)
            self.layers = [Layer(w, f"model.layers.{i}.", cfg, dtype, device, quantization) for i in range(cfg.num_layers)]
            self.norm = w["model.norm.weight"].to(device=device, dtype=dtype)
        except KeyError as exc:
            raise ModelLoadError(f"weight {exc.args[0]!r} is missing in {folder}") from exc
        head = w.get("lm_head.weight")
        if head is None or cfg.tie_word_embeddings:
            head = w["model.embed_tokens.weight"]
        self.lm_head = Linear(head.to(device=device, dtype=dtype).clone())
        self.inv_freq = _rope_inv_freq(cfg).to(device)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.kernels = native.load() if self.device.type == "cpu" and dtype == torch.float32 else None

    # ------------------------------------------------------------------ bookkeeping
    def weight_bytes(self) -> int:
        """Bytes of weights one decode step reads (the embedding lookup reads only one row
        per token, so the table is not counted; the output head is)."""
        n = self.lm_head.nbytes + self.norm.numel() * self.norm.element_size()
        for layer in self.layers:
            n += sum(lin.nbytes for lin in layer.linears())
            n += (layer.ln1.numel() + layer.ln2.numel()) * layer.ln1.element_size()
        return n

    def num_params(self) -> int:
        n = self.embed.numel() + self.norm.numel()
        if not self.cfg.tie_word_embeddings:
            n += self.lm_head.params
        for layer in self.layers:
            n += sum(lin.params for lin in layer.linears()) + layer.ln1.numel() + layer.ln2.numel()
        return n

    def allocate_cache(self, slots: int, max_len: int) -> None:
        c = self.cfg
        shape = (c.num_layers, slots, c.num_kv_heads, max_len, c.head_dim)
        self.k_cache = _huge_zeros(shape, self.device, self.dtype)
        self.v_cache = _huge_zeros(shape, self.device, self.dtype)
        self._rope_table = None
        self._rope_table = self._rope(torch.arange(max_len, device=self.device))  # cos, sin per position

    def move_slot(self, src: int, dst: int, length: int) -> None:
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]

    def read_blocks(self, slot: int, start: int, count: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions start .. start + count * block of `slot`, as `count` blocks:
        two tensors [count, layers, kv_heads, block, head_dim] (copies)."""
        c = self.cfg
        end = start + count * block

        def take(cache: torch.Tensor) -> torch.Tensor:
            run = cache[:, slot, :, start:end].reshape(c.num_layers, c.num_kv_heads, count, block, c.head_dim)
            return run.permute(2, 0, 1, 3, 4).contiguous()

        return take(self.k_cache), take(self.v_cache)

    def write_blocks(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0 .. count * block of `slot` from blocks as `read_blocks` returns them."""
        count, layers, kvh, block, hd = k.shape
        n = count * block
        self.k_cache[:, slot, :, :n] = k.permute(1, 2, 0, 3, 4).reshape(layers, kvh, n, hd)
        self.v_cache[:, slot, :, :n] = v.permute(1, 2, 0, 3, 4).reshape(layers, kvh, n, hd)

    # ------------------------------------------------------------------ pieces
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), w, self.cfg.rms_norm_eps)

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._rope_table
        if table is not None and int(pos.max()) < table[0].shape[0]:
            return table[0][pos], table[1][pos]
        freqs = pos.to(torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], -1)
        # sin with its first half negated: rotate_half(x) * sin == cat(x2, x1) * signed sin,
        # bit for bit (only signs move), one kernel less.
        sin = emb.sin()
        sin[:, : sin.shape[1] // 2].neg_()
        return emb.cos().to(self.dtype)[:, None, :], sin.to(self.dtype)[:, None, :]

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat([x[..., half:], x[..., :half]], -1)
        return (x * cos).add_(rot.mul_(signed_sin))

    def _qkv(self, layer: Layer, h: torch.Tensor, cos, sin):
        return self._split_qkv(layer.qkv(h), cos, sin)

    def _split_qkv(self, qkv: torch.Tensor, cos, sin):
        c = self.cfg
        n = qkv.shape[0]
        # q and k heads rotated together: one set of kernels per layer
        qk = self._apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, -1, c.head_dim), cos, sin)
        q, k = qk.split([c.num_heads, c.num_kv_heads], 1)
        return q, k, qkv[:, self.q_size + self.kv_size :].view(n, c.num_kv_heads, c.head_dim)

    def _mlp(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = layer.gate_up(x).chunk(2, -1)
        return layer.down(F.silu(gate) * up)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._rms(h, self.norm)).float()

    # ------------------------------------------------------------------ forward passes
    @torch.inference_mode()
    def prefill(self, chunks: list[tuple[int, list[int], int]]) -> torch.Tensor:
        """Run new tokens into the cache. Each chunk is (slot, token ids, start position);
        the cache of that slot must already hold positions < start. Returns the float32
        logits of each chunk's last token, shape [len(chunks), vocab]."""
        c = self.cfg
        ids = torch.tensor([t for _, toks, _ in chunks for t in toks], device=self.device)
        pos = torch.cat([torch.arange(s, s + len(toks)) for _, toks, s in chunks]).to(self.device)
        cos, sin = self._rope(pos)
        h = self.embed[ids]
        bounds, o = [], 0
        for slot, toks, start in chunks:
            bounds.append((slot, o, o + len(toks), start))
            o += len(toks)
        total = h.shape[0]
        last = torch.tensor([b - 1 for _, _, b, _ in bounds], device=self.device)
        q = torch.empty(total, c.num_heads, c.head_dim, device=self.device, dtype=self.dtype)
        k = torch.empty(total, c.num_kv_heads, c.head_dim, device=self.device, dtype=self.dtype)
        v = torch.empty_like(k)
        att = torch.empty_like(q)
        # CPU/float32: the native causal kernel over the slot cache, whatever each chunk's
        # start (3x torch's SDPA from position 0, ~10x SDPA with a mask after a cached
        # prefix or an earlier chunk); otherwise SDPA per chunk.
        pieces = [(slot, start, b - a) for slot, a, b, start in bounds]
        scale = 1.0 / math.sqrt(c.head_dim)
        for li, layer in enumerate(self.layers):
            # Row blocks of PREFILL_ROWS tokens for everything but attention: the block's
            # activations stay in cache (measured, 5k tokens of tiny-20m: the MLP 85 -> 54 ms).
            for a in range(0, total, PREFILL_ROWS):
                b = min(a + PREFILL_ROWS, total)
                q[a:b], k[a:b], v[a:b] = self._qkv(layer, self._rms(h[a:b], layer.ln1), cos[a:b], sin[a:b])
            for slot, a, b, start in bounds:
                self.k_cache[li, slot, :, start:start + b - a] = k[a:b].transpose(0, 1)
                self.v_cache[li, slot, :, start:start + b - a] = v[a:b].transpose(0, 1)
            packed = None
            if self.kernels is not None:
                packed = self.kernels.prefill_cache_attention(q, self.k_cache[li], self.v_cache[li], pieces, scale)
            if packed is not None:
                att = packed
            else:
                self._sdpa_prefill(li, q, k, v, bounds, att)
            if li == len(self.layers) - 1:
                # Only each chunk's last token goes on to the logits: the last layer's output
                # projection and MLP run for those rows alone.
                h = h[last] + layer.o(att[last].reshape(len(bounds), -1))
                return self.logits(h + self._mlp(layer, self._rms(h, layer.ln2)))
            for a in range(0, total, PREFILL_ROWS):
                b = min(a + PREFILL_ROWS, total)
                x = h[a:b] + layer.o(att[a:b].reshape(b - a, -1))
                h[a:b] = x + self._mlp(layer, self._rms(x, layer.ln2))
        raise ModelLoadError("the model has no layers")

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | None, positions: torch.Tensor | None,
             chunks: list[tuple[int, list[int], int]], groups: list[tuple[int, int, int]] | None = None
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One engine iteration: a decode step for slots 0..B-1 (as `decode`) and prompt
        chunks into other slots (as `prefill`); returns (decode logits [B, vocab], chunk
        logits [len(chunks), vocab]), None for a part with no rows.

        On the native path both run as one forward pass (Sarathi-style stall-free batching):
        every linear layer reads its weights once for the decode rows and the chunk rows
        together, and the pass's fixed costs are paid once, so a prompt chunk costs the
        streams in flight little more than its attention over its own earlier positions.
        Each row's attention is computed exactly as in `decode` and `prefill`."""
        if not chunks:
            return (self.decode(tokens, positions, groups) if tokens is not None else None), None
        if tokens is None or tokens.numel() == 0:
            return None, self.prefill(chunks)
        if self.kernels is None:  # the slots are disjoint: the two passes commute
            return self.decode(tokens, positions, groups), self.prefill(chunks)
        c = self.cfg
        b = tokens.shape[0]
        ids = torch.tensor([t for _, toks, _ in chunks for t in toks], device=self.device)
        cpos = torch.cat([torch.arange(st, st + len(toks)) for _, toks, st in chunks]).to(self.device)
        cos, sin = self._rope(torch.cat([positions, cpos]))
        h = self.embed[torch.cat([tokens, ids])]
        pieces, bounds, o = [], [], b
        for slot, toks, st in chunks:
            pieces.append((slot, st, len(toks)))
            bounds.append((slot, o, o + len(toks), st))
            o += len(toks)
        keep = torch.cat([torch.arange(b), torch.tensor([e - 1 for _, _, e, _ in bounds])]).to(self.device)
        scale = 1.0 / math.sqrt(c.head_dim)
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms(h, layer.ln1))
            dec = self.kernels.decode_attention(qkv[:b], cos[:b], sin[:b], positions, self.k_cache[li],
                                                self.v_cache[li], c.num_heads, scale)
            q, k, v = self._split_qkv(qkv[b:], cos[b:], sin[b:])
            for slot, a, e, st in bounds:
                self.k_cache[li, slot, :, st:st + e - a] = k[a - b:e - b].transpose(0, 1)
                self.v_cache[li, slot, :, st:st + e - a] = v[a - b:e - b].transpose(0, 1)
            q = q.contiguous()
            att = self.kernels.prefill_cache_attention(q, self.k_cache[li], self.v_cache[li], pieces, scale)
            if att is None:
                att = torch.empty_like(q)
                self._sdpa_prefill(li, q, k, v, [(s, a - b, e - b, st) for s, a, e, st in bounds], att)
            att = torch.cat([dec, att.reshape(o - b, -1)])
            if li == len(self.layers) - 1:
                x = h[keep] + layer.o(att[keep])
                out = self.logits(x + self._mlp(layer, self._rms(x, layer.ln2)))
                return out[:b], out[b:]
            h = h + layer.o(att)
            h = h + self._mlp(layer, self._rms(h, layer.ln2))
        raise ModelLoadError("the model has no layers")

    def _sdpa_prefill(self, li: int, q, k, v, bounds, att: torch.Tensor) -> None:
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        for slot, a, b, start in bounds:
            n = b - a
            # 4-D inputs: CPU SDPA takes its flash kernel (3-D ones fall back to math).
            if start == 0:
                kk, vv = k[None, a:b].transpose(1, 2), v[None, a:b].transpose(1, 2)
            else:
                kk = self.k_cache[li, slot, None, :, : start + n]
                vv = self.v_cache[li, slot, None, :, : start + n]
            qq = q[None, a:b].transpose(1, 2)
            if start == 0:
                out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=groups > 1)
            else:
                mask = torch.ones(n, start + n, dtype=torch.bool, device=self.device).tril(start)
                out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=groups > 1)
            att[a:b] = out[0].transpose(0, 1)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, groups: list[tuple[int, int, int]] | None = None
               ) -> torch.Tensor:
        """One decode step for slots 0..B-1: token i at position positions[i] in slot i.
        `groups` [(first row, end row, span)] lets attention read only `span` cache
        positions for those rows (rows sorted by length waste less); default: one group.
        Returns float32 logits [B, vocab]."""
        c = self.cfg
        b = tokens.shape[0]
        cos, sin = self._rope(positions)
        h = self.embed[tokens]
        g, hd = c.num_heads // c.num_kv_heads, c.head_dim
        scale = 1.0 / math.sqrt(hd)
        kernels = self.kernels
        attend = None if kernels is not None else self._torch_decode_attention(positions, groups)
        for li, layer in enumerate(self.layers):
            x = self._rms(h, layer.ln1)
            if kernels is not None:  # rotary embedding, cache write and attention in one call
                out = kernels.decode_attention(layer.qkv(x), cos, sin, positions, self.k_cache[li],
                                               self.v_cache[li], c.num_heads, scale)
            else:
                q, k, v = self._qkv(layer, x, cos, sin)
                out = attend(li, q.reshape(b, c.num_kv_heads, g, hd), k, v, scale)
            h = h + layer.o(out.reshape(b, -1))
            h = h + self._mlp(layer, self._rms(h, layer.ln2))
        return self.logits(h)

    def _torch_decode_attention(self, positions: torch.Tensor, groups: list[tuple[int, int, int]] | None):
        """Decode attention from torch kernels (CUDA, other dtypes, no C compiler): returns
        attend(layer, q [B, kv, g, hd], k, v [B, kv, hd], scale) -> [B, kv, g, hd], with the
        index and mask tensors built once per step."""
        c = self.cfg
        b = positions.shape[0]
        if groups is None:
            groups = [(0, b, int(positions.max()) + 1)]
        # Where the new K/V go in a layer's cache, flattened: index_copy_ there is ~100x cheaper
        # than advanced-index assignment on the 4-D view.
        kvh, hd, max_len = c.num_kv_heads, c.head_dim, self.v_cache.shape[3]
        sh = torch.arange(b, device=self.device)[:, None] * kvh + torch.arange(kvh, device=self.device)
        rows = (sh * max_len + positions[:, None]).reshape(-1)
        # Additive masks, one row per (slot, kv head): 0 up to the slot's position, -inf after.
        ar = torch.arange(groups[0][2], device=self.device)
        pos_rows = positions.repeat_interleave(kvh)
        masks = [torch.zeros((e - a) * kvh, 1, span, device=self.device, dtype=self.dtype).masked_fill_(
                 ar[None, None, :span] > pos_rows[a * kvh:e * kvh, None, None], float("-inf"))
                 for a, e, span in groups]
        g = c.num_heads // kvh

        def attend(li: int, q, k, v, scale: float) -> torch.Tensor:
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.view(-1, hd).index_copy_(0, rows, k.reshape(-1, hd))
            vc.view(-1, hd).index_copy_(0, rows, v.reshape(-1, hd))
            # The g query heads sharing a KV head act as g query rows of one head, so each
            # group's attention is three kernels that read each KV head once: mask + scale *
            # [rows*kv, g, hd] @ [rows*kv, span, hd]^T, softmax, [.., g, span] @ [.., span, hd].
            q = q.reshape(b * kvh, g, hd)
            out = torch.empty_like(q)
            for (a, e, span), mask in zip(groups, masks):
                n = (e - a) * kvh
                kt = kc[a:e, :, :span].reshape(n, span, hd).transpose(1, 2)
                s = torch.baddbmm(mask, q[a * kvh:e * kvh], kt, alpha=scale)
                torch.bmm(torch.softmax(s, -1), vc[a:e, :, :span].reshape(n, span, hd), out=out[a * kvh:e * kvh])
            return out.view(b, kvh, g, hd)

        return attend

    def permute_slots(self, order: list[int], span: int) -> None:
        """Slot i gets what slot order[i] held (first `span` positions of each)."""
        idx = torch.tensor(order, device=self.device)
        n = len(order)
        self.k_cache[:, :n, :, :span] = self.k_cache[:, idx, :, :span]
        self.v_cache[:, :n, :, :span] = self.v_cache[:, idx, :, :span]

    @torch.inference_mode()
    def forward_full(self, ids: list[int]) -> torch.Tensor:
        """Logits at every position of one sequence, without touching the cache (scoring)."""
        c = self.cfg
        t = torch.tensor(ids, device=self.device)
        cos, sin = self._rope(torch.arange(len(ids), device=self.device))
        h = self.embed[t]
        groups = c.num_heads // c.num_kv_heads
        for layer in self.layers:
            q, k, v = self._qkv(layer, self._rms(h, layer.ln1), cos, sin)
            out = None
            if self.kernels is not None:  # the prefill kernel, as for generation
                out = self.kernels.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), [len(ids)],
                                                     1.0 / math.sqrt(c.head_dim))
            if out is None:
                out = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                    is_causal=True, enable_gqa=groups > 1,
                )[0].transpose(0, 1)
            h = h + layer.o(out.reshape(len(ids), -1))
            h = h + self._mlp(layer, self._rms(h, layer.ln2))
        return self.logits(h)
