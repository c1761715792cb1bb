"""Prompt embeddings, cached: the empty negative prompt is encoded once per process and a
repeated prompt once while it stays among the most recently used."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

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
