"""`sample.py chat=true`: talk to a model from a terminal or a pipe, one message per line.

A chat-trained checkpoint (fine-tuned on data.format=chat) holds a conversation: each message is rendered
with the chat template after the history, the reply streams until the model says <|assistant_end|>, and
the history carries into the next turn. A KV cache holds the history while it fits the model's window, so
a turn feeds the model only its own new tokens. Any other model continues each line as a prompt.

Commands, each alone on its line: `temp X` (temperature), `tokens X` (the most new tokens per answer),
`/history` and `/clear` (a conversation's history: print it, forget it), `quit`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from hydragpt.config import MAX_NEW_TOKENS
from hydragpt.data.chat import ChatTemplate, Turn
from hydragpt.data.tokenizer import Tokenizer, encode_prompt
from hydragpt.errors import UserError
from hydragpt.model import GPT, KVCache
from hydragpt.sampling import Settings, complete, complete_tokens

CONTINUE_HELP = "type a prompt and press enter; `temp X` sets the temperature, `tokens X` the length, `quit` ends"
CONVERSE_HELP = (
    "chat with the model: type a message and press enter; `/history` shows the conversation, `/clear` starts a"
    " new one, `temp X` sets the temperature, `tokens X` the longest answer, `quit` ends"
)


class Conversation:
    """The turns so far, their tokens as the template renders them, and a KV cache that holds those tokens
    while they fit in the model's block (past it, each turn's window is prefilled afresh)."""

    def __init__(self, model: GPT, template: ChatTemplate, use_cache: bool) -> None:
        self.model, self.template = model, template
        self.cache = KVCache(model.config.n_layer, model.config.block_size) if use_cache else None
        self.clear()

    def clear(self) -> None:
        self.turns: list[Turn] = []
        self.tokens = [self.template.bos]
        if self.cache is not None:
            self.cache.reset()

    def reply(
        self,
        message: str,
        settings: Settings,
        generator: torch.Generator,
        dtype: torch.dtype,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """The model's answer to `message` after the history, which both then join."""
        tokenizer, end = self.template.tokenizer, self.template.assistant_end
        prompt = self.tokens + self.template.user_turn(message)
        reuse = self.cache is not None and len(prompt) <= self.model.config.block_size
        if self.cache is not None and not reuse:
            self.cache.reset()
        try:
            (text,), (ids,) = complete_tokens(
                self.model, tokenizer, [prompt], settings, generator, dtype, stream, end, self.cache if reuse else None
            )
        except KeyboardInterrupt:  # an answer stopped halfway joins no history, and the cache forgets it
            if self.cache is not None:
                self.cache.reset()
            raise
        if tokenizer.decode(ids) != text:  # cut at a stop string: the history holds what was said
            ids = tokenizer.encode(text)
            reuse = False
        self.tokens = [*prompt, *ids, end]
        self.turns.append((message, text))
        # the cache holds the history's first tokens only while no window moved (or after a cut, not even then)
        if self.cache is not None and not (reuse and len(self.tokens) - 1 <= self.model.config.block_size):
            self.cache.reset()
        return text

    def show(self) -> str:
        lines = [f"user: {message}\nassistant: {answer}" for message, answer in self.turns]
        return "\n".join(lines) if lines else "(no messages yet)"


def chat_trained(checkpoint: dict[str, Any]) -> bool:
    """Whether the model was fine-tuned on conversations (its training data had data.format=chat)."""
    return checkpoint.get("config", {}).get("data", {}).get("format") == "chat"


def chat(
    model: GPT,
    tokenizer: Tokenizer,
    checkpoint: dict[str, Any],
    settings: Settings,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> None:
    """Read lines from stdin (a terminal or a pipe): answer each in the conversation, or continue it."""
    conversation = None
    if chat_trained(checkpoint):
        conversation = Conversation(model, ChatTemplate(tokenizer), settings.use_cache)
    print(CONVERSE_HELP if conversation else CONTINUE_HELP, file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return
        if not line or line.strip() == "quit":
            return
        text = line.rstrip("\r\n")
        command, _, value = text.strip().partition(" ")
        if command in ("temp", "tokens") and _is_number(value):  # "tokens of affection" is a prompt
            try:
                set_chat_setting(settings, command, value)
            except UserError as ex:
                print(f"error: {ex}", file=sys.stderr, flush=True)
            continue
        if conversation is not None and text.strip() in ("/history", "/clear"):
            if text.strip() == "/clear":
                conversation.clear()
                print("(history cleared)", file=sys.stderr, flush=True)
            else:
                print(conversation.show(), flush=True)
            continue
        if not text:
            continue
        try:  # Ctrl-C stops this answer, not the chat
            if conversation is not None:
                conversation.reply(text, settings, generator, dtype, stream=_print_now)
            else:
                prompt_ids = encode_prompt(tokenizer, text, "your prompt")
                print(text, end="", flush=True)
                complete(model, tokenizer, [prompt_ids], settings, generator, dtype, stream=_print_now)
        except UserError as ex:
            print(f"error: {ex}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:
            pass
        print(flush=True)


def set_chat_setting(settings: Settings, command: str, value: str) -> None:
    """`temp 0.5` or `tokens 100`, checked as sample.py's own settings are."""
    try:
        number = float(value) if command == "temp" else int(value)
    except ValueError as ex:
        raise UserError(
            f"{command} needs a number, got '{value}'", f"e.g. {command} {0.8 if command == 'temp' else 200}"
        ) from ex
    if command == "temp":
        if not 0 <= number < math.inf:
            raise UserError(f"temperature must be a number >= 0, got {number}", "0 is greedy, e.g. temp 0.8")
        settings.temperature = number
    else:
        if not 1 <= number <= MAX_NEW_TOKENS:
            raise UserError(f"tokens must be in [1, {MAX_NEW_TOKENS:,}], got {number}", "e.g. tokens 200")
        settings.max_new_tokens = int(number)
    print(f"{'temperature' if command == 'temp' else 'new tokens'}: {number}", file=sys.stderr, flush=True)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _print_now(text: str) -> None:
    print(text, end="", flush=True)
