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


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM5
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A800-SXM4-80GB", 312.0),
    ("Ascend910B2", 313.0),
    ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table_by_device_name(name, peak):
    from mm.training.metrics import peak_tflops_for

    assert peak_tflops_for(name) == peak


def test_trainer_fills_mfu_peak_from_the_device_name(caplog):
    """No --peak-tflops: the trainer looks its device up in the table; an unknown one is n/a, said once."""
    import types

    from mm.training.trainer import Trainer

    def trainer_on(device_type, name):
        backend = types.SimpleNamespace(device_type=device_type, device_name=lambda: name)
        return types.SimpleNamespace(backend=backend)

    assert Trainer._known_peak_tflops(trainer_on("cuda", "NVIDIA H200")) == 989.0
    assert Trainer._known_peak_tflops(trainer_on("npu", "Ascend910B3")) == 313.0
    assert Trainer._known_peak_tflops(trainer_on("cpu", "x86_64")) is None
    with caplog.at_level("WARNING", logger="mm.train"):
        assert Trainer._known_peak_tflops(trainer_on("cuda", "Mystery GPU")) is None
    assert "'Mystery GPU' is not in the peak table" in caplog.text and "--peak-tflops" in caplog.text
