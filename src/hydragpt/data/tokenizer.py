"""Tokenizers, and the small description of one that travels inside datasets and checkpoints.

A description is a plain dict (`{"kind": "char", "chars": "..."}` or `{"kind": "tiktoken", "name":
"gpt2"}`), so a checkpoint alone is enough to encode a prompt and decode a sample.
"""

from __future__ import annotations

from typing import Any, Protocol

from hydragpt.errors import UserError


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per distinct character of the training text, in sorted order (nanoGPT's char model)."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._stoi})
        if unknown:
            shown = ", ".join(repr(ch) for ch in unknown[:10])
            raise UserError(
                f"text has {len(unknown)} character(s) outside the char vocabulary: {shown}",
                "use only characters that occur in the training data",
            )
        return [self._stoi[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class TiktokenTokenizer:
    """A tiktoken BPE encoding by name (gpt2, cl100k_base, ...); special tokens are never parsed from text."""

    def __init__(self, name: str) -> None:
        import tiktoken

        self.name = name
        self._enc = tiktoken.get_encoding(name)
        self.vocab_size = self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def describe(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name}


def tokenizer_from_description(desc: dict[str, Any]) -> Tokenizer:
    kind = desc.get("kind")
    if kind == "char":
        return CharTokenizer(desc["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(desc["name"])
    raise UserError(f"unknown tokenizer kind {kind!r}", "the dataset or checkpoint was written by another tool")
