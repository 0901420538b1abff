"""A Hugging Face `tokenizer.json` plus what tokenizer_config.json says about chat and EOS."""

from __future__ import annotations

import json
from pathlib import Path

from node_agent.errors import ModelLoadError

CHATML_FALLBACK = "chatml"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class HFTokenizer:
    """encode / decode / render_chat for one model folder, offline."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        path = Path(folder) / "tokenizer.json"
        if not path.exists():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise ModelLoadError(f"cannot load {path}: {exc}") from exc
        tcfg = _read_json(Path(folder) / "tokenizer_config.json")
        gcfg = _read_json(Path(folder) / "generation_config.json")
        mcfg = _read_json(Path(folder) / "config.json")
        self.chat_template: str | None = tcfg.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in self.chat_template}
            self.chat_template = named.get("default") or next(iter(named.values()), None)
        self.bos_token = _token_text(tcfg.get("bos_token"))
        self.eos_token = _token_text(tcfg.get("eos_token"))
        eos: set[int] = set()
        for src in (gcfg.get("eos_token_id"), mcfg.get("eos_token_id")):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, list):
                eos.update(int(x) for x in src)
        if self.eos_token and self.tok.token_to_id(self.eos_token) is not None:
            eos.add(self.tok.token_to_id(self.eos_token))
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.vocab_size = self.tok.get_vocab_size()
        self._jinja = None

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        starts_with_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self.tok.encode(text, add_special_tokens=not starts_with_bos).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: list[dict]) -> str:
        if self.chat_template:
            template = self._compiled()
            if template is not None:
                return template.render(
                    messages=messages,
                    add_generation_prompt=True,
                    bos_token=self.bos_token or "",
                    eos_token=self.eos_token or "",
                )
        return "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages) + (
            "<|im_start|>assistant\n"
        )

    def _compiled(self):
        if self._jinja is None:
            try:
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError:  # jinja2 absent: the fixed ChatML format is used
                self._jinja = False
                return None

            def raise_exception(message):
                raise ValueError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._jinja = env.from_string(self.chat_template)
        return self._jinja or None
