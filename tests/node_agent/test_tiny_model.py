"""The deterministic tiny model generator and preset resolution."""

from __future__ import annotations

import hashlib
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest

from node_agent.tiny_model import PRESETS, generate_tiny_model, model_config, parse_model_name, resolve_model


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = generate_tiny_model(tmp_path / "a", "tiny", seed=0)
    b = generate_tiny_model(tmp_path / "b", "tiny", seed=0)
    c = generate_tiny_model(tmp_path / "c", "tiny", seed=7)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert digest(a / name) == digest(b / name), name
    assert digest(a / "model.safetensors") != digest(c / "model.safetensors")


def test_loadable_by_transformers_and_peaked(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    folder = generate_tiny_model(tmp_path, "tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    text = "Héllo wörld 🙂 言語モデル\n\tdef f(x): return x"
    assert raw.decode(raw.encode(text).ids) == text
    assert tok.encode(text) == raw.encode(text).ids
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([raw.encode("The market opens before sunrise, and the price of a token").ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    entropy = float(-(lp.exp() * lp).sum(-1).mean())
    assert 0.5 < entropy < 5.0 < math.log(raw.get_vocab_size())


def test_presets_have_vllm_head_sizes_and_grow():
    sizes = []
    for name in PRESETS:
        c = model_config(name)
        assert c["head_dim"] >= 32 and c["head_dim"] % 32 == 0
        d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
        kv = c["num_key_value_heads"] * c["head_dim"]
        sizes.append(L * (2 * d * d + 2 * d * kv + 3 * d * f) + c["vocab_size"] * d)
    assert sizes == sorted(sizes)
    assert 0.5e6 < sizes[0] < 1.5e6 and 15e6 < sizes[1] < 25e6 and 80e6 < sizes[2] < 120e6


def test_parse_names():
    assert parse_model_name("tiny").seed == 0
    spec = parse_model_name("tiny-20m@seed=7")
    assert (spec.preset, spec.seed) == ("tiny-20m", 7)
    assert parse_model_name("llama-70b") is None


def test_resolve_model(tmp_path):
    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:  # racing first uses all get the same complete folder
        paths = list(pool.map(lambda _: resolve_model("tiny@seed=3", cache_dir=cache), range(4)))
    assert len(set(paths)) == 1 and (paths[0] / "model.safetensors").exists()
    assert json.loads((paths[0] / "agora_tiny.json").read_text())["seed"] == 3
    assert [p.name for p in cache.iterdir()] == [paths[0].name]  # no temporary folders left
    assert resolve_model(paths[0]) == paths[0]  # an existing folder is used as-is
    assert resolve_model("tiny", cache_dir=cache) != paths[0]
    with pytest.raises(FileNotFoundError):
        resolve_model("no-such-model", cache_dir=cache)


def test_resolve_model_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AGORA_HOME", str(tmp_path))
    assert resolve_model("tiny").parent == tmp_path / "models"


def test_one_billion_preset_is_llama_shaped():
    c = model_config("tiny-1b")
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    size = L * (2 * d * d + 2 * d * kv + 3 * d * f) + c["vocab_size"] * d
    assert 0.9e9 < size < 1.1e9
    assert c["head_dim"] == 128 and c["num_attention_heads"] // c["num_key_value_heads"] == 4  # GQA
    assert c["torch_dtype"] == "bfloat16"
    assert all(model_config(p)["torch_dtype"] == "float32" for p in ("tiny", "tiny-20m", "tiny-100m"))


def test_parallel_generation_is_deterministic(tmp_path, monkeypatch):
    """The 1B preset's scheme (a generator per tensor, drawn in threads, stored in bfloat16) on
    a small shape: same bytes whatever the thread count, another seed other weights."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    import node_agent.tiny_model as tm

    small = dict(PRESETS["tiny"], dtype="bfloat16", parallel=True)
    monkeypatch.setitem(tm.PRESETS, "tiny-par", small)
    a = generate_tiny_model(tmp_path / "a", "tiny-par", seed=0)
    monkeypatch.setattr(tm.os, "cpu_count", lambda: 1)
    b = generate_tiny_model(tmp_path / "b", "tiny-par", seed=0)
    c = generate_tiny_model(tmp_path / "c", "tiny-par", seed=1)
    assert digest(a / "model.safetensors") == digest(b / "model.safetensors")
    assert digest(a / "model.safetensors") != digest(c / "model.safetensors")
    w = load_file(str(a / "model.safetensors"))
    assert {t.dtype for t in w.values()} == {torch.bfloat16}
    q = w["model.layers.0.self_attn.q_proj.weight"].float()
    k = w["model.layers.0.self_attn.k_proj.weight"].float()
    assert q.shape == (128, 128) and abs(float(q.std()) - 2 / 128**0.5) < 0.02
    assert not torch.equal(q[:64], k)  # every tensor has its own stream
