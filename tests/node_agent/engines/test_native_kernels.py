"""The compiled attention kernels (decode, causal prefill) against the torch paths they
replace, and the fallback when they cannot be built."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from node_agent.engines.builtin import native
from node_agent.engines.builtin.model import LlamaModel
from node_agent.tiny_model import generate_tiny_model

kernels = native.load()
needs_kernel = pytest.mark.skipif(kernels is None, reason="no C compiler here: the torch path is used")


def rotate(x, cos, ssin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], -1) * ssin


def reference(qkv, cos, ssin, pos, kc, vc, heads, scale):
    """Rotary embedding, K/V written at pos, plain attention over positions 0..pos."""
    rows, kvh, hd = qkv.shape[0], kc.shape[1], kc.shape[3]
    q, k, v = qkv.view(rows, -1, hd).split([heads, kvh, kvh], 1)
    q, k = rotate(q, cos[:, None], ssin[:, None]), rotate(k, cos[:, None], ssin[:, None])
    kc, vc = kc.clone(), vc.clone()
    out = torch.empty(rows, heads, hd)
    for b, p in enumerate(pos.tolist()):
        kc[b, :, p], vc[b, :, p] = k[b], v[b]
        keys = kc[b, :, : p + 1].repeat_interleave(heads // kvh, 0)  # [heads, n, hd]
        vals = vc[b, :, : p + 1].repeat_interleave(heads // kvh, 0)
        att = torch.softmax(torch.einsum("hd,hnd->hn", q[b], keys) * scale, -1)
        out[b] = torch.einsum("hn,hnd->hd", att, vals)
    return out.reshape(rows, -1), kc, vc


@needs_kernel
@pytest.mark.parametrize("heads,kvh,hd", [(4, 2, 32), (4, 4, 64), (4, 1, 48), (2, 1, 8)])
def test_kernel_matches_reference_and_writes_the_cache(heads, kvh, hd):
    torch.manual_seed(heads * 10 + hd)
    rows, slots, max_len = 5, 7, 300
    qkv = torch.randn(rows, (heads + 2 * kvh) * hd)
    angle = torch.rand(rows, hd) * 6
    cos, ssin = angle.cos(), angle.sin()
    ssin[:, : hd // 2].neg_()
    kc, vc = torch.randn(slots, kvh, max_len, hd), torch.randn(slots, kvh, max_len, hd)
    pos = torch.tensor([299, 0, 17, 150, 63])  # lengths 1..max_len, unsorted, not multiples of 16
    scale = 1 / math.sqrt(hd)
    ref, ref_kc, ref_vc = reference(qkv, cos, ssin, pos, kc, vc, heads, scale)
    out = kernels.decode_attention(qkv, cos, ssin, pos, kc, vc, heads, scale)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(kc, ref_kc, atol=1e-6) and torch.equal(vc, ref_vc)  # slots >= rows untouched too


@needs_kernel
@pytest.mark.parametrize("heads,kvh,hd", [(8, 4, 64), (4, 4, 32), (6, 2, 48)])
def test_prefill_kernel_matches_sdpa(heads, kvh, hd):
    torch.manual_seed(heads + hd)
    lengths = [1, 15, 16, 17, 100, 3]  # block edges and a one-token prompt
    n = sum(lengths)
    q, k, v = torch.randn(n, heads, hd), torch.randn(n, kvh, hd), torch.randn(n, kvh, hd)
    out = kernels.prefill_attention(q, k, v, lengths, 1 / math.sqrt(hd))
    if out is None:  # the kernel declines without AVX-512 and the engine's torch path serves
        assert "avx512f" not in open("/proc/cpuinfo").read()
        pytest.skip("the prefill kernel needs AVX-512, which this CPU lacks")
    a = 0
    for length in lengths:
        t = lambda x: x[None, a:a + length].transpose(1, 2)  # noqa: E731
        ref = F.scaled_dot_product_attention(t(q), t(k), t(v), is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        assert torch.allclose(out[a:a + length], ref, atol=2e-5, rtol=1e-4), length
        a += length


@needs_kernel
def test_portable_build_without_avx512(tmp_path):
    """The plain-C paths a CPU without AVX-512 gets: same results; prefill declines."""
    portable = native.Kernels(native.build(cache_dir=tmp_path, extra_flags=("-mno-avx512f",)))
    torch.manual_seed(7)
    heads, kvh, hd, rows = 4, 2, 64, 3
    qkv = torch.randn(rows, (heads + 2 * kvh) * hd)
    angle = torch.rand(rows, hd)
    cos, ssin = angle.cos(), angle.sin()
    kc, vc = torch.randn(rows, kvh, 80, hd), torch.randn(rows, kvh, 80, hd)
    pos = torch.tensor([79, 33, 0])
    ref, _, _ = reference(qkv, cos, ssin, pos, kc, vc, heads, 0.125)
    assert torch.allclose(portable.decode_attention(qkv, cos, ssin, pos, kc, vc, heads, 0.125), ref, atol=2e-5)
    q = torch.randn(4, heads, hd)
    assert portable.prefill_attention(q, qkv[:1].new_zeros(4, kvh, hd), q.new_zeros(4, kvh, hd), [4], 0.1) is None


@needs_kernel
def test_prefill_kernel_declines_odd_head_sizes():
    q, k = torch.randn(5, 2, 24), torch.randn(5, 1, 24)
    assert kernels.prefill_attention(q, k, k, [5], 0.2) is None  # the model then uses SDPA


@needs_kernel
def test_kernel_refuses_bad_input():
    qkv, rope = torch.zeros(1, 3 * 8), torch.zeros(1, 8)
    kc = torch.zeros(1, 1, 16, 8)
    with pytest.raises(TypeError):
        kernels.decode_attention(qkv.double(), rope, rope, torch.tensor([0]), kc, kc.clone(), 1, 1.0)
    with pytest.raises(ValueError, match="cache length"):
        kernels.decode_attention(qkv, rope, rope, torch.tensor([16]), kc, kc.clone(), 1, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.decode_attention(qkv, rope, rope, torch.tensor([0]), kc, kc.clone(), 2, 1.0)
    with pytest.raises(ValueError, match="disagree"):
        kernels.prefill_attention(torch.zeros(4, 2, 16), torch.zeros(4, 1, 16), torch.zeros(4, 1, 16), [3], 1.0)


@needs_kernel
def test_model_decode_same_with_and_without_kernel(tmp_path):
    model = LlamaModel(generate_tiny_model(tmp_path, "tiny", seed=3))
    assert model.kernels is not None
    prompts = [[5, 9, 11, 40, 2, 7, 8], [3, 4], [100, 101, 102, 103]]

    def run(use_kernel):
        model.kernels = kernels if use_kernel else None
        model.allocate_cache(len(prompts), 64)
        logits = model.prefill([(i, p, 0) for i, p in enumerate(prompts)])
        toks = logits.argmax(-1)
        pos = torch.tensor([len(p) for p in prompts])
        steps = []
        for _ in range(6):
            logits = model.decode(toks, pos)
            steps.append(logits)
            toks, pos = logits.argmax(-1), pos + 1
        return torch.stack(steps)

    with_kernel, without = run(True), run(False)
    assert torch.allclose(with_kernel, without, atol=1e-4)
    assert torch.equal(with_kernel.argmax(-1), without.argmax(-1))


def test_unbuildable_kernel_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setenv("AGORA_HOME", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", False)
    assert native.load() is None  # logged, not raised: the model uses the torch path
    with pytest.raises(RuntimeError, match="failed"):
        native.build(cache_dir=tmp_path)
    monkeypatch.setattr(native, "_loaded", False)
    monkeypatch.delenv("CC")
    monkeypatch.setenv("AGORA_NATIVE_KERNELS", "0")
    assert native.load() is None
