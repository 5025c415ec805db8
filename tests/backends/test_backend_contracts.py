"""The cuda and npu kernel wrappers on CPU, against fakes of the libraries they call (tests/backends/fakes).

Each fake implements its library's documented contract (layouts, dtypes, mask polarity, varlen
cu_seqlens / actual_seq_*len, return tuples) with plain fp32 math and rejects what the real library
rejects; the wrappers' outputs (and gradients) are compared with ``mm.ops.reference``. A wrapper that
passes the wrong layout, the wrong mask polarity or a dense mask where a packed one is expected fails
here; ``test_flipped_npu_mask_polarity_is_caught`` shows that the comparison notices a polarity flip.
"""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

import pytest
import torch

from mm.ops import reference

FAKES = pathlib.Path(__file__).resolve().parent / "fakes"
FAKE_MODULES = ("fakes_math", "fakes_aten", "flash_attn", "apex", "torch_npu", "transformer_engine",
                "transformer_engine_torch", "mindspeed")


def _drop(prefixes):
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            del sys.modules[name]


@pytest.fixture
def fake_libs(monkeypatch):
    """Fakes importable; fresh ``mm.ops.cuda``/``mm.ops.npu`` built against them; everything removed after."""
    monkeypatch.syspath_prepend(str(FAKES))
    _drop(FAKE_MODULES + ("mm.ops.cuda", "mm.ops.npu"))
    cuda = importlib.import_module("mm.ops.cuda")
    npu = importlib.import_module("mm.ops.npu")
    yield cuda, npu, sys.modules["flash_attn"], sys.modules["torch_npu"]
    _drop(FAKE_MODULES + ("mm.ops.cuda", "mm.ops.npu"))


def _qkv(dtype, b=2, sq=6, sk=9, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g).to(dtype).requires_grad_() for s in (sq, sk, sk)]


def _mask():
    # not a prefix (SUV keys: valid video tokens, then valid caption tokens), and different per sample
    return torch.tensor([[True, True, False, True, True, True, False, False, True],
                         [True, False, True, True, False, True, True, True, True]])


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _compare_with_grads(fn, q, k, v, mask, scale, tol):
    """Output and q/k/v gradients of ``fn`` equal the reference's (same upstream gradient)."""
    out = fn(q, k, v, mask, scale)
    ref = reference.attention(q, k, v, mask, scale)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.dtype)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    return out


# ---------------------------------------------------------------------------------------------- cuda
@pytest.mark.parametrize("masked", [True, False], ids=["key_mask", "no_mask"])
def test_cuda_attention_uses_flash_and_matches_reference(fake_libs, masked):
    cuda, _, flash, _ = fake_libs
    q, k, v = _qkv(torch.bfloat16)
    before = dict(flash.calls)
    _compare_with_grads(cuda.attention, q, k, v, _mask() if masked else None, 0.3, TOL[torch.bfloat16])
    used = "flash_attn_varlen_func" if masked else "flash_attn_func"
    assert flash.calls[used] == before[used] + 1  # the fast path ran, not the SDPA fallback


def test_cuda_attention_masked_keys_have_no_influence(fake_libs):
    cuda, *_ = fake_libs
    q, k, v = (t.detach() for t in _qkv(torch.bfloat16))
    mask = _mask()
    out = cuda.attention(q, k, v, mask, None)
    v2 = v.clone()
    v2[~mask] = 100.0  # garbage in padded keys
    torch.testing.assert_close(cuda.attention(q, k, v2, mask, None), out, atol=0, rtol=0)


def test_cuda_attention_fp32_takes_sdpa_and_says_why(fake_libs, caplog):
    cuda, _, flash, _ = fake_libs
    q, k, v = _qkv(torch.float32)
    before = dict(flash.calls)
    with caplog.at_level("INFO", logger="mm.ops.cuda"):
        _compare_with_grads(cuda.attention, q, k, v, _mask(), None, TOL[torch.float32])
    assert flash.calls == before
    assert "flash-attn needs fp16/bf16" in caplog.text


