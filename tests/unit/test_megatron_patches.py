"""Every cpu megatron patch is still needed by the installed megatron-core, and still works.

Pattern: run a minimal real megatron call with the patch applied (it works), then inside
``megatron_patches.disabled(name)`` (it fails: raises, or silently computes the wrong thing). A megatron
upgrade that fixes one upstream makes its test fail here, so the patch can be dropped. Calls that need
process groups run in a forked 1- or 2-rank child (``run_distributed``), so the pytest process never
holds a process group and never sees a half-restored patch set.

"Defensive" patches (``set_device``, ``Stream``, ``Event``, ``default_stream``) cover megatron call sites
that only opt-in features reach (async-save workers, partial distributed optimizer, MoE/offload events,
CUDA graphs); their tests check that the call site still exists in megatron and that the unpatched torch
call raises on this CPU build. P8 (``no_dynamo``) is for speed: tested as applied and restorable. P9
(``ckpt_sync_results_queue``) is needed, not just faster, under the fork harness: its children are
daemonic and may not start megatron's spawn ``Manager``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import queue
import re
import subprocess
import sys
import warnings

import pytest
import torch

import megatron_patches
from harness import run_distributed
from megatron_patches import cpu as cpu_patches
from megatron_patches.patch import apply_patches, is_patch_applied, restore

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_CUDA = "Torch not compiled with CUDA enabled"
H = 16


def _names(prefix: str) -> list[str]:
    return [p.name for p in cpu_patches.PATCHES if p.name.startswith(prefix)]


@contextlib.contextmanager
def _all_disabled(names):
    with contextlib.ExitStack() as stack:
        for n in names:
            stack.enter_context(megatron_patches.disabled(n))
        yield


def _megatron_source(rel: str) -> str:
    import megatron.core

    with open(os.path.join(os.path.dirname(megatron.core.__file__), rel)) as f:
        return f.read()


def _in_megatron_frame(src: str):
    """Compile ``def f(): ...`` as if it lived in a megatron module (the scoped patches check the caller)."""
    ns = {"__name__": "megatron.core._patch_probe", "torch": torch}
    exec(compile(src, "<megatron probe>", "exec"), ns)
    return ns["f"]


def _net(config, depth: int = 1):
    """A MegatronModule of ``depth`` ColumnParallelLinear layers (H -> H, gathered output) at TP=1."""
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer.module import MegatronModule

    class Net(MegatronModule):
        def __init__(self):
            super().__init__(config)
            self.layers = torch.nn.ModuleList(
                ColumnParallelLinear(H, H, config=config, init_method=torch.nn.init.normal_, bias=True,
                                     gather_output=True) for _ in range(depth))

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)[0]
            return x

    return Net()


def _tp_config(tp=1, sp=False):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=2, tensor_model_parallel_size=tp,
                             sequence_parallel=sp, use_cpu_initialization=True, params_dtype=torch.float32)


def test_every_cpu_patch_is_applied_and_covered():
    names = {p.name for p in cpu_patches.PATCHES}
    wanted = [p.name for p in cpu_patches.PATCHES if p.condition is None or p.condition()]
    assert all(is_patch_applied(n) for n in wanted), [n for n in wanted if not is_patch_applied(n)]
    covered = set(COVERED) | set(_names("cuda_literals."))
    assert names == covered, f"patches without a necessity test: {names - covered}; stale: {covered - names}"


# ---------------------------------------------------------------------------------------------- P0
def test_p0_import_fails_without_paged_stash_stub():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: megatron imports without the stub, P0 is not applied here")
    proc = subprocess.run([sys.executable, "-c", "import megatron.core"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "ModuleNotFoundError: No module named 'triton'" in proc.stderr, proc.stderr[-2000:]


def test_p0_stub_is_in_place_and_refuses_kernels():
    if importlib.util.find_spec("triton") is not None:
        pytest.skip("triton is installed: the stub is not applied")
    stub = sys.modules["megatron.core.transformer.moe.ops.paged_stash"]
    assert stub.GLOBAL_BLOCK_SIZE == 1024
    with pytest.raises(RuntimeError, match="triton/CUDA"):
        stub.paged_stash_copy_kernel()


# ---------------------------------------------------------------------------------------------- P1
def test_p1_current_device_for_megatron_buffers():
    from megatron.core.utils import GlobalMemoryBuffer

    t = GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "sp-gather")  # utils.py: device=current_device()
    assert t.device.type == "cpu" and t.shape == (2, 3)
    with megatron_patches.disabled("cuda_device.current_device"), pytest.raises(AssertionError, match=NO_CUDA):
        GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "sp-gather")


def test_p1_current_device_is_scoped_to_megatron_callers():
    # project code asking for CUDA must still fail on the CPU CI (keeps the code base portable)
    with pytest.raises(AssertionError, match=NO_CUDA):
        torch.cuda.current_device()
    assert _in_megatron_frame("def f():\n    return torch.cuda.current_device()")() == torch.device("cpu")


def test_p1_synchronize_for_megatron_timers():
    from megatron.core.timers import Timer

    t = Timer("step")  # timers.py: start/stop call torch.cuda.synchronize()
    t.start()
    t.stop()
    with megatron_patches.disabled("cuda_device.synchronize"), pytest.raises(AssertionError, match=NO_CUDA):
        Timer("step").start()


# ---------------------------------------------------------------------------------------------- defensive
DEFENSIVE = {
    # name: (megatron file, call site text, unpatched call)
    "cuda_device.set_device": ("dist_checkpointing/strategies/async_utils.py", "torch.cuda.set_device(",
                               lambda: torch.cuda.set_device(0)),
    "cuda_streams.Event": ("pipeline_parallel/fine_grained_activation_offload.py", "torch.cuda.Event()",
                           lambda: torch.cuda.Event()),
    "cuda_streams.default_stream": ("transformer/cuda_graphs.py", "torch.cuda.default_stream()",
                                    lambda: torch.cuda.default_stream()),
    # DDP side stream, only with num_distributed_optimizer_instances > 1
    "cuda_streams.Stream": ("distributed/distributed_data_parallel.py", "communication_stream = torch.cuda.Stream(",
                            lambda: torch.cuda.Stream()),
}


@pytest.mark.parametrize("name", sorted(DEFENSIVE))
def test_defensive_patch_call_site_exists_and_unpatched_call_raises(name):
    rel, site, call = DEFENSIVE[name]
    assert site in _megatron_source(rel), f"megatron no longer calls {site} in {rel}: is {name} still needed?"
    call()  # patched: a no-op / null object
    with megatron_patches.disabled(name), pytest.raises((AssertionError, AttributeError, RuntimeError)):
        call()


# ---------------------------------------------------------------------------------------------- P2 + P5
def _ddp_step_probe(rank, world, disable: str | None):
    """1 rank: DDP(overlap_grad_reduce) + distributed optimizer, one step. Returns 'ok' or the error."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig(distributed_timeout_minutes=1))
    config = _tp_config()

    cm = megatron_patches.disabled(disable) if disable else contextlib.nullcontext()
    try:
        with cm:
            ddp = DistributedDataParallel(
                config, DistributedDataParallelConfig(overlap_grad_reduce=True, use_distributed_optimizer=True),
                _net(config))
            opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True),
                                         [ddp])
            ddp.zero_grad_buffer()
            ddp(torch.randn(4, 2, H)).pow(2).mean().backward()
            finalize_model_grads([ddp])
            ok, _, _ = opt.step()
            assert ok
    except Exception as e:  # noqa: BLE001  (the caller asserts on it)
        return f"{type(e).__name__}: {e}"
    return "ok"


