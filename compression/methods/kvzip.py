"""KVzip (Kim et al., 2025) from kvpress: scores each context entry by how much the model attends to it
while reconstructing the context ("Repeat the previous context exactly."), then evicts the lowest.

kvpress's `KVzipPress` loads the tokenizer with `AutoTokenizer.from_pretrained(model.config.name_or_path)`
when it opens; the adapter hands it the tokenizer eval-cache already holds instead (the tiny test
models and GGUF-converted profiles have no tokenizer at that path). kvpress refuses Gemma 3 for
KVzip; its eviction is kvpress's masking of scored entries (the cache keeps its length).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace

from kvpress import KVzipPress
from kvpress.presses import kvzip_press

from compression.base import COMPRESSORS, KVPressBaseline, Schedule


@dataclass
class TokenizerKVzipPress(KVzipPress):
    """KVzipPress reading the given tokenizer instead of loading one by the model's name."""

    tokenizer: object = field(default=None, repr=False)

    @contextmanager
    def __call__(self, model):
        loader = kvzip_press.AutoTokenizer
        if self.tokenizer is not None:  # kvpress reads it only when the press opens
            tok = self.tokenizer
            kvzip_press.AutoTokenizer = SimpleNamespace(from_pretrained=lambda *args, **kwargs: tok)
        try:
            with super().__call__(model):
                yield
        finally:
            kvzip_press.AutoTokenizer = loader


@COMPRESSORS.register("kvzip")
@dataclass
class KVzip(KVPressBaseline):
    """
    Parameters
    ----------
    tokenizer
        The model's tokenizer (eval-cache passes its own); None: kvpress loads it by the model's name.
    """

    tokenizer: object = field(default=None, repr=False)

    def press(self, compression_ratio: float, schedule: Schedule):
        return TokenizerKVzipPress(compression_ratio=compression_ratio, n_sink=schedule.sink, tokenizer=self.tokenizer)
