"""The compiled decode-attention kernel against the torch path it replaces, and the
fallback when it cannot be built."""

from __future__ import annotations

import math

import pytest
import torch

from node_agent.engines.builtin import native
from node_agent.engines.builtin.model import LlamaModel
from node_agent.tiny_model import generate_tiny_model

kernel = native.load()
needs_kernel = pytest.mark.skipif(kernel is None, reason="no C compiler here: the torch path is used")


def reference(q, k, v, pos, kc, vc, scale):
    """Plain attention per row over positions 0..pos after writing k, v at pos."""
    kc, vc = kc.clone(), vc.clone()
    out = torch.empty_like(q)
    for b, p in enumerate(pos.tolist()):
        kc[b, :, p], vc[b, :, p] = k[b], v[b]
        keys, vals = kc[b, :, : p + 1], vc[b, :, : p + 1]  # [kv, n, hd]
        att = torch.softmax(torch.einsum("hgd,hnd->hgn", q[b], keys) * scale, -1)
        out[b] = torch.einsum("hgn,hnd->hgd", att, vals)
    return out, kc, vc


@needs_kernel
@pytest.mark.parametrize("kvh,groups,hd", [(2, 2, 32), (4, 1, 64), (1, 4, 48)])
def test_kernel_matches_reference_and_writes_the_cache(kvh, groups, hd):
    torch.manual_seed(kvh * 10 + groups)
    rows, slots, max_len = 5, 7, 300
    q = torch.randn(rows, kvh, groups, hd)
    k, v = torch.randn(rows, kvh, hd), torch.randn(rows, kvh, hd)
    kc, vc = torch.randn(slots, kvh, max_len, hd), torch.randn(slots, kvh, max_len, hd)
    pos = torch.tensor([299, 0, 17, 150, 63])  # lengths 1..max_len, unsorted
    scale = 1 / math.sqrt(hd)
    ref, ref_kc, ref_vc = reference(q, k, v, pos, kc, vc, scale)
    out = kernel(q, k, v, pos, kc, vc, scale)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-4)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)  # slots >= rows untouched too


@needs_kernel
def test_kernel_refuses_bad_input():
    q, k = torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 8)
    kc = torch.zeros(1, 1, 16, 8)
    with pytest.raises(TypeError):
        kernel(q.double(), k, k, torch.tensor([0]), kc, kc, 1.0)
    with pytest.raises(ValueError, match="past the cache"):
        kernel(q, k, k, torch.tensor([16]), kc, kc.clone(), 1.0)


@needs_kernel
def test_model_decode_same_with_and_without_kernel(tmp_path):
    model = LlamaModel(generate_tiny_model(tmp_path, "tiny", seed=3))
    assert model.attention_kernel is not None
    prompts = [[5, 9, 11, 40, 2, 7, 8], [3, 4], [100, 101, 102, 103]]

    def run(use_kernel):
        model.attention_kernel = kernel if use_kernel else None
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