def test_cuda_attention_rejects_bad_mask(fake_libs):
    cuda, *_ = fake_libs
    q, k, v = _qkv(torch.bfloat16)
    with pytest.raises(ValueError, match=r"key_mask must be bool \[B, Sk\]"):
        cuda.attention(q, k, v, _mask().float(), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_cuda_norms_via_apex_match_reference(fake_libs, monkeypatch, dtype, affine):
    cuda, *_ = fake_libs
    monkeypatch.setattr(cuda, "_tex", None)  # apex is used when Transformer Engine is not installed
    g = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(2, 5, 32, generator=g) + 1).to(dtype)
    w = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype) if affine else None
    b = (0.1 * torch.randn(32, generator=g)).to(dtype) if affine else None
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(cuda.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **tol)
    torch.testing.assert_close(cuda.layer_norm(x, w, b, 1e-5), reference.layer_norm(x, w, b, 1e-5), **tol)
    assert cuda._apex_norm is sys.modules["apex.normalization.fused_layer_norm"]


def test_cuda_norm_with_fp32_weight_on_bf16_input_avoids_apex(fake_libs, caplog):
    cuda, *_ = fake_libs
    x = torch.randn(3, 16).to(torch.bfloat16)
    w = torch.rand(16) + 0.5  # fp32: apex would reject the mix
    with caplog.at_level("INFO", logger="mm.ops.cuda"):
        torch.testing.assert_close(cuda.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    assert "weight dtype differs" in caplog.text


# ---------------------------------------------------------------------------------------------- cuda: choice
def _reimport_cuda(monkeypatch, choice, hide=()):
    """``mm.ops.cuda`` imported again under ``MM_CUDA_ATTENTION=choice``, with the libraries in ``hide`` absent."""
    monkeypatch.setenv("MM_CUDA_ATTENTION", choice)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hide else real(name, *a))
    _drop(("mm.ops.cuda",))
    return importlib.import_module("mm.ops.cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sdpa_choice_matches_explicit_softmax_and_skips_flash(fake_libs, monkeypatch, caplog, dtype):
    """MM_CUDA_ATTENTION=sdpa: torch SDPA with the boolean key mask equals softmax over the allowed keys."""
    _, _, flash, _ = fake_libs
    from fakes_math import attention_fp32

    with caplog.at_level("INFO", logger="mm.ops.cuda"):
        cuda = _reimport_cuda(monkeypatch, "sdpa")
        q, k, v = _qkv(dtype)
        mask = _mask()
        before = dict(flash.calls)
        out = cuda.attention(q, k, v, mask, 0.3)
    assert flash.calls == before and "MM_CUDA_ATTENTION=sdpa" in caplog.text
    want = torch.stack([attention_fp32(q[b], k[b], v[b], 0.3, mask[b][None, :].expand(q.shape[1], -1))
                        for b in range(q.shape[0])])
    torch.testing.assert_close(out.float(), want, **TOL[dtype])
    _compare_with_grads(cuda.attention, q, k, v, mask, 0.3, TOL[dtype])
    assert set(cuda.attention_impls()) == {"sdpa", "flash"}  # the timing table still measures both


def test_cuda_attention_choice_is_validated(fake_libs, monkeypatch):
    with pytest.raises(ValueError, match="MM_CUDA_ATTENTION must be one of"):
        _reimport_cuda(monkeypatch, "cudnn")
    with pytest.raises(ImportError, match="MM_CUDA_ATTENTION=flash but flash_attn is not installed"):
        _reimport_cuda(monkeypatch, "flash", hide=("flash_attn",))
    cuda = _reimport_cuda(monkeypatch, "auto", hide=("flash_attn",))
    assert set(cuda.attention_impls()) == {"sdpa"}


# ---------------------------------------------------------------------------------------------- cuda: TE
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_cuda_norms_via_transformer_engine_match_reference(fake_libs, dtype, affine):
    """TE's norm kernels (preferred over apex) through our autograd function: outputs and gradients."""
    cuda, *_ = fake_libs
    tex = sys.modules["transformer_engine_torch"]
    g = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(2, 5, 32, generator=g) + 1).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(32, generator=g)).to(dtype).requires_grad_() if affine else None
    b = (0.1 * torch.randn(32, generator=g)).to(dtype).requires_grad_() if affine else None
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    gy = torch.randn(2, 5, 32, generator=g).to(dtype)
    leaves = [t for t in (x, w, b) if t is not None]
    for name, got_fn, ref_fn, args in (
        ("rmsnorm", cuda.rms_norm, reference.rms_norm, (w, 1e-6)),
        ("layernorm", cuda.layer_norm, reference.layer_norm, (w, b, 1e-5)),
    ):
        n_fwd, n_bwd = tex.calls[f"{name}_fwd"], tex.calls[f"{name}_bwd"]
        got, ref = got_fn(x, *args), ref_fn(x, *args)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        torch.testing.assert_close(got, ref, **tol)
        used = [t for t in leaves if name == "layernorm" or t is not b]
        for a, r in zip(torch.autograd.grad(got, used, gy), torch.autograd.grad(ref, used, gy)):
            torch.testing.assert_close(a.float(), r.float(), **tol)
        assert (tex.calls[f"{name}_fwd"], tex.calls[f"{name}_bwd"]) == (n_fwd + 1, n_bwd + 1)


