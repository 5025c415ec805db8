"""SparseUMMDiT against an independent float64 re-derivation of spec §2.2-§2.9, written from the spec text
with explicit index sets (no code shared with the model beyond the state dict keys)."""

import math

import pytest
import torch
import torch.nn.functional as F

from mm.models import SparseUMMDiT
from suv_testing import random_inputs, random_state_dict, tiny_config


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _sub(s, k, group):  # spec §2.6
    return (s // k) % k if group else s % k


def _lin(sd, name, x, bias=True):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if bias else y


def _ln(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, hd):
    """x [N, H, hd], pos [N, 3] integer grid positions; chunks (t, h, w) = hd/16 * (4, 6, 6), rotate-half."""
    widths = [hd // 16 * 4, hd // 16 * 6, hd // 16 * 6]
    out, start = [], 0
    for axis, d in enumerate(widths):
        u = x[..., start:start + d]
        j = torch.arange(d // 2, dtype=torch.float64)
        theta = pos[:, axis, None].double() * 10000.0 ** (-2 * j / d)  # [N, d/2]
        cos = torch.cat([theta.cos(), theta.cos()], -1)[:, None]
        sin = torch.cat([theta.sin(), theta.sin()], -1)[:, None]
        u1, u2 = u[..., : d // 2], u[..., d // 2:]
        out.append(u * cos + torch.cat([-u2, u1], -1) * sin)
        start += d
    return torch.cat(out, -1)


def reference_forward(sd, cfg, latents, timestep, text, text_mask, pooled, video_mask, sparse_n):
    sd = {k: v.double() for k, v in sd.items()}
    latents, text, pooled = latents.double(), text.double(), pooled.double()
    B, C, T, H, W = latents.shape
    p, D, nh, hd, eps = cfg.patch_size, cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.norm_eps
    hp, wp = H // p, W // p
    Lv, Lt = T * hp * wp, text.shape[1]
    # patch embedding, token s = (ti*hp + hi)*wp + wi
    x = torch.zeros(B, Lv, D, dtype=torch.float64)
    pos = torch.zeros(Lv, 3, dtype=torch.long)
    for ti in range(T):
        frame = F.conv2d(latents[:, :, ti], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
        for hi in range(hp):
            for wi in range(wp):
                s = (ti * hp + hi) * wp + wi
                x[:, s] = frame[:, :, hi, wi]
                pos[s] = torch.tensor([ti, hi, wi])
    # masks: a patch is valid if any of its latent pixels is
    vkeep = torch.ones(B, Lv, dtype=torch.bool)
    if video_mask is not None:
        for s in range(Lv):
            ti, hi, wi = pos[s].tolist()
            vkeep[:, s] = video_mask[:, ti, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p].flatten(1).amax(1) > 0
    tkeep = text_mask.bool()
    # conditioning
    half = cfg.timestep_embed_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    e = torch.cat([torch.cos(timestep.double()[:, None] * freqs), torch.sin(timestep.double()[:, None] * freqs)], -1)
    temb = _lin(sd, "time_text_embed.timestep_embedder.linear_2",
                F.silu(_lin(sd, "time_text_embed.timestep_embedder.linear_1", e)))
    tpool = _lin(sd, "time_text_embed.text_embedder.linear_2", F.silu(_lin(sd, "time_text_embed.text_embedder.linear_1", pooled)))
    c = temb + tpool
    y = _lin(sd, "caption_projection", text)

    def block(P, x, y, k, group, last):
        sh, sc, g, sh_t, sc_t, g_t = _lin(sd, P + "norm1.linear", F.silu(c)).chunk(6, -1)
        xn = _ln(sd, P + "norm1.norm", x, eps) * (1 + sc[:, None]) + sh[:, None]
        yn = _ln(sd, P + "norm1.norm_enc", y, eps) * (1 + sc_t[:, None]) + sh_t[:, None]
        heads = lambda t: t.reshape(*t.shape[:2], nh, hd)
        q = _rms(heads(_lin(sd, P + "attn1.to_q", xn)), sd[P + "attn1.norm_q.weight"], eps)
        kk = _rms(heads(_lin(sd, P + "attn1.to_k", xn)), sd[P + "attn1.norm_k.weight"], eps)
        v = heads(_lin(sd, P + "attn1.to_v", xn))
        qt = _rms(heads(_lin(sd, P + "attn1.add_q_proj", yn)), sd[P + "attn1.norm_added_q.weight"], eps)
        kt = _rms(heads(_lin(sd, P + "attn1.add_k_proj", yn)), sd[P + "attn1.norm_added_k.weight"], eps)
        vt = heads(_lin(sd, P + "attn1.add_v_proj", yn))
        ov = torch.zeros_like(q)
        ot = torch.zeros_like(qt)
        for b in range(B):
            qb, kb = _rope(q[b], pos, hd), _rope(kk[b], pos, hd)
            for r in range(k):
                members = [s for s in range(Lv) if _sub(s, k, group) == r]
                Q = torch.cat([qb[members], qt[b]])
                K = torch.cat([kb[members], kt[b]])
                V = torch.cat([v[b, members], vt[b]])
                valid = torch.cat([vkeep[b, members], tkeep[b]])
                logits = torch.einsum("qhd,khd->hqk", Q, K) / math.sqrt(hd)
                o = torch.einsum("hqk,khd->qhd", logits.masked_fill(~valid, float("-inf")).softmax(-1), V)
                ov[b, members] = o[: len(members)]
                ot[b] += o[len(members):] / k
        x = x + g[:, None] * _lin(sd, P + "attn1.to_out.0", ov.reshape(B, Lv, D))
        if not last:
            y = y + g_t[:, None] * _lin(sd, P + "attn1.to_add_out", ot.reshape(B, Lt, D))
        sh, sc, g, sh_t, sc_t, g_t = _lin(sd, P + "norm2.linear", F.silu(c)).chunk(6, -1)
        ffn = lambda name, u: _lin(sd, name + ".net.2", F.gelu(_lin(sd, name + ".net.0.proj", u, False),
                                                              approximate="tanh"), False)
        x = x + g[:, None] * ffn(P + "ff", _ln(sd, P + "norm2.norm", x, eps) * (1 + sc[:, None]) + sh[:, None])
        if not last:
            y = y + g_t[:, None] * ffn(P + "ff_enc", _ln(sd, P + "norm2.norm_enc", y, eps) * (1 + sc_t[:, None]) + sh_t[:, None])
        return x, y

    n_st = len(cfg.num_layers)
    mid = n_st // 2
    skips = []
    for s in range(n_st):
        if s > mid:
            xs, ys = skips.pop()
            x = _lin(sd, f"skip_norm_linear.{s - mid - 1}.1", torch.cat([x, xs], -1))
            y = _lin(sd, f"skip_norm_linear_enc.{s - mid - 1}.1", torch.cat([y, ys], -1))
        for i in range(cfg.num_layers[s]):
            last = s == n_st - 1 and i == cfg.num_layers[s] - 1
            x, y = block(f"transformer_blocks.{s}.{i}.", x, y, sparse_n[s], i % 2 == 1, last)
        if s < mid:
            skips.append((x, y))
    x = _ln(sd, "norm_final", x, eps)
    shift, scale = _lin(sd, "norm_out.linear", F.silu(c)).chunk(2, -1)
    x = _ln(sd, "norm_out.norm", x, eps) * (1 + scale[:, None]) + shift[:, None]
    feat = _lin(sd, "proj_out", x)  # [B, Lv, p*p*C]
    Cout = cfg.out_channels
    out = torch.zeros(B, Cout, T, H, W, dtype=torch.float64)
    for s in range(Lv):
        ti, hi, wi = pos[s].tolist()
        for a in range(p):
            for bb in range(p):
                f0 = (a * p + bb) * Cout
                out[:, :, ti, hi * p + a, wi * p + bb] = feat[:, s, f0:f0 + Cout]
    return out


@pytest.mark.parametrize("sparse_n", [[1, 2, 4, 4, 4, 2, 1], [1, 1, 1, 1, 1, 1, 1], [2, 4, 3, 8, 1, 2, 4]])
def test_forward_matches_spec_reference(sparse_n):
    cfg = tiny_config()
    model = SparseUMMDiT(cfg)
    sd = random_state_dict(model, seed=1)
    model.load_state_dict(sd)
    model.set_sparsity(sparse_n)
    inputs = random_inputs(cfg, seed=2)
    with torch.no_grad():
        got = model(*inputs)
    ref = reference_forward(sd, cfg, *inputs, sparse_n=sparse_n)
    assert got.shape == ref.shape == inputs[0].shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)
