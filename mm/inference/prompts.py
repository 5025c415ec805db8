"""Prompts for batch inference: prompt files, the v1.5 text templates, data-parallel sharding, file names.

Spec §9.2 steps 1-2: the positive text is ``"high quality, {prompt}"``, the negative text the fixed v1.5
negative prompt followed by the user's negative prompt; both go through the training caption cleaning
(lower-cased; it also removes the template whitespace upstream carried, spec §12.34). Spec §9.3: prompts
are distributed over data-parallel replicas in micro-batches, batch ``b`` to replica ``b % DP``; the
batches are formed from the global prompt order, so a prompt's batch does not depend on the DP size.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from mm.data.captions import clean_caption

POSITIVE_TEMPLATE = "high quality, {prompt}"
# Spec §9.2, without upstream's embedded newlines/indentation.
DEFAULT_NEGATIVE_PROMPT = (
    "Worst quality, Normal quality, Low quality, Low res, Blurry, Jpeg artifacts, Grainy, watermark, banner, "
    "Cropped, Out of frame, Out of focus, Bad anatomy, Bad proportions, Deformed, Disconnected limbs, "
    "Disfigured, username, error, sketch, duplicate, ugly, monochrome, horror, geometry, mutation, disgusting, "
    "overexposed, underexposed."
)
MAX_SLUG_CHARS = 48


def read_prompt_file(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are ignored. ValueError when the file
    is missing, unreadable as UTF-8 or holds no prompt."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"prompt file {str(p)!r} does not exist")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompt file {str(p)!r} is not UTF-8 text: {err}") from None
    prompts = [line.strip() for line in lines]
    prompts = [t for t in prompts if t and not t.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {str(p)!r} holds no prompt (only blank lines and # comments)")
    return prompts


def resolve_prompts(prompt: str | None = None, prompt_file: str | None = None,
                    config_prompt: str | None = None) -> list[str]:
    """The prompt list: ``prompt`` (one literal prompt) wins over ``prompt_file``, which wins over the
    inference JSON's ``prompt`` entry (a file if it exists, else a literal prompt, as upstream)."""
    if prompt is not None:
        if not prompt.strip():
            raise ValueError("--prompt is empty")
        return [prompt.strip()]
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    if config_prompt:
        if os.path.isfile(config_prompt):
            return read_prompt_file(config_prompt)
        return [config_prompt.strip()]
    raise ValueError("no prompt given: pass --prompt or --prompt-file (or set \"prompt\" in the inference JSON)")


def positive_text(prompt: str, template: str = POSITIVE_TEMPLATE) -> str:
    """The text the DiT is conditioned on for ``prompt`` (template + caption cleaning)."""
    if "{prompt}" not in template:
        raise ValueError(f"prompt template must contain '{{prompt}}', got {template!r}")
    return clean_caption(template.format(prompt=prompt))


def negative_text(user_negative: str = "", default: str = DEFAULT_NEGATIVE_PROMPT) -> str:
    """The unconditional text: the default negative prompt (v1.5's unless a model says otherwise), then the
    user's, cleaned. Empty = the empty caption the CFG dropout trained."""
    return clean_caption(f"{default} {user_negative}".strip())


def batches(num_prompts: int, batch_size: int) -> list[list[int]]:
    """Global micro-batches of prompt indices, in prompt order (the last one may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    return [list(range(s, min(s + batch_size, num_prompts))) for s in range(0, num_prompts, batch_size)]


def shard(num_prompts: int, batch_size: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This replica's micro-batches: global batch ``b`` goes to replica ``b % dp_size`` (spec §9.3)."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
    return batches(num_prompts, batch_size)[dp_rank::dp_size]


def slugify(prompt: str, max_chars: int = MAX_SLUG_CHARS) -> str:
    """A file-name-safe short form of a prompt: lower-case ASCII words joined by ``_`` ("prompt" if empty)."""
    text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii").lower()
    words = re.findall(r"[a-z0-9]+", text)
    slug = ""
    for w in words:
        cand = f"{slug}_{w}" if slug else w
        if len(cand) > max_chars:
            break
        slug = cand
    return slug or (words[0][:max_chars] if words else "prompt")


def output_stem(index: int, prompt: str) -> str:
    """``<index>_<slug>``: the index keeps names unique and sorted in prompt order."""
    return f"{index:04d}_{slugify(prompt)}"


__all__ = [
    "POSITIVE_TEMPLATE", "DEFAULT_NEGATIVE_PROMPT", "read_prompt_file", "resolve_prompts", "positive_text",
    "negative_text", "batches", "shard", "slugify", "output_stem",
]