def _rope_tables(chunks, s, layout):
    """cos/sin of per-chunk angles ``[theta_0..theta_{c/2-1}] * 2`` (mm/models/rope.py), [S,1,1,D] or [1,S,1,D]."""
    g = torch.Generator().manual_seed(8)
    halves = [torch.rand(s, c // 2, generator=g) * 6 for c in chunks]
    angles = torch.cat([torch.cat([a, a], -1) for a in halves], -1)
    angles = angles[:, None, None] if layout == "sbhd" else angles[None, :, None]
    return angles, angles.cos(), angles.sin()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["sbhd", "bshd"])
def test_cuda_chunked_rope_via_transformer_engine_matches_reference(fake_libs, dtype, layout):
    cuda, *_ = fake_libs
    te_rope = sys.modules["transformer_engine.pytorch.attention.rope"]
    chunks = (4, 6, 6)
    g = torch.Generator().manual_seed(9)
    shape = (5, 2, 3, 16) if layout == "sbhd" else (2, 5, 3, 16)  # the model calls it with [S, B, H, D]
    x = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    _, cos, sin = _rope_tables(chunks, 5, layout)
    n = te_rope.calls["fused"]
    got, ref = cuda.apply_rope(x, cos, sin, chunks), reference.apply_rope(x, cos, sin, chunks)
    assert te_rope.calls["fused"] == n + len(chunks) and got.dtype == dtype  # TE ran once per chunk
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, ref, **tol)
    gy = torch.randn(shape, generator=g).to(dtype)
    torch.testing.assert_close(torch.autograd.grad(got, x, gy)[0], torch.autograd.grad(ref, x, gy)[0], **tol)
    with pytest.raises(ValueError, match="rope chunks"):
        cuda.apply_rope(x, cos, sin, (4, 6, 4))


def test_whole_dim_te_rope_is_caught(fake_libs):
    """TE rotating halves of the whole head dim (no per-chunk calls) differs from the chunked reference."""
    cuda, *_ = fake_libs
    te_rope = sys.modules["transformer_engine.pytorch.attention.rope"]
    chunks = (4, 6, 6)
    x = torch.randn(5, 2, 3, 16, generator=torch.Generator().manual_seed(10))
    angles, cos, sin = _rope_tables(chunks, 5, "sbhd")
    whole = te_rope.apply_rotary_pos_emb(x, angles.contiguous(), tensor_format="sbhd", fused=True)
    assert not torch.allclose(whole, reference.apply_rope(x, cos, sin, chunks), atol=1e-3)
    swapped = cuda.apply_rope(x.transpose(0, 1), cos.transpose(0, 1), sin.transpose(0, 1), chunks)
    torch.testing.assert_close(swapped, reference.apply_rope(x, cos, sin, chunks).transpose(0, 1))


def test_cuda_rope_tables_te_cannot_take_are_recognised(fake_libs):
    cuda, *_ = fake_libs
    x = torch.zeros(5, 2, 3, 16)
    assert cuda._rope_format(x, torch.zeros(5, 1, 1, 16), torch.zeros(5, 1, 1, 16)) == "sbhd"
    assert cuda._rope_format(x, torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16)) == "bshd"
    assert cuda._rope_format(x, torch.zeros(5, 2, 1, 16), torch.zeros(5, 2, 1, 16)) is None  # per-sample tables
    assert cuda._rope_format(x, torch.zeros(5, 16), torch.zeros(5, 16)) is None


# ---------------------------------------------------------------------------------------------- npu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False], ids=["key_mask", "no_mask"])
def test_npu_attention_matches_reference(fake_libs, dtype, masked):
    _, npu, _, torch_npu = fake_libs
    q, k, v = _qkv(dtype)
    torch_npu.calls["npu_fusion_attention"].clear()
    # scale=None: the wrapper must pass D**-0.5 itself (the kernel's default is 1.0)
    _compare_with_grads(npu.attention, q, k, v, _mask() if masked else None, None, TOL[dtype])
    assert torch_npu.calls["npu_fusion_attention"] == ["TND" if masked else "BSND"]


