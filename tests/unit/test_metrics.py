import pytest

from mm.training.metrics import SUVShape, mfu, suv_forward_flops


def test_dense_block_flops_closed_form():
    s = SUVShape(num_layers=(1,), sparse_n=(1,), hidden=8, timestep_dim=4)
    lv, lt, d = 2 * 2 * 2, 3, 8  # latent 2x4x4 -> 2x2x2 tokens
    expect = 8 * (lv + lt) * d * d + 16 * (lv + lt) * d * d + 4 * (lv + lt) ** 2 * d + 24 * 4 * d
    assert suv_forward_flops(s, (2, 4, 4), lt) == expect


def test_skiparse_reduces_attention_flops_by_about_k():
    dense = SUVShape(num_layers=(1,), sparse_n=(1,), hidden=64, timestep_dim=16)
    sparse = SUVShape(num_layers=(1,), sparse_n=(4,), hidden=64, timestep_dim=16)
    lat = (16, 128, 128)  # 16*64*64 = 65536 video tokens: attention dominates
    lin = suv_forward_flops(SUVShape((1,), (1,), 64, 16), lat, 0) - 4 * 65536**2 * 64
    attn_dense = suv_forward_flops(dense, lat, 0) - lin
    attn_sparse = suv_forward_flops(sparse, lat, 0) - lin
    assert attn_dense / attn_sparse == pytest.approx(4.0)


def test_mfu():
    assert mfu(1e15, 1.0, 2, 500.0) == pytest.approx(1.0)
    assert mfu(1e15, 1.0, 2, None) is None
