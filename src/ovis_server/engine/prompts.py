"""Prompt embeddings, cached: the empty negative prompt is encoded once per process and a
repeated prompt once while it stays among the most recently used. And how much of a
prompt the pipeline reads: it cuts the prompt's message to a fixed number of tokens."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

DEFAULT_CAPACITY = 64


class PromptCache:
    """A bounded LRU map from prompt text to its embeddings, shape [1, tokens, hidden]."""

    def __init__(
        self, encode: Callable[[str], torch.Tensor], capacity: int = DEFAULT_CAPACITY
    ) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._encode = encode
        self.capacity = capacity
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt: str) -> torch.Tensor:
        with self._lock:
            cached = self._entries.get(prompt)
            if cached is not None:
                self._entries.move_to_end(prompt)
                self.hits += 1
                return cached
        embeds = self._encode(prompt)
        with self._lock:
            self.misses += 1
            if self.capacity:
                self._entries[prompt] = embeds
                self._entries.move_to_end(prompt)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
        return embeds


def prompt_overflow(pipeline: Any, prompt: str, max_sequence_length: int) -> tuple[int, int]:
    """(the prompt's tokens, how many the pipeline drops) when it encodes ``prompt``.

    The pipeline wraps the prompt in its chat template, keeps the first
    ``max_sequence_length`` tokens after the template's fixed opening, and drops the rest
    (the template's closing first, then the end of the prompt). Counts are ``about``: the
    prompt's tokens are its message's less those of an empty prompt's.
    """

    def tokens(text: str) -> int:
        (message,) = pipeline._get_messages([text])
        encoded = pipeline.tokenizer(message, add_special_tokens=False, truncation=False)
        return len(encoded["input_ids"])

    total = tokens(prompt)
    dropped = total - (max_sequence_length + pipeline.user_prompt_begin_id)
    return total - tokens(""), max(0, dropped)