def test_flipped_npu_mask_polarity_is_caught(fake_libs, monkeypatch):
    """A kernel whose boolean mask meant 'attend' would give a different result: the comparison sees it."""
    _, npu, _, torch_npu = fake_libs
    q, k, v = (t.detach() for t in _qkv(torch.float32))
    mask = _mask()
    b, sq, h, d = q.shape
    dense = (~mask)[:, None, None, :].expand(b, 1, sq, k.shape[1])  # the documented polarity: True = masked
    right = torch_npu.npu_fusion_attention(q, k, v, h, "BSND", atten_mask=dense, scale=d**-0.5)[0]
    torch.testing.assert_close(right, reference.attention(q, k, v, mask), atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(torch_npu, "MASK_TRUE_MEANS", "attend")
    wrong = torch_npu.npu_fusion_attention(q, k, v, h, "BSND", atten_mask=dense, scale=d**-0.5)[0]
    assert not torch.allclose(wrong, reference.attention(q, k, v, mask), atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_npu_rms_norm_matches_reference(fake_libs, dtype):
    _, npu, _, torch_npu = fake_libs
    g = torch.Generator().manual_seed(3)
    x = (2 * torch.randn(4, 24, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(24, generator=g)).to(dtype)
    n = torch_npu.calls["npu_rms_norm"]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(npu.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), **tol)
    assert torch_npu.calls["npu_rms_norm"] == n + 1
    torch.testing.assert_close(npu.rms_norm(x, None, 1e-6), reference.rms_norm(x, None, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["mindspeed", "torch_npu"])
def test_npu_chunked_rope_matches_reference(fake_libs, monkeypatch, dtype, kernel):
    _, npu, _, torch_npu = fake_libs
    ms = sys.modules["mindspeed.ops.npu_rotary_position_embedding"]
    if kernel == "torch_npu":
        monkeypatch.setattr(npu, "_ms_rope", None)  # MindSpeed absent
    chunks = (4, 6, 6)  # t/h/w: rotate-half within each chunk, unlike npu_rotary_mul's whole-dim rotation
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 3, 16, generator=g).to(dtype)
    angles = torch.rand(1, 5, 1, 8, generator=g) * 6
    halves = torch.split(angles, [c // 2 for c in chunks], dim=-1)
    cos = torch.cat([torch.cat([a.cos(), a.cos()], -1) for a in halves], -1)
    sin = torch.cat([torch.cat([a.sin(), a.sin()], -1) for a in halves], -1)
    n, n_ms = torch_npu.calls["npu_rotary_mul"], len(ms.calls["npu_rotary_position_embedding"])
    got = npu.apply_rope(x, cos, sin, chunks)
    used_ms = len(ms.calls["npu_rotary_position_embedding"]) - n_ms
    assert (used_ms, torch_npu.calls["npu_rotary_mul"] - n) == ((1, 0) if kernel == "mindspeed" else (0, 1))
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.apply_rope(x, cos, sin, chunks), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="rope chunks"):
        npu.apply_rope(x, cos, sin, (4, 6, 4))


def test_backend_modules_name_their_device(fake_libs):
    _, npu, _, _ = fake_libs
    npu_3 = types.SimpleNamespace(type="npu", index=3)  # torch.device("npu") exists only with torch_npu
    assert npu.device_name(npu_3) == "Ascend910B2 (fake 3)"
    from mm.ops.registry import KERNELS, OPTIONAL_KERNELS

    # the required kernels and the ring's block kernel
    assert set(npu.kernels()) == set(fake_libs[0].kernels()) == set(KERNELS) | set(OPTIONAL_KERNELS)


# ---------------------------------------------------------------------------------------------- ring block kernels
@pytest.fixture
def block_kernels(fake_libs, monkeypatch):
    """{backend: module} with the ring's block kernel; cuda's CUDA-only aten ops replaced by their fakes."""
    cuda, npu, _, _ = fake_libs
    import fakes_aten

    monkeypatch.setattr(cuda, "_efficient_fwd", fakes_aten.efficient_attention)
    monkeypatch.setattr(cuda, "_efficient_bwd", fakes_aten.efficient_attention_backward)
    return {"cuda": cuda, "npu": npu}


def _block_mask():
    """Two ring blocks of 4 keys; sample 0's second block is fully masked, sample 1's masks are not prefixes."""
    return torch.tensor([[True, True, False, True, False, False, False, False],
                         [False, True, True, False, True, False, True, True]])


def _block_case(dtype, masked):
    from mm.ops.reference import MASKED_BIAS

    q, k, v = (t.detach() for t in _qkv(dtype, sq=6, sk=8, h=2, d=16, seed=11))
    mask = _block_mask() if masked else torch.ones(2, 8, dtype=torch.bool)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, MASKED_BIAS)
    blocks = [(k[:, i:i + 4], v[:, i:i + 4], bias[:, i:i + 4] if masked else None) for i in (0, 4)]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(dtype)
    return q, k, v, mask, blocks, dout


def _block_mismatches(kernels, q, blocks, dout, scale, tol):
    """Where ``kernels``' forward (out, lse per block), the ring's merge of them and the backward of each block
    from the merged out/lse differ from the cpu kernel's; [] when they agree."""
    from mm.distributed.ring_attention import merge_blocks

    bad, merged, merged_ref = [], (None, None), (None, None)
    for i, (kb, vb, bb) in enumerate(blocks):
        out, lse = kernels.attention_block(q, kb, vb, bb, scale)
        out_r, lse_r = reference.attention_block(q, kb, vb, bb, scale)
        if out.dtype != q.dtype or lse.dtype != torch.float32 or lse.shape != lse_r.shape or out.shape != out_r.shape:
            return [f"block {i}: out {out.dtype} {tuple(out.shape)}, lse {lse.dtype} {tuple(lse.shape)}"]
        # a sample with every key of the block masked: the cpu kernel adds -10000 in fp32 before its softmax
        # (ulp 1e-3 there), so its out is that coarse; the merge gives it weight exp(-10000) = 0
        coarse = dict(atol=max(tol["atol"], 5e-3), rtol=max(tol["rtol"], 5e-3))
        for s in range(q.shape[0]):
            t = coarse if bb is not None and bool((bb[s] != 0).all()) else tol
            if not torch.allclose(out[s].float(), out_r[s].float(), **t):
                bad.append(f"block {i} sample {s} out")
        if not torch.allclose(lse, lse_r.float(), **tol):
            bad.append(f"block {i} lse")
        merged, merged_ref = merge_blocks(*merged, out, lse), merge_blocks(*merged_ref, out_r, lse_r)
    out_m, lse_m = merged[0].to(q.dtype), merged[1]
    if not torch.allclose(out_m.float(), merged_ref[0].float(), **tol):
        bad.append("merged out")
    for i, (kb, vb, bb) in enumerate(blocks):
        got = kernels.attention_block_backward(dout, q, kb, vb, out_m, lse_m, bb, scale)
        want = reference.attention_block_backward(dout, q, kb, vb, out_m, lse_m, bb, scale)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            if a.shape != b.shape or a.dtype != b.dtype or not torch.allclose(a.float(), b.float(), **tol):
                bad.append(f"block {i} {name}")
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False], ids=["key_bias", "no_bias"])
@pytest.mark.parametrize("backend", ["cuda", "npu"])
def test_attention_block_matches_cpu_kernel(block_kernels, backend, masked, dtype):
    """Each block's out and fp32 lse [B, H, Sq], their merge, and each block's backward from the *merged* out/lse
    equal the cpu kernel's; masked, one block is fully masked for a sample (the finite-bias normaliser)."""
    q, k, v, mask, blocks, dout = _block_case(dtype, masked)
    assert _block_mismatches(block_kernels[backend], q, blocks, dout, 0.3, TOL[dtype]) == []
    if masked:  # the ring's merge over both blocks is masked attention over all the keys
        from mm.distributed.ring_attention import merge_blocks

        merged = (None, None)
        for kb, vb, bb in blocks:
            merged = merge_blocks(*merged, *block_kernels[backend].attention_block(q, kb, vb, bb, 0.3))
        torch.testing.assert_close(merged[0].to(dtype).float(), reference.attention(q, k, v, mask, 0.3).float(),
                                   **TOL[dtype])


