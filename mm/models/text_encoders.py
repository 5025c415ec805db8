"""Frozen text encoders: T5 v1.1 encoder (sequence features) and CLIP text tower with projection (pooled).

Spec §5 (and §1.1 step 2, §7.2, §9.2 step 3):

* T5 (``google/t5-v1_1-xl`` encoder, ``T5EncoderModel``): tokenised to 512 tokens, padded to max length,
  truncated, EOS appended; run **with** the padding attention mask; output ``last_hidden_state``
  (after the final RMS norm) ``[B, 512, 2048]`` plus the mask. The empty prompt gives one valid token (``</s>``).
* CLIP (``CLIP-ViT-bigG-14`` text tower, ``CLIPTextModelWithProjection``): tokenised to 77 tokens with
  BOS/EOS, padded, truncated; run **without** an attention mask (causal mask only); output
  ``text_embeds`` = text projection of the hidden state at the first EOS, ``[B, 1280]``. The CLIP mask
  is produced by the tokenizer but unused.

Both are loaded from local directories in the Hugging Face layout users already have (tokenizer files,
``config.json``, weights), frozen (``requires_grad=False``, ``eval()``), and run in their own dtype
under ``no_grad`` with autocast off, whatever the denoiser's precision. A frozen encoder refuses
``train(True)``: keep it outside the module tree the trainer switches to training mode.

The data pipeline tokenises in its workers without loading any weights: :func:`load_t5_tokenizer`,
:func:`load_clip_tokenizer` and :func:`tokenize` are the same code the encoders' ``tokenize`` uses.

Inputs may carry extra leading dims: ids ``[B, 1, L]`` (the collate layout, §8.5) give ``[B, 1, L, C]``
(T5) and ``[B, 1, P]`` (CLIP), matching the shapes the denoiser consumes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Any one of these holds the weights (the index files name their shards, checked too).
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_T5_TOKENIZER_FILES = (("tokenizer.json",), ("spiece.model",))
_CLIP_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))

T5_MAX_LENGTH = 512
CLIP_MAX_LENGTH = 77


def _check_model_dir(directory: Path, what: str) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} directory {str(directory)!r} does not exist or is not a directory")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{what} directory {str(directory)!r} is incomplete: missing 'config.json'")
    present = [name for name in _WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise FileNotFoundError(
            f"{what} directory {str(directory)!r} is incomplete: missing weights (one of {', '.join(_WEIGHT_FILES)})"
        )
    for index_name in (n for n in present if n.endswith(".index.json")):
        try:
            shards = set(json.loads((directory / index_name).read_text())["weight_map"].values())
        except (json.JSONDecodeError, KeyError) as err:
            raise FileNotFoundError(f"{what} directory {str(directory)!r}: unreadable {index_name!r} ({err})") from err
        missing = sorted(s for s in shards if not (directory / s).is_file())
        if missing:
            raise FileNotFoundError(
                f"{what} directory {str(directory)!r} is incomplete: missing weight shard(s) {', '.join(missing)} "
                f"listed in {index_name!r}"
            )


def _check_tokenizer_dir(directory: Path, what: str, alternatives: tuple[tuple[str, ...], ...]) -> None:
    if not directory.is_dir():
        raise FileNotFoundError(f"{what} tokenizer directory {str(directory)!r} does not exist or is not a directory")
    if any(all((directory / f).is_file() for f in files) for files in alternatives):
        return
    wanted = " or ".join("+".join(files) for files in alternatives)
    missing = sorted({f for files in alternatives for f in files if not (directory / f).is_file()})
    raise FileNotFoundError(
        f"{what} tokenizer directory {str(directory)!r} is incomplete: missing {', '.join(missing)} (needs {wanted})"
    )


def _check_max_length(max_length: int, limit: int | None, what: str) -> None:
    if max_length < 1 or (limit is not None and max_length > limit):
        bound = f"[1, {limit}]" if limit is not None else ">= 1"
        raise ValueError(f"{what} max_length must be in {bound}, got {max_length}")


def load_t5_tokenizer(directory: str | Path):
    """The T5 tokenizer (``AutoTokenizer``) from a local directory, checked first for its files."""
    from transformers import AutoTokenizer

    _check_tokenizer_dir(Path(directory), "T5", _T5_TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(Path(directory), local_files_only=True)


def load_clip_tokenizer(directory: str | Path):
    """The CLIP tokenizer (``AutoTokenizer``) from a local directory, checked first for its files."""
    from transformers import AutoTokenizer

    _check_tokenizer_dir(Path(directory), "CLIP", _CLIP_TOKENIZER_FILES)
    return AutoTokenizer.from_pretrained(Path(directory), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> ``(ids [B, L] long, mask [B, L] long)``, L = ``max_length``: special tokens added
    (T5: EOS; CLIP: BOS/EOS), truncated, padded to ``max_length`` (spec §5, §8.4)."""
    if isinstance(texts, str):
        raise ValueError("tokenize expects a list of strings, got a single str")
    _check_max_length(max_length, None, "tokenizer")
    out = tokenizer(
        list(texts),
        max_length=max_length,
        padding="max_length",
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out["input_ids"].long(), out["attention_mask"].long()


def _freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class _FrozenTextEncoder(nn.Module):
    """Shared plumbing: tokenizer, frozen HF model, fixed token length, dtype/device, no-train guard."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        super().__init__()
        self.model = _freeze(model)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> "_FrozenTextEncoder":
        if mode:
            raise ValueError(
                f"{type(self).__name__} is a frozen encoder and cannot be put in training mode (train(True)); "
                "keep it outside the module the trainer switches to training"
            )
        return super().train(False)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``(ids [B, L] long, mask [B, L] long)``, L = ``max_length`` (see :func:`tokenize`)."""
        return tokenize(self.tokenizer, texts, self.max_length)

    @classmethod
    def _load(cls, what: str, hf_class, load_tokenizer, directory, dtype, max_length, device, tokenizer_directory):
        """Check the directory, load tokenizer + HF model (local files only), check the token length."""
        directory = Path(directory)
        _check_model_dir(directory, what)
        tokenizer = load_tokenizer(tokenizer_directory if tokenizer_directory is not None else directory)
        model = hf_class.from_pretrained(directory, dtype=dtype, local_files_only=True)
        # CLIP has learned positions (a hard limit); T5's relative positions have none
        _check_max_length(max_length, getattr(model.config, "max_position_embeddings", None), what)
        if device is not None:
            model = model.to(device)
        encoder = cls(model, tokenizer, max_length)
        logger.info("loaded %s from %s (width %d, %s)", what, directory, encoder.output_dim, dtype)
        return encoder

    def _flatten(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if ids.dim() < 2:
            raise ValueError(f"token ids must be [..., L] with at least 2 dims, got shape {tuple(ids.shape)}")
        return ids.reshape(-1, ids.shape[-1]).to(device=self.device, dtype=torch.long), tuple(ids.shape[:-1])


class T5TextEncoder(_FrozenTextEncoder):
    """Frozen T5 encoder: texts -> ``last_hidden_state [B, L, C]`` + token mask (spec §5)."""

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_length: int = T5_MAX_LENGTH,
        device: torch.device | str | None = None,
        tokenizer_directory: str | Path | None = None,
    ) -> "T5TextEncoder":
        """Load from a local HF directory (e.g. a ``google/t5-v1_1-xl`` snapshot; a full encoder-decoder
        checkpoint is fine, the decoder weights are skipped). ``tokenizer_directory`` defaults to ``directory``."""
        from transformers import T5EncoderModel

        return cls._load("T5", T5EncoderModel, load_t5_tokenizer, directory, dtype, max_length, device,
                         tokenizer_directory)

    @property
    def hidden_size(self) -> int:
        return self.model.config.d_model

    output_dim = hidden_size

    @torch.no_grad()
    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``/``mask`` ``[..., L]`` -> hidden ``[..., L, C]`` in the encoder dtype (padding masked out as keys)."""
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        flat_ids, lead = self._flatten(ids)
        flat_mask = mask.reshape(flat_ids.shape).to(device=self.device, dtype=torch.long)
        with torch.autocast(device_type=self.device.type, enabled=False):
            hidden = self.model(input_ids=flat_ids, attention_mask=flat_mask).last_hidden_state
        return hidden.reshape(*lead, hidden.shape[-2], hidden.shape[-1])  # [..., L, C]

    def forward(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> ``(hidden [B, L, C], mask [B, L] long)``, both on the encoder's device."""
        ids, mask = self.tokenize(texts)
        return self.encode(ids, mask), mask.to(self.device)


class CLIPTextEncoder(_FrozenTextEncoder):
    """Frozen CLIP text tower with projection: texts -> pooled projected embedding ``[B, P]`` (spec §5)."""

    @classmethod
    def from_pretrained(
        cls,
        directory: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        max_length: int = CLIP_MAX_LENGTH,
        device: torch.device | str | None = None,
        tokenizer_directory: str | Path | None = None,
    ) -> "CLIPTextEncoder":
        """Load from a local HF directory (e.g. a ``laion/CLIP-ViT-bigG-14-laion2B-39B-b160k`` snapshot; a full
        CLIP config/checkpoint is fine, only the text tower and projection are read)."""
        from transformers import CLIPTextModelWithProjection

        return cls._load("CLIP", CLIPTextModelWithProjection, load_clip_tokenizer, directory, dtype, max_length,
                         device, tokenizer_directory)

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    output_dim = projection_dim

    @torch.no_grad()
    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [..., L]`` -> pooled ``text_embeds [..., P]`` in the encoder dtype; no attention mask (spec §5)."""
        flat_ids, lead = self._flatten(ids)
        with torch.autocast(device_type=self.device.type, enabled=False):
            pooled = self.model(input_ids=flat_ids).text_embeds  # [N, P]
        return pooled.reshape(*lead, pooled.shape[-1])

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> pooled ``[B, P]`` on the encoder's device."""
        ids, _ = self.tokenize(texts)
        return self.encode(ids)