DDP_STEP = {
    # name: expected error text when disabled
    "cuda_streams.current_stream": f"AssertionError: {NO_CUDA}",  # start_grad_sync
    "legacy_type_names": "TypeError",  # distrib_optimizer: 'Wrapped parameters must be one of torch.cuda.*'
}


def test_ddp_distopt_step_works_with_patches_and_fails_without_each():
    assert run_distributed(_ddp_step_probe, 1, args=(None,)) == ["ok"]
    for name, expected in DDP_STEP.items():
        (got,) = run_distributed(_ddp_step_probe, 1, args=(name,))
        assert got.startswith(expected), f"{name} disabled: {got}"


def test_p5_legacy_type_names_for_clip_grads():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)  # asserts grad.type() == 'torch.cuda.Float…'
    torch.testing.assert_close(p.grad, torch.full((3,), 0.5), atol=1e-6, rtol=0)
    with megatron_patches.disabled("legacy_type_names"), pytest.raises(AssertionError):
        clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=4.0)


def test_p5_is_scoped_to_megatron_callers():
    x = torch.zeros(2)
    assert x.type() == "torch.FloatTensor"
    assert x.type(torch.float64).dtype == torch.float64
    assert _in_megatron_frame("def f(x):\n    return x.type()")(x) == "torch.cuda.FloatTensor"
    assert _in_megatron_frame("def f(x):\n    return x.type()")(x.bfloat16()) == "torch.cuda.BFloat16Tensor"


