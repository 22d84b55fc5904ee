"""Tokenizers, and the small description of one that travels inside datasets and checkpoints.

A description is a plain dict (`{"kind": "char", "chars": "..."}` or `{"kind": "tiktoken", "name":
"gpt2"}`), so a checkpoint alone is enough to encode a prompt and decode a sample.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import numpy as np

from hydragpt.errors import UserError

CHAR = "char"
# The chat template's special tokens (data/chat.py): the document start, then the roles' ends.
CHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    # The token written between two documents: tiktoken's <|endoftext|>, a newline for the char tokenizer.
    separator: int | None
    special: dict[str, int]  # special tokens by name (the chat template's, where the tokenizer has them)

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` straight into an unsigned integer array: no Python int per token (bulk preparation)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """The UTF-8 bytes each token id stands for in text (int64, one per id; 0 for a special token such
        as tiktoken's <|endoftext|>, which is no text): what bits per byte divides by."""
        ...

    def describe(self) -> dict[str, Any]: ...


class CharTokenizer:
    """One token per distinct character of the training text, in sorted order (nanoGPT's char model)."""

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.vocab_size = len(chars)
        self._stoi = {ch: i for i, ch in enumerate(chars)}
        self._codes = np.array([ord(ch) for ch in chars], dtype=np.uint32)  # sorted, as `chars` is
        self.separator = self._stoi.get("\n")
        self.special: dict[str, int] = {}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in self._stoi})
            shown = ", ".join(repr(ch) for ch in unknown[:10])
            raise UserError(
                f"text has {len(unknown)} character(s) outside the char vocabulary: {shown}",
                "use only characters that occur in the training data (peek.py shows them)",
            ) from None

    def encode_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, codes).astype(np.uint32)
        if len(ids) and not np.array_equal(self._codes[np.minimum(ids, len(self._codes) - 1)], codes):
            self.encode(text)  # raises the error that names the unknown characters
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self) -> np.ndarray:
        return np.array([len(ch.encode("utf-8", "surrogatepass")) for ch in self.chars], dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        return {"kind": CHAR, "chars": self.chars}


class _TiktokenEncoded:
    """What every tokenizer encoded through a tiktoken `Encoding` (`self._enc`) shares; special tokens are
    never parsed from text."""

    _enc: Any
    vocab_size: int

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        return self._enc.encode_to_numpy(text, disallowed_special=())  # nothing special: encode_ordinary

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def token_bytes(self) -> np.ndarray:
        special = {self._enc.encode_single_token(name) for name in self._enc.special_tokens_set}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            # an id some encodings leave unused (cl100k_base's gaps) stands for no bytes either
            with contextlib.suppress(KeyError):
                lengths[i] = 0 if i in special else len(self._enc.decode_single_token_bytes(i))
        return lengths


class TiktokenTokenizer(_TiktokenEncoded):
    """A tiktoken BPE encoding by name (gpt2, cl100k_base, ...). With `chat`, the chat template's role tokens
    are added after its last id and its <|endoftext|> stands for <|bos|>, as it starts GPT-2's documents:
    a pretrained model's encoding, ready for fine-tuning on conversations."""

    def __init__(self, name: str, chat: bool = False) -> None:
        import tiktoken

        self.name, self.chat = name, chat
        try:
            self._enc = tiktoken.get_encoding(name)
        except ValueError as ex:  # an unknown name
            raise UserError(
                f"unknown tiktoken encoding '{name}'", f"use char or one of: {', '.join(tiktoken_encodings())}"
            ) from ex
        except Exception as ex:  # tiktoken downloads the BPE files on first use
            raise UserError(
                f"could not load the tiktoken encoding '{name}': {ex}",
                "tiktoken downloads it once: connect to the internet, or copy a filled TIKTOKEN_CACHE_DIR",
            ) from ex
        self.separator = self._enc.eot_token
        self.special = {}
        if chat:
            base = self._enc
            roles = {name: base.n_vocab + i for i, name in enumerate(CHAT_TOKENS[1:])}
            self._enc = tiktoken.Encoding(
                f"{name}_chat",
                pat_str=base._pat_str,
                mergeable_ranks=base._mergeable_ranks,
                special_tokens={**base._special_tokens, **roles},
            )
            self.special = {CHAT_TOKENS[0]: base.eot_token, **roles}
        self.vocab_size = self._enc.n_vocab

    def describe(self) -> dict[str, Any]:
        return {"kind": "tiktoken", "name": self.name, **({"chat": True} if self.chat else {})}


class BpeTokenizer(_TiktokenEncoded):
    """A byte-level BPE trained with scripts/train_tokenizer.py (data/bpe.py), encoded through tiktoken.
    Its description carries every token's bytes, so a dataset or checkpoint alone can rebuild it."""

    def __init__(self, desc: dict[str, Any]) -> None:
        import base64

        import tiktoken

        ranks = {base64.b64decode(token): rank for rank, token in enumerate(desc["ranks"])}
        special = {name: len(ranks) + i for i, name in enumerate(desc["special"])}
        self.name = desc["name"]
        self._desc = desc
        self._enc = tiktoken.Encoding(
            desc["name"], pat_str=desc["pattern"], mergeable_ranks=ranks, special_tokens=special
        )
        self.vocab_size = self._enc.n_vocab
        self.special = special
        self.separator = special[desc["special"][0]]  # <|bos|> begins each document after the first

    def describe(self) -> dict[str, Any]:
        return self._desc


def encode_prompt(tokenizer: Tokenizer, text: str, key: str) -> list[int]:
    """A prompt the user gave as `key`, encoded; one the tokenizer cannot encode, or that encodes to
    nothing, is an error naming `key`."""
    try:
        ids = tokenizer.encode(text)
    except UserError as ex:
        raise UserError(f"{key}: {ex.what}", ex.fix) from None
    if not ids:
        raise UserError(f"{key} is empty", f'give {key}="<some text>" (the default is a newline)')
    return ids


def tiktoken_encodings() -> list[str]:
    import tiktoken

    return tiktoken.list_encoding_names()


def named_tokenizer(name: str, chat: bool = False) -> Tokenizer:
    """`data.tokenizer` other than char: a tiktoken encoding's name (`chat`: with the chat tokens added), or a
    file of scripts/train_tokenizer.py (which has them)."""
    if not name.endswith(".json"):
        return TiktokenTokenizer(name, chat)
    import json
    from pathlib import Path

    path = Path(name).expanduser()
    try:
        desc = json.loads(path.read_text())
        assert isinstance(desc, dict) and desc.get("kind") == "bpe"
    except (OSError, ValueError, AssertionError) as ex:
        raise UserError(
            f"{path} is not a tokenizer of scripts/train_tokenizer.py", "train one: python scripts/train_tokenizer.py"
        ) from ex
    return BpeTokenizer(desc)


def tokenizer_from_description(desc: dict[str, Any]) -> Tokenizer:
    kind = desc.get("kind")
    if kind == CHAR:
        return CharTokenizer(desc["chars"])
    if kind == "tiktoken":
        return TiktokenTokenizer(desc["name"], desc.get("chat", False))
    if kind == "bpe":
        return BpeTokenizer(desc)
    raise UserError(
        f"unknown tokenizer kind {kind!r}: the dataset or checkpoint was written by another tool",
        "prepare the dataset again (prepare.py ... overwrite=true), or use a checkpoint hydragpt wrote",
    )


def with_chat_tokens(desc: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether tokenizer `desc` is `base` with the chat tokens added: a pretrained model's own encoding, in a
    chat dataset made for fine-tuning it (the model grows rows for the new tokens)."""
    return base.get("kind") == "tiktoken" and desc == {**base, "chat": True}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every token id: uint16 up to 65,536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
