"""The ``cpu`` patch set: megatron-core 0.19 on CPU tensors + gloo (see shared/design/MEGATRON_CPU.md).

P1, P4 and P5 act only when the *calling frame* is a ``megatron.*`` module, so project code that
hard-codes CUDA still fails on the CPU CI (which keeps the code base portable to NPU). Each patch has a
test in ``tests/unit/test_megatron_patches.py`` that disables it and shows megatron failing, so an
upgrade that fixes one upstream is noticed. P10 (``single_rank_gloo.*``) is for speed, not need: its
tests (``tests/distributed/test_single_rank_collectives.py``) show it skips gloo and changes no bit.

Deliberately not patched (the same test file checks these stay harmless): ``torch.cuda.empty_cache``
(already a no-op while CUDA is uninitialised), ``torch.cuda.stream`` (accepts the null stream below) and
``nn.Module.cuda`` (megatron.core never moves modules).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import queue
import types

import torch

from megatron_patches.patch import Patch, called_from_megatron

VERIFIED_MEGATRON = "0.19.2"


# ---------------------------------------------------------------------------- P0: import shim
def _paged_stash_stub(_original):
    mod = types.ModuleType("megatron.core.transformer.moe.ops.paged_stash")
    mod.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("MoE paged-stash kernels need triton/CUDA; unavailable on the cpu backend")

    mod.paged_stash_copy_kernel = _unavailable
    mod.paged_stash_pop_kernel = _unavailable
    mod.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]
    return mod


def _triton_missing() -> bool:
    return importlib.util.find_spec("triton") is None


# ---------------------------------------------------------------------------- P1: device queries
def _scoped(original, replacement):
    """Call ``replacement`` when invoked from megatron code, else the original."""

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if called_from_megatron():
            return replacement(*args, **kwargs)
        return original(*args, **kwargs)

    wrapper.__wrapped_original__ = original
    return wrapper


def _noop_builder(_original):
    """A fresh no-op per patch: torch._dynamo's rule map rejects one function object registered under
    several torch names with different rules (e.g. synchronize vs empty_cache)."""

    def _noop(*args, **kwargs):
        return None

    return _noop


# ---------------------------------------------------------------------------- P2: streams/events
class _NullEvent:
    def __init__(self, *args, **kwargs):
        return None

    def record(self, stream=None):
        return None

    def wait(self, stream=None):
        return None

    def synchronize(self):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NullStream:
    def __init__(self, *args, **kwargs):
        return None

    def wait_stream(self, stream):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event or _NullEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NULL_STREAM = _NullStream()


# ---------------------------------------------------------------------------- P4: "cuda" literals
_FACTORIES = (
    "tensor zeros ones empty full arange rand randn randint eye linspace empty_strided "
    "zeros_like ones_like empty_like full_like rand_like randn_like"
).split()


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, int) and not isinstance(dev, bool):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


def _cpu_factory(original):
    # ``with torch.device(...)`` recognises factories by identity in an lru-cached set built on first use;
    # build it now, from the unpatched builtins (which the wrapper still calls), or the device context
    # (e.g. "meta") is silently ignored after patching.
    from torch.utils._device import _device_constructors

    _device_constructors()

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if "device" in kwargs and _is_cuda_device(kwargs["device"]) and called_from_megatron():
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)

    wrapper.__wrapped_original__ = original
    return wrapper


def _factory_patch(name: str) -> Patch:
    return Patch(
        name=f"cuda_literals.{name}",
        target=f"torch:{name}",
        build=_cpu_factory,
        reason='megatron hard-codes device="cuda" (schedules, optimizer, clip_grads, causal mask)',
    )


def _self_when_megatron(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        if called_from_megatron():
            return self
        return original(self, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------- P5: type strings
_LEGACY = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def _legacy_type(original):
    @functools.wraps(original)
    def wrapper(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and called_from_megatron():
            name = original(self)
            return _LEGACY.get(name, name)
        if dtype is None and not kwargs:
            return original(self)
        return original(self, dtype, non_blocking, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------- P6: SP-aware torch norm
def _sp_aware_norm_new(original):
    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False, zero_centered_gamma=False,
                normalization="LayerNorm"):
        import dataclasses

        sp = config.sequence_parallel
        norm = original(cls, dataclasses.replace(config, sequence_parallel=False) if sp else config, hidden_size,
                        eps, persist_layer_norm, zero_centered_gamma, normalization)
        for p in norm.parameters():
            # as TENorm/apex do: finalize_model_grads all-reduces these over TP
            setattr(p, "sequence_parallel", sp)
        return norm

    return staticmethod(__new__)


# ---------------------------------------------------------------------------- P7: torch-AdamW distopt ckpt
def _no_apex_or_te() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _materialise_adam_state(opt) -> None:
    inner = opt.optimizer
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state[p]
            if not st:
                st["step"] = torch.tensor(0.0)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _sharded_state_dict_fixed(original):
    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        _materialise_adam_state(self)  # (a) a fresh torch AdamW has no 'step' to read
        return original(self, *args, **kwargs)

    return wrapper


def _set_states_fixed(original):
    @functools.wraps(original)
    def wrapper(self, model_param, tensors):
        if "step" not in tensors:  # (b) the loaded dict carries no per-param 'step'
            tensors = {**tensors, "step": None}
        return original(self, model_param, tensors)

    return wrapper


def _load_state_dict_fixed(original):
    @functools.wraps(original)
    def wrapper(self, state_dict):
        _materialise_adam_state(self)
        out = original(self, state_dict)
        for st in self.optimizer.state.values():  # (c) one shared 'step' tensor would count N times
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].detach().clone()
        return out

    return wrapper


# ---------------------------------------------------------------------------- P9: results queue
_local_queue: queue.Queue | None = None


def _local_results_queue(_original):
    def get_write_results_queue(mp_mode: str = "spawn"):
        global _local_queue
        if _local_queue is None:
            _local_queue = queue.Queue()
        return _local_queue

    return get_write_results_queue


class _DropCpuRngWarning(logging.Filter):
    def filter(self, record):
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _rng_state_get(_original):
    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    return _get_cuda_rng_state


def _rng_state_set(_original):
    logging.getLogger("megatron.core.tensor_parallel.random").addFilter(_DropCpuRngWarning())

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    return _set_cuda_rng_state


# ---------------------------------------------------------------------------- P10: 1-rank gloo collectives
# With one data-parallel rank, DDP's grad reduce-scatter and the distributed optimizer's param all-gather
# (param_and_grad_buffer.start_grad_sync / start_param_sync) are identities, but gloo still runs them:
# reduce_scatter_single(_coalesced) copies the whole fp32 grad buffer three times per step and the
# all-gather walks the param buffer (111M elements on the mid-size bench: ~1.4 s + ~0.3 s on one core,
# ~1.5 s of an 11.5 s step). megatron scales the grads by
# gradient_scaling_factor *before* the collective, so skipping the call changes no number. Only gloo
# groups of size 1 take the short cut, and only for calls the original accepts (same shape, dtype and
# device, contiguous, an op gloo can apply to the dtype); everything else goes to the original, which
# keeps its errors. all_reduce is left alone: gloo already returns at once for one rank (0.2 ms on a
# 445 MB buffer, coalesced or not).
_RS_TARGET = "megatron.core.distributed.param_and_grad_buffer:dist_reduce_scatter_func"
_AG_TARGET = "megatron.core.distributed.param_and_grad_buffer:dist_all_gather_func"


def _reduction_is_identity(op, t: torch.Tensor) -> bool:
    """One rank reduces to itself for these ops, on the dtypes gloo accepts them for (AVG: floating only)."""
    R = torch.distributed.ReduceOp
    if t.is_complex():
        return False
    return op in (R.SUM, R.PRODUCT, R.MIN, R.MAX) or (op == R.AVG and t.is_floating_point())


def _is_single_rank_gloo(group) -> bool:
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _get_default_group

    if group is None:
        if not dist.is_initialized():
            return False
        group = _get_default_group()
    if not isinstance(group, dist.ProcessGroup) or group.size() != 1:
        return False
    try:
        return dist.get_backend(group) == dist.Backend.GLOO
    except (ValueError, RuntimeError):  # a destroyed/unknown group: the original reports it
        return False


def _identity_applies(output, input, group) -> bool:
    """True when ``output <- input`` is exactly what the size-1 gloo collective would do."""
    from torch.overrides import has_torch_function

    if not (isinstance(output, torch.Tensor) and isinstance(input, torch.Tensor)):
        return False
    if has_torch_function((output, input)):  # functional-collective / tracing modes: their own handling
        return False
    if (output.shape != input.shape or output.dtype != input.dtype or output.device != input.device
            or not output.is_contiguous() or not input.is_contiguous()):
        return False
    return _is_single_rank_gloo(group)


def _same_or_disjoint(output, input) -> bool | None:
    """True: the same memory; False: disjoint; None: partly overlapping (left to the original)."""
    n = input.numel() * input.element_size()
    a, b = output.data_ptr(), input.data_ptr()
    if a == b:
        return True
    return False if (a + n <= b or b + n <= a) else None


def _completed_work():
    fut = torch.futures.Future()
    fut.set_result(None)
    return torch._C._distributed_c10d._create_work_from_future(fut)


def _identity(output, input, async_op):
    same = _same_or_disjoint(output, input)
    if same is None:
        return False, None
    if not same:
        with torch.no_grad():
            output.copy_(input)
    return True, (_completed_work() if async_op else None)


def _expect_torch_collective(original, names: tuple[str, ...], target: str):
    import torch.distributed as dist

    if not hasattr(torch._C._distributed_c10d, "_create_work_from_future"):
        raise RuntimeError("megatron patch single_rank_gloo: this torch lacks _create_work_from_future, which "
                           "makes the completed work handle of an async call; re-check the patch")
    expected = [getattr(dist, n) for n in names if hasattr(dist, n)]
    if original is None or not any(original is e for e in expected):
        raise RuntimeError(
            f"megatron patch single_rank_gloo: {target} is {original!r}, expected one of torch.distributed."
            f"{{{', '.join(names)}}}; megatron-core changed (verified on {VERIFIED_MEGATRON}), re-check "
            "param_and_grad_buffer's collectives before re-enabling this patch")


def _single_rank_reduce_scatter(original):
    _expect_torch_collective(original, ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"),
                             _RS_TARGET)
    sum_op = torch.distributed.ReduceOp.SUM

    @functools.wraps(original)
    def reduce_scatter(output, input, op=sum_op, group=None, async_op=False):
        if _identity_applies(output, input, group) and _reduction_is_identity(op, input):
            done, work = _identity(output, input, async_op)
            if done:
                return work
        return original(output, input, op=op, group=group, async_op=async_op)

    reduce_scatter.__wrapped_original__ = original
    return reduce_scatter


def _single_rank_all_gather(original):
    _expect_torch_collective(original, ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"),
                             _AG_TARGET)

    @functools.wraps(original)
    def all_gather(output_tensor, input_tensor, group=None, async_op=False):
        if _identity_applies(output_tensor, input_tensor, group):
            done, work = _identity(output_tensor, input_tensor, async_op)
            if done:
                return work
        return original(output_tensor, input_tensor, group=group, async_op=async_op)

    all_gather.__wrapped_original__ = original
    return all_gather


PATCHES: list[Patch] = [
    Patch(
        "paged_stash_stub",
        "sys.modules:megatron.core.transformer.moe.ops.paged_stash",
        _paged_stash_stub,
        "unguarded `import triton` (NVIDIA/Megatron-LM#6891) blocks `import megatron.core`",
        phase="pre_import",
        condition=_triton_missing,
    ),
    Patch("cuda_device.current_device", "torch.cuda:current_device",
          lambda orig: _scoped(orig, lambda: torch.device("cpu")),
          "~200 `device=torch.cuda.current_device()` sites (SP buffers, p2p, DDP buffers, dist-ckpt)"),
    Patch("cuda_device.synchronize", "torch.cuda:synchronize", _noop_builder,
          "synchronize after batch_isend_irecv / before async save; CPU work is synchronous"),
    Patch("cuda_device.set_device", "torch.cuda:set_device", _noop_builder, "no device to bind"),
    Patch("cuda_streams.Stream", "torch.cuda:Stream", lambda orig: _NullStream,
          "grad-sync overlap creates side streams"),
    Patch("cuda_streams.Event", "torch.cuda:Event", lambda orig: _NullEvent, "stream events"),
    Patch("cuda_streams.current_stream", "torch.cuda:current_stream", lambda orig: (lambda device=None: _NULL_STREAM),
          "param_and_grad_buffer.start_grad_sync always calls current_stream()"),
    Patch("cuda_streams.default_stream", "torch.cuda:default_stream", lambda orig: (lambda device=None: _NULL_STREAM),
          "stream bookkeeping"),
    Patch("cuda_rng.get_rng_state", "torch.cuda:get_rng_state", lambda orig: (lambda device="cuda": torch.get_rng_state()),
          "model_parallel_cuda_manual_seed / tracker save 'the CUDA generator'; on CPU it is the CPU one"),
    Patch("cuda_rng.set_rng_state", "torch.cuda:set_rng_state",
          lambda orig: (lambda new_state, device="cuda": torch.set_rng_state(new_state)), "see get_rng_state"),
    Patch("cuda_rng.manual_seed", "torch.cuda:manual_seed",
          lambda orig: (lambda seed: torch.default_generator.manual_seed(int(seed))), "see get_rng_state"),
    Patch("cuda_rng.tracker_get", "megatron.core.tensor_parallel.random:_get_cuda_rng_state", _rng_state_get,
          "RNG tracker fork() / recompute read the device generator"),
    Patch("cuda_rng.tracker_set", "megatron.core.tensor_parallel.random:_set_cuda_rng_state", _rng_state_set,
          "the original queues _lazy_call callbacks forever on a CPU build"),
    *[_factory_patch(n) for n in _FACTORIES],
    Patch("cuda_literals.Tensor.cuda", "torch:Tensor.cuda", _self_when_megatron,
          "distrib_optimizer calls .cuda() on gathered state"),
    Patch("legacy_type_names", "torch:Tensor.type", _legacy_type,
          "distrib_optimizer/optimizer/clip_grads compare `param.type()` to 'torch.cuda.*Tensor' and raise"),
    Patch("torch_norm_sp", "megatron.core.transformer.torch_norm:WrappedTorchNorm.__new__", _sp_aware_norm_new,
          "the no-apex torch norm asserts `not sequence_parallel`; build it and tag params for the TP grad all-reduce"),
    Patch("torch_adamw_distopt_ckpt.sharded_state_dict",
          "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.sharded_state_dict",
          _sharded_state_dict_fixed, "fresh torch AdamW has no 'step': state_dict() asserts",
          condition=_no_apex_or_te),
    Patch("torch_adamw_distopt_ckpt.set_states",
          "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer._set_main_param_and_optimizer_states",
          _set_states_fixed, "KeyError 'step' when copying loaded per-param tensors", condition=_no_apex_or_te),
    Patch("torch_adamw_distopt_ckpt.load_state_dict",
          "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.load_state_dict",
          _load_state_dict_fixed, "silent: all params share one 'step' tensor after load (counts N per step)",
          condition=_no_apex_or_te),
    Patch("no_dynamo", "torch._dynamo.config:disable", lambda orig: True,
          "jit_fuser = torch.compile compiles C++ for ~20 s on 2 cores when fusion flags are on (speed only)"),
    Patch("ckpt_sync_results_queue",
          "megatron.core.dist_checkpointing.strategies.filesystem_async:get_write_results_queue",
          _local_results_queue,
          "a spawn-context Manager re-imports __main__ (3-6 s, hangs unguarded scripts); sync saves need a local queue"),
    Patch("single_rank_gloo.reduce_scatter", _RS_TARGET, _single_rank_reduce_scatter,
          "speed only: DDP's grad reduce-scatter on a 1-rank gloo group is an identity that copies the grad "
          "buffer 3x per step"),
    Patch("single_rank_gloo.all_gather", _AG_TARGET, _single_rank_all_gather,
          "speed only: the distributed optimizer's param all-gather on a 1-rank gloo group is an identity"),
]