# ---------------------------------------------------------------------------------------------- P3
def _rng_probe(rank, world, disable: tuple[str, ...]):
    """TP=2: megatron's RNG tracker seeds a per-TP-rank stream, fork() switches to it and back."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    state = init_parallel(ParallelConfig(tensor_model_parallel_size=2, distributed_timeout_minutes=1))

    def draw(seed):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(seed)
        default_state = torch.get_rng_state()
        with get_cuda_rng_tracker().fork():
            forked = torch.rand(4)
        after = torch.rand(4)
        torch.set_rng_state(default_state)
        return forked, after, torch.rand(4)

    def gather(t):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t, group=state.tp_group)
        return parts

    try:
        with _all_disabled(disable):
            f1, after, default = draw(123)
            f1_again, _, _ = draw(123)
            f2, _, _ = draw(456)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    fs, ds = gather(f1), gather(default)
    return {
        "reproducible": torch.equal(f1, f1_again),
        "seeded": not torch.equal(f1, f2),
        "fork switches stream": not torch.equal(f1, default),
        "fork restores default stream": torch.equal(after, default),
        "tp ranks differ in fork": not torch.equal(fs[0], fs[1]),
        "tp ranks share default": torch.equal(ds[0], ds[1]),
    }


RNG = {
    # name: a check that fails (or the error) when only this patch is disabled
    "cuda_rng.get_rng_state": f"AssertionError: {NO_CUDA}",  # tracker.add
    "cuda_rng.tracker_get": f"AssertionError: {NO_CUDA}",  # fork() saves the device generator
    "cuda_rng.manual_seed": "seeded",  # silent: lazy-queued, the tracker streams are never seeded
    "cuda_rng.tracker_set": "fork switches stream",  # silent: lazy-queued, fork() never switches
}


def test_p3_rng_tracker_works_with_patches_and_fails_without_each():
    for rank_checks in run_distributed(_rng_probe, 2, args=((),)):
        assert all(rank_checks.values()), rank_checks
    for name, expected in RNG.items():
        got = run_distributed(_rng_probe, 2, args=((name,),))[0]
        if expected in got:  # a check name
            assert got[expected] is False, f"{name} disabled: {got}"
        else:
            assert got.get("error", "").startswith(expected), f"{name} disabled: {got}"


def test_p3_cuda_set_rng_state_restores_the_generator():
    # megatron's only caller (rerun_state_machine._restore_state) pairs it with get_rng_state; on CPU
    # "the CUDA generator" is the CPU one, and the unpatched call silently queues a lazy callback instead
    assert "torch.cuda.set_rng_state(rng_state[" in _megatron_source("rerun_state_machine.py")

    def round_trip():
        s = torch.cuda.get_rng_state()
        a = torch.rand(4)
        torch.cuda.set_rng_state(s)
        return torch.equal(a, torch.rand(4))

    assert round_trip()
    with megatron_patches.disabled("cuda_rng.set_rng_state"):
        assert not round_trip()


# ---------------------------------------------------------------------------------------------- P4
def test_p4_cuda_literals_for_megatron_factories():
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)  # transformer/utils.py: torch.ones(..., device="cuda")
    assert mask.device.type == "cpu" and torch.equal(mask, torch.ones(4, 4).triu(1).bool())
    with _all_disabled([f"cuda_literals.{n}" for n in cpu_patches._FACTORIES]):
        with pytest.raises(AssertionError, match=NO_CUDA):
            get_default_causal_mask(4)


FACTORY_CALLS = {
    "tensor": "torch.tensor([1.0], device='cuda')",
    "zeros": "torch.zeros(2, device='cuda')",
    "ones": "torch.ones(2, device='cuda:0')",
    "empty": "torch.empty(2, device=0)",
    "full": "torch.full((2,), 3.0, device=torch.device('cuda'))",
    "arange": "torch.arange(3, device='cuda')",
    "rand": "torch.rand(2, device='cuda')",
    "randn": "torch.randn(2, device='cuda')",
    "randint": "torch.randint(0, 5, (2,), device='cuda')",
    "eye": "torch.eye(2, device='cuda')",
    "linspace": "torch.linspace(0, 1, 3, device='cuda')",
    "empty_strided": "torch.empty_strided((2,), (1,), device='cuda')",
    "zeros_like": "torch.zeros_like(torch.ones(2), device='cuda')",
    "ones_like": "torch.ones_like(torch.ones(2), device='cuda')",
    "empty_like": "torch.empty_like(torch.ones(2), device='cuda')",
    "full_like": "torch.full_like(torch.ones(2), 1.0, device='cuda')",
    "rand_like": "torch.rand_like(torch.ones(2), device='cuda')",
    "randn_like": "torch.randn_like(torch.ones(2), device='cuda')",
}


@pytest.mark.parametrize("factory", sorted(FACTORY_CALLS))
def test_p4_factory_redirected_only_for_megatron(factory):
    assert f"cuda_literals.{factory}" in _names("cuda_literals.")
    call = FACTORY_CALLS[factory]
    assert _in_megatron_frame(f"def f():\n    return {call}")().device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):  # project code: still an error on CPU
        eval(call, {"torch": torch})
    with megatron_patches.disabled(f"cuda_literals.{factory}"), pytest.raises((AssertionError, RuntimeError)):
        _in_megatron_frame(f"def f():\n    return {call}")()


def test_p4_tensor_cuda_returns_self_for_megatron():
    # needed by the fully_reshardable optimizer checkpoint gather (distrib_optimizer: send_tensor.cuda())
    assert "send_tensor = send_tensor.cuda()" in _megatron_source("optimizer/distrib_optimizer.py")
    x = torch.ones(2)
    assert _in_megatron_frame("def f(x):\n    return x.cuda()")(x) is x
    with pytest.raises(AssertionError, match=NO_CUDA):
        x.cuda()
    with megatron_patches.disabled("cuda_literals.Tensor.cuda"), pytest.raises(AssertionError, match=NO_CUDA):
        _in_megatron_frame("def f(x):\n    return x.cuda()")(x)


# ---------------------------------------------------------------------------------------------- P6
def test_p6_torch_norm_builds_with_sequence_parallel_and_tags_params():
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    norm = WrappedTorchNorm(_tp_config(tp=2, sp=True), H)
    assert isinstance(norm, torch.nn.LayerNorm)
    # finalize_model_grads all-reduces params tagged like this over TP (each rank saw a sequence shard)
    assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters())
    assert not any(getattr(p, "sequence_parallel", False) for p in WrappedTorchNorm(_tp_config(tp=2), H).parameters())
    with megatron_patches.disabled("torch_norm_sp"), pytest.raises(AssertionError):
        WrappedTorchNorm(_tp_config(tp=2, sp=True), H)


# ---------------------------------------------------------------------------------------------- P7
def _resume_probe(rank, world, ckpt_dir, disable: str | None):
    """1 rank: 1 AdamW step, save, fresh model + optimizer, load, 1 step; returns AdamW step per param."""
    from megatron.core import dist_checkpointing
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig(distributed_timeout_minutes=1))
    os.makedirs(ckpt_dir)
    config = _tp_config()
    meta = {"distrib_optim_sharding_type": "fully_reshardable"}

    def build():
        net = _net(config, depth=2)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(use_distributed_optimizer=True), net)
        return net, ddp, get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp])

    def step(ddp, opt):
        ddp.zero_grad_buffer()
        ddp(torch.randn(4, 2, H)).pow(2).mean().backward()
        finalize_model_grads([ddp])
        assert opt.step()[0]

    net, ddp, opt = build()
    step(ddp, opt)
    sd = net.sharded_state_dict()
    dist_checkpointing.save({"model": sd, "optimizer": opt.sharded_state_dict(sd, metadata=meta)}, ckpt_dir)
    cm = megatron_patches.disabled(disable) if disable else contextlib.nullcontext()
    try:
        with cm:
            net, ddp, opt = build()
            sd = net.sharded_state_dict()
            loaded = dist_checkpointing.load(
                {"model": sd, "optimizer": opt.sharded_state_dict(sd, is_loading=True, metadata=meta)}, ckpt_dir)
            net.load_state_dict(loaded["model"])
            opt.load_state_dict(loaded["optimizer"])
            step(ddp, opt)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return [float(st["step"]) for o in opt.chained_optimizers for st in o.optimizer.state.values()]


P7 = {
    "torch_adamw_distopt_ckpt.sharded_state_dict": "AssertionError",  # state_dict(): assert len(steps) == 1
    "torch_adamw_distopt_ckpt.set_states": "KeyError: 'step'",
    "torch_adamw_distopt_ckpt.load_state_dict": None,  # silent: one shared step tensor counts once per param
}


def test_p7_distopt_resume_step_counter(tmp_path):
    assert run_distributed(_resume_probe, 1, args=(str(tmp_path / "ok"), None)) == [[2.0] * 4]
    for name, expected in P7.items():
        (got,) = run_distributed(_resume_probe, 1, args=(str(tmp_path / name), name))
        if expected is None:
            assert isinstance(got, list) and got != [2.0] * 4, f"{name} disabled: steps {got}"
        else:
            assert isinstance(got, str) and got.startswith(expected), f"{name} disabled: {got}"


# ---------------------------------------------------------------------------------------------- P8, P9
def test_p8_no_dynamo_is_applied_and_restorable():
    import torch._dynamo

    (patch,) = [p for p in cpu_patches.PATCHES if p.name == "no_dynamo"]
    assert "speed" in patch.reason  # not a necessity: jit_fuser's torch.compile would build C++ (~20 s)
    assert torch._dynamo.config.disable is True
    with megatron_patches.disabled("no_dynamo"):
        assert torch._dynamo.config.disable is False
    assert torch._dynamo.config.disable is True


def _save_probe(rank, world, ckpt_dir, disable: str | None):
    from megatron.core import dist_checkpointing

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel

    init_parallel(ParallelConfig(distributed_timeout_minutes=1))
    net = _net(_tp_config())
    cm = megatron_patches.disabled(disable) if disable else contextlib.nullcontext()
    try:
        with cm:
            dist_checkpointing.save(net.sharded_state_dict(), ckpt_dir)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "ok"


def test_p9_local_results_queue_for_sync_saves(tmp_path):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    q = filesystem_async.get_write_results_queue()
    assert isinstance(q, queue.Queue) and filesystem_async.get_write_results_queue() is q  # no spawn Manager
    with megatron_patches.disabled("ckpt_sync_results_queue"):
        assert filesystem_async.get_write_results_queue.__module__ == filesystem_async.__name__  # original back
    assert filesystem_async.get_write_results_queue() is q
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_distributed(_save_probe, 1, args=(str(tmp_path / "a"), None)) == ["ok"]
    (got,) = run_distributed(_save_probe, 1, args=(str(tmp_path / "b"), "ckpt_sync_results_queue"))
    assert "daemonic processes are not allowed to have children" in got, got


def test_p1_noops_are_distinct_objects_for_dynamo():
    # torch._dynamo builds a map torch object -> rule; one function registered under two torch.cuda names
    # with different rules (synchronize vs set_device) raised at the first torch.compile after patching
    import torch._dynamo.trace_rules as trace_rules

    trace_rules.get_torch_obj_rule_map.__wrapped__()
    assert torch.cuda.synchronize is not torch.cuda.set_device


# ---------------------------------------------------------------------------------------------- mechanics
def test_apply_is_idempotent():
    assert megatron_patches.apply("cpu") == []
    assert apply_patches(cpu_patches.PATCHES) == []


def _restore_round_trip(rank, world):
    restored = restore()
    assert restored and not any(is_patch_applied(p.name) for p in cpu_patches.PATCHES)
    assert "megatron.core.transformer.moe.ops.paged_stash" not in sys.modules
    assert not hasattr(torch.zeros, "__wrapped_original__")
    with pytest.raises(AssertionError, match=NO_CUDA):
        _in_megatron_frame("def f():\n    return torch.cuda.current_device()")()
    assert _in_megatron_frame("def f(x):\n    return x.type()")(torch.zeros(1)) == "torch.FloatTensor"
    reapplied = apply_patches(cpu_patches.PATCHES)
    assert sorted(reapplied) == sorted(restored)
    assert hasattr(torch.zeros, "__wrapped_original__")
    assert _in_megatron_frame("def f():\n    return torch.cuda.current_device()")() == torch.device("cpu")
    assert _in_megatron_frame("def f(x):\n    return x.type()")(torch.zeros(1)) == "torch.cuda.FloatTensor"
    return len(restored)


def test_restore_and_reapply_round_trip():
    # in a forked child: the pytest process keeps its patch set whatever happens
    (n,) = run_distributed(_restore_round_trip, 1)
    assert n == len([p for p in cpu_patches.PATCHES if p.condition is None or p.condition()])


def test_disabled_rejects_unknown_patch():
    with pytest.raises(KeyError, match="not applied"):
        with megatron_patches.disabled("no_such_patch"):
            pass


def test_version_pin():
    import megatron.core

    assert megatron.core.__version__.split("+")[0] == cpu_patches.VERIFIED_MEGATRON, (
        "megatron-core changed: rerun this file, drop patches whose necessity test fails, bump VERIFIED_MEGATRON"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verified version (with or without a local suffix) is silent
        megatron_patches.apply("cpu")
    real = megatron.core.__version__
    try:
        megatron.core.__version__ = cpu_patches.VERIFIED_MEGATRON + "+local"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            megatron_patches.apply("cpu")
        megatron.core.__version__ = "0.99.0"
        with pytest.warns(UserWarning, match=r"verified on megatron-core 0\.19\.2, found 0\.99\.0"):
            megatron_patches.apply("cpu")
    finally:
        megatron.core.__version__ = real


def test_patches_for_rejects_unknown_backend():
    with pytest.raises(ValueError, match="'tpu'"):
        megatron_patches.patches_for("tpu")


COVERED = [
    "paged_stash_stub", "cuda_device.current_device", "cuda_device.synchronize", *DEFENSIVE, *DDP_STEP, *RNG,
    "cuda_rng.set_rng_state", "cuda_literals.Tensor.cuda", "torch_norm_sp", *P7,
    "no_dynamo", "ckpt_sync_results_queue",
    # P10, for speed: tests/distributed/test_single_rank_collectives.py
    "single_rank_gloo.reduce_scatter", "single_rank_gloo.all_gather",
]


def test_unpatched_cuda_calls_stay_harmless():
    # the reasons cpu.py does not patch these (see its docstring)
    for name in ("empty_cache", "stream"):
        assert not any(p.target == f"torch.cuda:{name}" for p in cpu_patches.PATCHES)
    torch.cuda.empty_cache()
    with torch.cuda.stream(torch.cuda.Stream()):  # the null stream of cuda_streams.Stream
        pass
    # nn.Module.cuda: megatron.core moves tensors, never modules
    import megatron.core

    pattern = re.compile(r"\b\w*(?:model|module)\w*\.cuda\(")
    root = pathlib.Path(megatron.core.__file__).parent
    assert not [str(f) for f in root.rglob("*.py") if pattern.search(f.read_text(errors="ignore"))]
