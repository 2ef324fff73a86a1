"""Tokenizer and chat template of a checkpoint directory (tokenizer.json + tokenizer_config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from afkv.errors import CheckpointError, RequestError


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # AddedToken serialisation
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        try:
            self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise CheckpointError(f"cannot load {model_dir / 'tokenizer.json'}: {exc}") from exc
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = cfg.get("chat_template")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.add_bos = bool(cfg.get("add_bos_token", False))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self._template = None
        self._token_texts: dict[int, str] = {}  # token_text's cache (the owner's thread only)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        return cls(model_dir) if (Path(model_dir) / "tokenizer.json").exists() else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def max_token_chars(self) -> int:
        """Characters of the longest token string (added tokens included): a token covers at
        most this many characters of a text (byte-level tokens: bytes, so characters too)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def stream(self) -> "TextStream":
        """An incremental decoder for one request's output tokens."""
        return TextStream(self)

    def token_text(self, token_id: int) -> str:
        """The text of one token on its own (special tokens included), e.g. for logprobs."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise RequestError("this model has no chat template: pass a plain text prompt or token ids")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            self._template = env.from_string(self.chat_template)
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"chat messages must be dicts with string 'role' and 'content', got {m!r}")
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


class TextStream:
    """Incremental detokenization of one sequence (the tokenizers library's DecodeStream): each
    step costs O(1) in the output length, and the pieces add up to `decode(all ids)`.

    A token that ends inside a multi-byte UTF-8 character yields "" until the character is
    complete; `finish` returns what a full decode would still add (U+FFFD for a character the
    output never completed). Special tokens are skipped, as in `Tokenizer.decode`."""

    def __init__(self, tokenizer: Tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._num_chars = 0  # characters returned so far
        self._behind = False  # the last step returned nothing: a character may be incomplete

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._tokenizer._tok, token_id)
        self._behind = piece is None
        if piece is None:
            return ""
        self._num_chars += len(piece)
        return piece

    def finish(self, token_ids: list[int]) -> str:
        """The rest of the text once `token_ids` (every id given to step) are all there is."""
        if not self._behind:
            return ""
        rest = self._tokenizer.decode(token_ids)[self._num_chars :]  # once per sequence, at its end
        self._num_chars += len(rest)
        self._behind = False
        return rest
