"""Skiparse regrouping (spec §2.6): permutations, inverses, padding, masks, and the joint attention
against explicit attention over the same index groups."""

import itertools

import pytest
import torch

from mm.models import skiparse
from mm.models.attention import joint_attention


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spec_subsequence(s: int, k: int, group: bool) -> tuple[int, int]:
    """(sub-sequence, position) of padded token s, written out from the spec's formulas."""
    if group:
        n, rem = divmod(s, k * k)
        m, j = divmod(rem, k)
        return m, n * k + j
    return s % k, s // k


LENGTHS = [1, 5, 7, 16, 63, 64, 65, 105]  # odd grids, exact multiples and one-past


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("length", LENGTHS)
def test_permutation_matches_spec_and_inverts(k, group, length):
    B, E = 3, 2
    Lp = skiparse.padded_length(length, k)
    assert Lp % (k * k) == 0 and 0 <= Lp - length < k * k
    x = torch.randn(length, B, E)
    xb = skiparse.to_batch(x, k, group)
    assert xb.shape == (k * B, Lp // k, E)
    for s in range(Lp):
        r, pos = _spec_subsequence(s, k, group)
        for b in range(B):
            expect = x[s, b] if s < length else torch.zeros(E)
            assert torch.equal(xb[r * B + b, pos], expect), (s, b)
    assert torch.equal(skiparse.from_batch(xb, k, group, length), x)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("group", [False, True])
def test_subsequence_indices_partition(k, group):
    length = 77
    idx = skiparse.subsequence_indices(length, k, group)
    Lp = skiparse.padded_length(length, k)
    assert sorted(idx.flatten().tolist()) == list(range(Lp))
    for r, pos in itertools.product(range(k), range(Lp // k)):
        assert _spec_subsequence(int(idx[r, pos]), k, group) == (r, pos)
    # to_batch applied to the positions themselves reproduces the index table
    pos = torch.arange(length)[:, None]
    got = skiparse.to_batch(pos, k, group, pad_value=-1)[:, :]
    want = torch.where(idx < length, idx, torch.full_like(idx, -1))
    assert torch.equal(got, want)


def test_key_padding_mask_layout():
    B, Lv, Lt, k = 2, 10, 3, 2  # L' = 12: two padded rows
    video_keep = torch.ones(B, Lv, dtype=torch.bool)
    video_keep[1, 3] = False
    text_keep = torch.tensor([[True, True, False], [True, False, False]])
    mask = skiparse.key_padding_mask(video_keep, text_keep, k, group=False)
    assert mask.shape == (k * B, 12 // k + Lt)
    idx = skiparse.subsequence_indices(Lv, k, False)
    for r, b in itertools.product(range(k), range(B)):
        row = mask[r * B + b]
        for pos in range(12 // k):
            s = int(idx[r, pos])
            assert bool(row[pos]) == (s < Lv and bool(video_keep[b, s]))
        assert torch.equal(row[12 // k:], text_keep[b])
    # a row without any valid key is fully unmasked (upstream's additive -10000 bias => uniform)
    dead = skiparse.key_padding_mask(torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool), 1, False)
    assert dead.all()


def _explicit_reference(q, k, v, qt, kt, vt, video_keep, text_keep, sparse_k, group, scale):
    """Attention computed group by group from the index sets, in float64, no regrouping code involved."""
    Lv, B, H, hd = q.shape
    Lt = kt.shape[0]
    out_v = torch.zeros(Lv, B, H, hd, dtype=torch.float64)
    out_t = torch.zeros(Lt, B, H, hd, dtype=torch.float64)
    Lp = skiparse.padded_length(Lv, sparse_k)
    for r in range(sparse_k):
        members = [s for s in range(Lp) if _spec_subsequence(s, sparse_k, group)[0] == r and s < Lv]
        for b in range(B):
            kk = torch.cat([k[members, b], kt[:, b]]).double()  # [n + Lt, H, hd]
            vv = torch.cat([v[members, b], vt[:, b]]).double()
            qq = torch.cat([q[members, b], qt[:, b]]).double()
            valid = torch.cat([video_keep[b, members], text_keep[b]])
            logits = torch.einsum("qhd,khd->hqk", qq, kk) * scale
            logits = logits.masked_fill(~valid[None, None, :], float("-inf"))
            o = torch.einsum("hqk,khd->qhd", logits.softmax(-1), vv)
            out_v[members, b] = o[: len(members)]
            out_t[:, b] += o[len(members):] / sparse_k
    return out_v, out_t


@pytest.mark.parametrize("sparse_k,group", [(1, False), (2, False), (2, True), (4, False), (4, True), (8, True)])
def test_joint_attention_equals_explicit_groups(sparse_k, group):
    torch.manual_seed(0)
    Lv, Lt, B, H, hd = 45, 5, 2, 2, 8  # 45 tokens: padded for every k > 1
    q, k, v = (torch.randn(Lv, B, H, hd) for _ in range(3))
    qt, kt, vt = (torch.randn(Lt, B, H, hd) for _ in range(3))
    video_keep = torch.rand(B, Lv) > 0.2
    text_keep = torch.tensor([[True] * Lt, [True, True, False, False, False]])
    mask = skiparse.key_padding_mask(video_keep, text_keep, sparse_k, group)
    scale = hd ** -0.5
    got_v, got_t = joint_attention(q, k, v, qt, kt, vt, sparse_k=sparse_k, group=group, key_mask=mask, scale=scale)
    ref_v, ref_t = _explicit_reference(q, k, v, qt, kt, vt, video_keep, text_keep, sparse_k, group, scale)
    torch.testing.assert_close(got_v.double(), ref_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t.double(), ref_t, rtol=1e-5, atol=1e-5)
    # without text queries (last block): same video output, no text output
    only_v, none_t = joint_attention(q, k, v, None, kt, vt, sparse_k=sparse_k, group=group, key_mask=mask, scale=scale)
    assert none_t is None
    torch.testing.assert_close(only_v, got_v, rtol=1e-6, atol=1e-6)
