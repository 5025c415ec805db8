"""Caption handling (spec §8.4): choose one caption, optional aesthetic phrase, cleaning hook, CFG drop,
tokenisation to T5 and CLIP ids.

Tokenisation is an injectable step: ``TextProcessor`` takes already-loaded tokenizers (HF
``AutoTokenizer`` objects or anything with the same ``__call__``), so tests can pass tiny ones and the
feature cache can skip it. The cleaner is ``mm.data.captions.clean_caption`` and runs only when
``enable_text_preprocess`` is true (upstream ignored the key, §12.20); it runs upstream's two cleaning
passes itself. The CFG drop replaces the cleaned caption by ``""`` for
**both** tokenizers at once.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

LOW_AESTHETIC = (
    "The aesthetic quality of this video is low.",
    "This video has poor visual appeal.",
    "The visual quality of this clip is unappealing.",
)
HIGH_AESTHETIC = (
    "The aesthetic quality of this video is high.",
    "This video has excellent visual appeal.",
    "The visual quality of this clip is beautiful.",
)
LOW_AESTHETIC_MAX = 4.25
HIGH_AESTHETIC_MIN = 5.75


def caption_cleaner(enabled: bool, keep_chinese: bool = False) -> Callable[[str], str] | None:
    """The cleaning hook: ``mm.data.captions.clean_caption``, or ``None`` when disabled."""
    if not enabled:
        return None
    from mm.data.captions import clean_caption

    return functools.partial(clean_caption, keep_chinese=keep_chinese)


def add_aesthetic(caption: str, score: float | None, rng: np.random.Generator) -> str:
    """Prepend or append a quality sentence for clearly low / high aesthetic scores."""
    if score is None or LOW_AESTHETIC_MAX < score < HIGH_AESTHETIC_MIN:
        return caption
    phrases = LOW_AESTHETIC if score <= LOW_AESTHETIC_MAX else HIGH_AESTHETIC
    phrase = phrases[int(rng.integers(len(phrases)))]
    return f"{phrase} {caption}" if rng.random() < 0.5 else f"{caption} {phrase}"


def tokenize(tokenizer: Any, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad/truncate to ``max_length``; -> (ids ``[1, L]`` int64, mask ``[1, L]`` int64)."""
    out = tokenizer(text, max_length=max_length, padding="max_length", truncation=True,
                    return_attention_mask=True, add_special_tokens=True, return_tensors="pt")
    return out["input_ids"].long(), out["attention_mask"].long()


class TextProcessor:
    """caption list -> final caption string (+ token ids/masks when tokenizers are given)."""

    def __init__(self, tokenizer: Any = None, tokenizer_2: Any = None, *, max_length: int = 512,
                 max_length_2: int | None = None, cfg_rate: float = 0.1,
                 cleaner: Callable[[str], str] | None = None, use_aesthetic: bool = False) -> None:
        if not 0.0 <= cfg_rate <= 1.0:
            raise ValueError(f"cfg_rate must be in [0, 1], got {cfg_rate}")
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.max_length = max_length
        if max_length_2 is None:
            max_length_2 = getattr(tokenizer_2, "model_max_length", 77) if tokenizer_2 is not None else 77
            max_length_2 = max_length_2 if max_length_2 and max_length_2 < 100_000 else 77
        self.max_length_2 = max_length_2
        self.cfg_rate = cfg_rate
        self.cleaner = cleaner
        self.use_aesthetic = use_aesthetic

    def caption(self, captions: tuple[str, ...], aesthetic: float | None, rng: np.random.Generator) -> str:
        """Pick one caption uniformly, decorate, clean, then CFG-drop (always draws the same randoms)."""
        text = captions[int(rng.integers(len(captions)))]
        if self.use_aesthetic:
            text = add_aesthetic(text, aesthetic, rng)
        if self.cleaner is not None:
            text = self.cleaner(text)
        drop = rng.random() < self.cfg_rate
        return "" if drop else text

    def encode(self, text: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.tokenizer is not None:
            out["prompt_ids"], out["prompt_mask"] = tokenize(self.tokenizer, text, self.max_length)
        if self.tokenizer_2 is not None:
            out["prompt_ids_2"], out["prompt_mask_2"] = tokenize(self.tokenizer_2, text, self.max_length_2)
        return out

    def __call__(self, captions: tuple[str, ...], aesthetic: float | None,
                 rng: np.random.Generator) -> dict[str, Any]:
        text = self.caption(captions, aesthetic, rng)
        return {"caption": text, **self.encode(text)}


def load_tokenizer(path: str) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(path)`` (local directory)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
