"""Deterministic tiny Llama models, generated locally so tests and the demo need no download.

`generate_tiny_model(out_dir, preset, seed)` writes a Hugging Face format folder
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json) that `transformers.AutoModelForCausalLM` / `AutoTokenizer` and the
built-in engine load offline. Same preset and seed give byte-identical files.

Weights are drawn with a larger standard deviation than the usual 0.02 so the output
distribution is peaked (entropy of a few nats) like a trained model's, which makes
log-probability verification meaningful (see DESIGN.md).

`resolve_model(name_or_path)` maps a preset name such as "tiny", "tiny-20m" or
"tiny@seed=7" to a generated folder in the cache (created once, atomically), and an
existing folder path to itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

PRESETS: dict[str, dict] = {
    # ~1M parameters: tests, the demo and the node agent's quick benchmark.
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=352),
    # ~20M parameters.
    "tiny-20m": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                     intermediate_size=1536),
    # ~100M parameters.
    "tiny-100m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                      intermediate_size=2816),
    # ~1B parameters (Llama-3.2-1B-shaped: head_dim 128, 4 query heads per KV head), for GPU
    # benchmarks. Stored in bfloat16 (2 GB), each tensor drawn from its own seeded generator in
    # parallel threads: seconds to generate, where one serial generator would take a minute.
    "tiny-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=8192, dtype="bfloat16", parallel=True),
}

VOCAB_SIZE = 512
MAX_POSITIONS = 4096
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FORMAT_VERSION = "1"  # bump when the generated files change, so caches regenerate

_CORPUS = """\
The market opens before sunrise. Sellers bring their machines, buyers bring their questions,
and the price of a token moves with the load. A node that answers quickly earns more; a node
that lies about its speed loses its place in the queue. Every answer is checked by sampling,
and every token is paid for once.
Once upon a time there was a small model that wanted to speak. It knew only a few hundred
words, but it said them with confidence. "Hello," it said, "how can I help you today?"
The user asked about the weather, the time, the distance to the moon and the price of bread.
The model answered each question in turn, sometimes wrongly, always politely.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14159 42.
Les modèles de langue prédisent le mot suivant. Die Sprachmodelle sagen das nächste Wort voraus.
言語モデルは次の単語を予測します。 Языковые модели предсказывают следующее слово. 🙂👍
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. To be, or not to be, that is the question. All that glitters is not gold.
user: What is the capital of France?
assistant: The capital of France is Paris.
user: Write a short poem about the sea.
assistant: The sea is wide, the sea is deep, it sings the sailors all to sleep.
"""


@dataclass(frozen=True)
class ModelSpec:
    preset: str
    seed: int

    @property
    def folder_name(self) -> str:
        return f"{self.preset}-seed{self.seed}-v{_FORMAT_VERSION}"


def parse_model_name(name: str) -> ModelSpec | None:
    """"tiny" -> ModelSpec("tiny", 0); "tiny-20m@seed=7" -> ModelSpec("tiny-20m", 7); else None."""
    m = re.fullmatch(r"([a-z0-9-]+)(?:@seed=(\d+))?", name.strip())
    if not m or m.group(1) not in PRESETS:
        return None
    return ModelSpec(m.group(1), int(m.group(2) or 0))


def model_config(preset: str) -> dict:
    p = PRESETS[preset]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p["hidden_size"],
        "intermediate_size": p["intermediate_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "head_dim": p["hidden_size"] // p["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": p.get("dtype", "float32"),
        "initializer_range": 0.02,
    }


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return tok


def _weights(config: dict, seed: int, parallel: bool = False) -> dict:
    """Seeded weights; a generator on CPU in float32 makes them platform-independent.

    Serial (the small presets, whose bytes must not change): one generator draws every tensor
    in order. `parallel`: each tensor from its own generator, seeded from `seed` and the
    tensor's name, drawn in a thread pool (torch releases the GIL) and cast to the config's
    `torch_dtype` as it is made, so a 1B model takes seconds and no float32 copy of it exists."""
    import torch

    d, f = config["hidden_size"], config["intermediate_size"]
    hd = config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    dtype = getattr(torch, config.get("torch_dtype", "float32"))
    serial = torch.Generator().manual_seed(seed)

    def normal(shape, std, name=""):
        if parallel:
            digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        else:
            g = serial
        return (torch.randn(shape, generator=g, dtype=torch.float32) * std).to(dtype).contiguous()

    # Logit std ~ emb_std * sqrt(d): about 3.5 gives a peaked but not one-hot distribution.
    emb_std = 3.5 / d**0.5
    lin_std = 1.0 / d**0.5
    # (name, shape, std) in the serial generator's draw order
    specs = [("model.embed_tokens.weight", (config["vocab_size"], d), emb_std)]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        specs += [
            (p + "self_attn.q_proj.weight", (nq * hd, d), lin_std * 2.0),
            (p + "self_attn.k_proj.weight", (nkv * hd, d), lin_std * 2.0),
            (p + "self_attn.v_proj.weight", (nkv * hd, d), lin_std),
            (p + "self_attn.o_proj.weight", (d, nq * hd), lin_std),
            (p + "mlp.gate_proj.weight", (f, d), lin_std),
            (p + "mlp.up_proj.weight", (f, d), lin_std),
            (p + "mlp.down_proj.weight", (d, f), 1.0 / f**0.5),
        ]
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
            made = dict(zip([n for n, _, _ in specs], pool.map(lambda s: normal(s[1], s[2], s[0]), specs)))
    else:
        made = {n: normal(shape, std) for n, shape, std in specs}
    emb = made["model.embed_tokens.weight"]
    emb[: len(SPECIAL_TOKENS)] *= 0.05  # special tokens are rarely predicted
    w: dict = {"model.embed_tokens.weight": emb}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = torch.ones(d, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=dtype)
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj"):
            w[p + n + ".weight"] = made[p + n + ".weight"]
    w["model.norm.weight"] = torch.ones(d, dtype=dtype)
    return w


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def generate_tiny_model(out_dir: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a deterministic tiny Llama model folder to `out_dir` and return its path."""
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny model preset {preset!r}; known: {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model_config(preset)
    weights = _weights(config, seed, parallel=PRESETS[preset].get("parallel", False))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights
    _write_json(out / "config.json", config)
    tok = _train_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    })
    _write_json(out / "special_tokens_map.json", {
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
    })
    _write_json(out / "generation_config.json", {
        "bos_token_id": 0,
        "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        "pad_token_id": 0,
        "do_sample": False,
    })
    _write_json(out / "agora_tiny.json", {"preset": preset, "seed": seed, "format": _FORMAT_VERSION})
    return out


def default_cache_dir() -> Path:
    home = os.environ.get("AGORA_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "agora"
    return base / "models"


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A model folder for a preset name ("tiny", "tiny-20m@seed=7") or an existing folder.

    Presets are generated on first use into a temporary folder next to the target and
    renamed into place, so concurrent first uses never see a half-written folder.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    spec = parse_model_name(str(name_or_path))
    if spec is None:
        raise FileNotFoundError(
            f"model {str(name_or_path)!r} is neither a folder nor a tiny preset ({', '.join(sorted(PRESETS))})"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / spec.folder_name
    if (target / "agora_tiny.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.folder_name}.", dir=root))
    try:
        generate_tiny_model(tmp, spec.preset, spec.seed)
        try:
            os.rename(tmp, target)  # atomic; fails if another process won the race
        except OSError:
            if not (target / "agora_tiny.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
