"""Conversations as tokens: the chat template, and the loss mask that trains a model on the assistant's replies.

A conversation renders as

    <|bos|><|user_start|>Who is there?<|user_end|><|assistant_start|>Nay, answer me.<|assistant_end|><|user_start|>...

Its mask is 1 on the tokens a model learns to say, the assistant's reply and the <|assistant_end|> that
closes it (so it learns to stop), and 0 on everything else: the user's words and the template's other
tokens are context, never targets. A system message is folded into the first user message.

Conversations longer than a limit are cut between turns (a user message and its reply) into several
documents, each starting with <|bos|>; a single turn longer than the limit stays whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hydragpt.data.tokenizer import CHAT_TOKENS, Tokenizer
from hydragpt.errors import UserError

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

Turn = tuple[str, str]  # a user message and the assistant's reply
_FIELDS_FIX = "set data.text_field to the messages field, or data.prompt_field and data.response_field"


def conversation(record: Mapping[str, Any], fields: list[str], origin: str) -> list[Turn]:
    """The turns of one record: its messages (`fields` = [messages field]), or one question and its answer
    (`fields` = [prompt field, response field]). A last user message without a reply is dropped."""
    missing = [name for name in fields if name not in record]
    if missing:
        raise UserError(f"{origin} has a record without the field '{missing[0]}'", _FIELDS_FIX)
    if len(fields) == 2:
        prompt, response = (record[name] for name in fields)
        if not (isinstance(prompt, str) and isinstance(response, str)):
            raise UserError(f"{origin}: fields {fields[0]} and {fields[1]} must hold text", _FIELDS_FIX)
        return [(prompt, response)]
    messages = record[fields[0]]
    if not isinstance(messages, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ):
        raise UserError(
            f'{origin}: field \'{fields[0]}\' must be a list of {{"role": ..., "content": "..."}} messages',
            _FIELDS_FIX,
        )
    roles = [m["role"] for m in messages]
    contents = [m["content"] for m in messages]
    if roles[:1] == [SYSTEM] and roles[1:2] == [USER]:
        roles, contents = roles[1:], [f"{contents[0]}\n\n{contents[1]}", *contents[2:]]
    for i, role in enumerate(roles):
        if role != (USER if i % 2 == 0 else ASSISTANT):
            raise UserError(
                f"{origin}: a conversation's messages must alternate user and assistant, starting with the user"
                f" (a system message may come first), but message {i + 1} of {len(roles)} is '{role}'",
                "fix or leave out that conversation",
            )
    return list(zip(contents[0::2], contents[1::2], strict=False))


class ChatTemplate:
    """The chat template over a tokenizer that has its special tokens: scripts/train_tokenizer.py's have them,
    and a tiktoken encoding gains them for chat data (TiktokenTokenizer's `chat`)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        missing = [name for name in CHAT_TOKENS if name not in tokenizer.special]
        if missing:
            raise UserError(
                f"the tokenizer has no chat tokens ({', '.join(missing)})",
                "chat data takes a tiktoken encoding (gpt2) or a tokenizer of scripts/train_tokenizer.py",
            )
        self.tokenizer = tokenizer
        self.bos, self.user_start, self.user_end, self.assistant_start, self.assistant_end = (
            tokenizer.special[name] for name in CHAT_TOKENS
        )

    def user_turn(self, text: str) -> list[int]:
        """A user message and the token that opens the reply: what a chat session feeds before generating."""
        return [self.user_start, *self.tokenizer.encode(text), self.user_end, self.assistant_start]

    def turn(self, user: str, reply: str) -> tuple[list[int], list[int]]:
        """A turn's tokens and mask: 1 on the reply and its end token, 0 on the rest."""
        prompt = self.user_turn(user)
        answer = [*self.tokenizer.encode(reply), self.assistant_end]
        return prompt + answer, [0] * len(prompt) + [1] * len(answer)

    def render(self, turns: list[Turn], max_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, mask) of each document the conversation makes: turns are added while the document stays
        within `max_tokens`; the next turn starts a new one."""
        documents: list[tuple[np.ndarray, np.ndarray]] = []
        tokens, mask = [self.bos], [0]
        for user, reply in turns:
            turn_tokens, turn_mask = self.turn(user, reply)
            if len(tokens) > 1 and len(tokens) + len(turn_tokens) > max_tokens:
                documents.append((np.array(tokens), np.array(mask, dtype=np.uint8)))
                tokens, mask = [self.bos], [0]
            tokens += turn_tokens
            mask += turn_mask
        if len(tokens) > 1:
            documents.append((np.array(tokens), np.array(mask, dtype=np.uint8)))
        return documents
