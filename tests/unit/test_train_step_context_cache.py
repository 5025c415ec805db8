"""The per-forward caches of ``AttentionContext`` (mm.models.attention): what a cached entry holds is what the
blocks would otherwise rebuild, and a second request returns the cached tensors (no rebuild per block)."""

import pytest
import torch

from mm.distributed import skiparse_cp
from mm.distributed.context_parallel import CPContext
from mm.models import skiparse
from mm.models.attention import AttentionContext


def _context(cp_size: int, rank: int, video_len: int, head_dim: int = 8) -> AttentionContext:
    full_cos = torch.randn(video_len, 1, 1, head_dim)
    full_sin = torch.randn(video_len, 1, 1, head_dim)
    cp = CPContext(None, cp_size, rank, skiparse=True)
    return AttentionContext(cos=full_cos, sin=full_sin, chunks=(2, 2, 4), video_len=video_len, text_len=4, cp=cp,
                            full_cos=full_cos, full_sin=full_sin)


@pytest.mark.parametrize("cp_size,k", [(2, 2), (2, 4), (4, 4)])
@pytest.mark.parametrize("group", [False, True])
def test_subsequence_rope_is_the_rank_tokens_tables(cp_size, k, group):
    """Each rank's tables are the full tables at the padded-sequence index of its local tokens (in local order),
    and the ranks together cover every token once."""
    video_len = 2 * cp_size * k * k
    layout = skiparse_cp.Layout(k, group)
    seen = []
    for rank in range(cp_size):
        ctx = _context(cp_size, rank, video_len)
        cos, sin = ctx.subsequence_rope(layout)
        ids = skiparse.subsequence_indices(video_len, k, group).reshape(cp_size, -1)[rank]
        assert torch.equal(cos, ctx.full_cos[ids]) and torch.equal(sin, ctx.full_sin[ids])
        seen.append(ids)
    assert sorted(torch.cat(seen).tolist()) == list(range(video_len))


def test_subsequence_rope_is_built_once_per_layout():
    ctx = _context(2, 1, 32)
    single, group = skiparse_cp.Layout(4, False), skiparse_cp.Layout(4, True)
    first = ctx.subsequence_rope(single)
    again = ctx.subsequence_rope(single)
    assert again[0] is first[0] and again[1] is first[1]
    other = ctx.subsequence_rope(group)
    assert not torch.equal(other[0], first[0])  # a different layout holds different tokens


def test_key_mask_is_built_once_per_pattern():
    ctx = _context(1, 0, 32)
    ctx.text_keep = torch.tensor([[True, True, False, False]])
    mask = ctx.key_mask(4, True, 1, "cpu")
    assert ctx.key_mask(4, True, 1, "cpu") is mask
    assert ctx.key_mask(4, False, 1, "cpu") is not mask