def test_attention_block_kernels_are_the_fast_ones(block_kernels):
    import fakes_aten

    torch_npu = sys.modules["torch_npu"]
    q, _, _, _, blocks, dout = _block_case(torch.bfloat16, True)
    torch_npu.calls["npu_fusion_attention"].clear()
    torch_npu.calls["npu_fusion_attention_grad"].clear()
    n = dict(fakes_aten.calls)
    for name in ("cuda", "npu"):
        assert _block_mismatches(block_kernels[name], q, blocks, dout, None, TOL[torch.bfloat16]) == []
    assert fakes_aten.calls == {"forward": n["forward"] + 2, "backward": n["backward"] + 2}
    assert torch_npu.calls["npu_fusion_attention"] == torch_npu.calls["npu_fusion_attention_grad"] == ["TND"] * 2


def _flip_npu_mask(npu, monkeypatch, torch_npu):
    from mm.ops.reference import MASKED_BIAS

    real = npu.block_key_mask
    monkeypatch.setattr(npu, "block_key_mask", lambda bias, k: real(MASKED_BIAS - bias, k))


def _npu_stats_head_major(npu, monkeypatch, torch_npu):
    """TND statistics as [N, T, 8] (the BNSD order) instead of the documented [T, N, 8]."""
    real = torch_npu.npu_fusion_attention

    def head_major(*a, **kw):
        out, smax, ssum, *rest = real(*a, **kw)
        if kw.get("input_layout") == "TND":
            smax, ssum = (t.transpose(0, 1).reshape(t.shape) for t in (smax, ssum))
        return out, smax, ssum, *rest

    monkeypatch.setattr(torch_npu, "npu_fusion_attention", head_major)


