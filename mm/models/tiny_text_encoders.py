"""Tiny, real, loadable T5 and CLIP text-encoder directories for tests and the no-download demo.

Spec §5 names ``google/t5-v1_1-xl`` (encoder) and the CLIP-ViT-bigG-14 text tower with projection.
Those cannot be downloaded here, so these helpers write directories with the *same Hugging Face layout*
(tokenizer files + ``config.json`` + ``model.safetensors``) at toy sizes, with tokenizers trained on a
caller-given corpus, so that :class:`mm.models.text_encoders.T5TextEncoder` and
:class:`~mm.models.text_encoders.CLIPTextEncoder` load them through exactly the path real users take
(``AutoTokenizer`` / ``T5EncoderModel`` / ``CLIPTextModelWithProjection``).

* T5: a sentencepiece BPE model (pad 0, eos 1, unk 2, as T5) trained on the corpus plus the
  lower-case ASCII alphabet, digits and common punctuation, so any cleaned caption tokenises without
  ``<unk>``; a gated-GELU T5 v1.1-style config.
* CLIP: a byte-level BPE in CLIP's format (``vocab.json`` with the 256 byte symbols, their ``</w>``
  word-final variants, learned merges, then ``<|startoftext|>``/``<|endoftext|>``; ``merges.txt``),
  merges learned from the corpus, so corpus words become single tokens and any text remains encodable.

Weights are random (seeded, without touching the global RNG): the encoders are frozen feature
extractors, so tests and the demo only need them to be deterministic and text-dependent.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import re
import string
from pathlib import Path
from typing import Iterable

import torch

logger = logging.getLogger(__name__)

# Extra lines fed to the tokenizer trainers so every lower-case ASCII caption is covered.
_ALPHABET_LINES = (
    string.ascii_lowercase,
    " ".join(string.ascii_lowercase),
    string.digits + " " + " ".join(string.digits),
    " ".join(".,;:!?'\"-_+()[]{}<>/\\|@#$%^&*=~`"),
)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
# Same split as CLIP's tokenizer for lower-case text: contractions, letter runs, single digits, other runs.
_CLIP_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def _check_corpus(corpus: Iterable[str]) -> list[str]:
    lines = [str(t).strip().lower() for t in corpus]
    lines = [t for t in lines if t]
    if not lines:
        raise ValueError("corpus must contain at least one non-empty string")
    return lines


def _fresh_init(seed: int, build):
    """Build a model with random init seeded by ``seed`` without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def write_tiny_t5(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    d_ff: int = 64,
    vocab_size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny T5 encoder directory (tokenizer + config + weights) and return its path.

    ``vocab_size`` is a soft limit for sentencepiece: a small corpus yields fewer pieces.
    """
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    if d_model % num_heads != 0:
        raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
    if vocab_size < 100:
        raise ValueError(f"vocab_size must be >= 100 to hold the base alphabet, got {vocab_size}")
    lines = _check_corpus(corpus) + list(_ALPHABET_LINES)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    sp_model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=sp_model,
        model_type="bpe",  # unigram keeps few multi-character pieces on a corpus this small
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    spiece = out / "spiece.model"
    spiece.write_bytes(sp_model.getvalue())
    # add_prefix_space makes the fast tokenizer prepend "▁" to the first word, as the slow one and the
    # released t5-v1_1 tokenizer do.
    # (transformers logs a warning that this forces a slow->fast conversion; that is the intent here.)
    t5_fast_logger = logging.getLogger("transformers.models.t5.tokenization_t5_fast")
    level = t5_fast_logger.level
    t5_fast_logger.setLevel(logging.ERROR)
    try:
        tokenizer = T5TokenizerFast(
            vocab_file=str(spiece), extra_ids=0, model_max_length=512, legacy=False, add_prefix_space=True
        )
    finally:
        t5_fast_logger.setLevel(level)
    tokenizer.save_pretrained(out)

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_decoder_layers=0,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    model = _fresh_init(seed, lambda: T5EncoderModel(config))
    model.save_pretrained(out, safe_serialization=True)
    logger.info("wrote tiny T5 (vocab %d, d_model %d) to %s", len(tokenizer), d_model, out)
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode symbol table (printable bytes map to themselves)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_bpe_merges(words: collections.Counter, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE on word counts; word symbols are byte symbols with ``</w>`` on the last one."""
    byte_sym = _bytes_to_unicode()
    seqs: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        syms = [byte_sym[b] for b in word.encode("utf-8")]
        syms[-1] += "</w>"
        seqs[tuple(syms)] = seqs.get(tuple(syms), 0) + count
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter = collections.Counter()
        for syms, count in seqs.items():
            for pair in zip(syms, syms[1:]):
                pairs[pair] += count
        if not pairs:
            break
        # Most frequent pair; ties broken lexicographically so the result is deterministic.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_seqs: dict[tuple[str, ...], int] = {}
        for syms, count in seqs.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + count
        seqs = new_seqs
    return merges


def write_tiny_clip(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    hidden: int = 32,
    projection_dim: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate: int = 64,
    max_merges: int = 1000,
    max_length: int = 77,
    seed: int = 0,
) -> Path:
    """Write a tiny CLIP text-tower-with-projection directory (tokenizer + config + weights); return its path.

    BPE merges are learned from the corpus until every corpus word is one token (or ``max_merges``).
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, CLIPTokenizerFast

    if hidden % num_heads != 0:
        raise ValueError(f"hidden ({hidden}) must be divisible by num_heads ({num_heads})")
    lines = _check_corpus(corpus)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    words = collections.Counter(w for line in lines for w in _CLIP_WORD_RE.findall(line))
    merges = _learn_bpe_merges(words, max_merges)
    byte_syms = list(_bytes_to_unicode().values())
    tokens = byte_syms + [s + "</w>" for s in byte_syms] + [a + b for a, b in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")

    # CLIP pads with the EOS token; EOS has the highest id, as in the released vocabularies.
    special = dict(bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS, pad_token=CLIP_EOS)
    slow = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length, **special)
    slow.save_pretrained(out)
    fast = CLIPTokenizerFast.from_pretrained(out, local_files_only=True)
    fast.save_pretrained(out)

    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=intermediate,
        projection_dim=projection_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_length,
        hidden_act="gelu",
        bos_token_id=vocab[CLIP_BOS],
        eos_token_id=vocab[CLIP_EOS],
        pad_token_id=vocab[CLIP_EOS],
    )
    model = _fresh_init(seed, lambda: CLIPTextModelWithProjection(config))
    model.save_pretrained(out, safe_serialization=True)
    logger.info("wrote tiny CLIP (vocab %d, %d merges, hidden %d) to %s", len(vocab), len(merges), hidden, out)
    return out