def _flip_cuda_bias(cuda, monkeypatch, torch_npu):
    from mm.ops.reference import MASKED_BIAS

    real = cuda._efficient_bias
    monkeypatch.setattr(cuda, "_efficient_bias", lambda b, q, k: real(MASKED_BIAS - b, q, k))


@pytest.mark.parametrize("backend,mutation", [("npu", _flip_npu_mask), ("npu", _npu_stats_head_major),
                                              ("cuda", _flip_cuda_bias)],
                         ids=["npu_mask_polarity", "npu_lse_layout", "cuda_bias_polarity"])
def test_wrong_block_layout_or_polarity_is_caught(block_kernels, monkeypatch, backend, mutation):
    """The comparison above notices a flipped mask and statistics read in the wrong layout."""
    q, _, _, _, blocks, dout = _block_case(torch.float32, True)
    mutation(block_kernels[backend], monkeypatch, sys.modules["torch_npu"])
    assert _block_mismatches(block_kernels[backend], q, blocks, dout, 0.3, TOL[torch.float32]) != []


@pytest.mark.parametrize("backend", ["cuda", "npu"])
def test_preflight_accepts_ring_where_the_block_kernel_exists(fake_libs, monkeypatch, backend):
    from mm.ops import registry
    from mm.training import preflight

    monkeypatch.setattr(registry, "resolve_backend_name", lambda name: backend)
    par = types.SimpleNamespace(context_parallel_size=2, ulysses_size=1, context_parallel_algo="megatron_cp_algo",
                                tensor_model_parallel_size=1)
    assert preflight._ring_kernel_problems(par, None, backend) == []


def test_packed_block_rejects_a_bias_packing_cannot_express(fake_libs):
    _, npu, _, _ = fake_libs
    q, k, v = (t.detach() for t in _qkv(torch.float32, sk=8))
    with pytest.raises(ValueError, match="key_bias values must be 0"):
        npu.attention_block(q, k, v, torch.full((2, 8), -1.0), None)


# ---------------------------------------------------------------------------------------------- npu patches
def test_npu_patch_set_needs_no_mindspeed_adaptor():
    import megatron_patches

    names = [p.name for p in megatron_patches.patches_for("npu")]
    assert names[0] == "transfer_to_npu" and "npu_type_names" in names and "paged_stash_stub" in names
    assert not any("mindspeed" in p.target for p in megatron_patches.patches_for("npu"))
    assert {p.phase for p in megatron_patches.patches_for("npu") if p.name == "transfer_to_npu"} == {"pre_import"}


def test_npu_type_names_only_for_megatron_callers():
    from megatron_patches.npu import _npu_type_names

    class FakeNpuTensor:
        def type(self, dtype=None, non_blocking=False, **kwargs):
            return "torch.npu.BFloat16Tensor" if dtype is None else f"cast to {dtype}"

    patched = _npu_type_names(FakeNpuTensor.type)
    t = FakeNpuTensor()
    assert patched(t) == "torch.npu.BFloat16Tensor"  # our code sees the truth
    megatron_frame = {"__name__": "megatron.core.optimizer.optimizer", "patched": patched, "t": t}
    exec("def call():\n    return patched(t)", megatron_frame)
    assert megatron_frame["call"]() == "torch.cuda.BFloat16Tensor"
    assert patched(t, torch.float32) == "cast to torch.float32"
