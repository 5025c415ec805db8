"""A weight EMA composed onto whatever optimizer megatron built (spec §7.4, MindSpeed ``fused_ema_adamw``).

Per parameter, after the inner optimizer's update of the fp32 main weight ``θ``:
``e = d·e + (1−d)·θ`` (one ``torch._foreach_lerp_``) with ``d = min(cap, (1+u)/(10+u))``, where ``u`` is
the number of EMA steps taken before this one (0 on the first step) and ``e`` starts at the initial ``θ``.

The inner optimizer is whatever megatron-core chose: torch ``AdamW`` (no apex/TE), TE or apex
``FusedAdam``, or an NPU fused AdamW. ``attach_ema`` composes the EMA step onto *its* class
(``Ema<Inner>`` = ``EmaStep`` mixin + the inner class), so megatron's ``isinstance`` checks and the
inner kernel are untouched; only the step gains the EMA update.

Unlike upstream, the EMA tensors (state key ``ema_params``, next to ``exp_avg``/``exp_avg_sq``) and the
EMA step counter (param-group key ``ema_steps``) are checkpointed, so the warm-up does not restart on
every resume (spec §12.15). Inside megatron's distributed optimizer the inner optimizer works on fp32
master *shards*; ``EmaDistributedOptimizer`` adds ``ema_params`` to megatron's per-parameter state keys,
so the EMA is sharded, gathered and resharded exactly like ``exp_avg`` (no megatron code is patched).

EMA tensors are created (as ``θ`` before the update) by the first step; a fresh optimizer that loads a
checkpoint gets them from megatron, which allocates every key of ``optimizer_state_keys``. Nothing is put
into an empty inner state entry before that, because fused optimizers initialise their own state on
``len(state) == 0`` (torch's Adam(W) is the exception: its whole state is materialised up front, below).
"""

from __future__ import annotations

import torch

EMA_KEY = "ema_params"
EMA_STEPS = "ema_steps"
EMA_CAP = "ema_decay_cap"


def ema_decay(num_steps_before: int, cap: float) -> float:
    """EMA decay with warm-up: ``min(cap, (1+u)/(10+u))``."""
    u = float(num_steps_before)
    return min(cap, (1.0 + u) / (10.0 + u))


def _is_torch_adam(opt) -> bool:
    return isinstance(opt, (torch.optim.Adam, torch.optim.AdamW))


class EmaStep:
    """Mixin placed before an optimizer class: ``step()`` = the inner step, then the EMA step."""

    def init_ema(self, ema_decay_cap: float) -> None:
        for group in self.param_groups:
            group.setdefault(EMA_CAP, ema_decay_cap)
            group.setdefault(EMA_STEPS, 0)
        if _is_torch_adam(self):
            self._materialise_torch_adam_state()

    def _materialise_torch_adam_state(self) -> None:
        """torch Adam(W) state, laid out as torch's ``_init_group`` would, plus the EMA.

        megatron's no-apex/no-TE checkpoint paths read ``step``/``exp_avg``/``exp_avg_sq`` before the first
        step (see megatron_patches P7), so for torch's optimizers the state is made complete up front.
        """
        fused_or_capturable = any(g.get("fused") or g.get("capturable") for g in self.param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused_or_capturable
                                  else torch.tensor(0.0))
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st.setdefault(EMA_KEY, p.detach().clone(memory_format=torch.preserve_format))

    @torch.no_grad()
    def step(self, closure=None):
        # EMA starts at the weights *before* the first update: snapshot the ones that have no EMA yet
        fresh = {p: p.detach().clone(memory_format=torch.preserve_format)
                 for g in self.param_groups for p in g["params"] if EMA_KEY not in self.state.get(p, {})}
        loss = super().step(closure)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            for p in params:
                if EMA_KEY not in self.state[p]:
                    self.state[p][EMA_KEY] = fresh[p]
            d = ema_decay(group[EMA_STEPS], group[EMA_CAP])
            torch._foreach_lerp_([self.state[p][EMA_KEY] for p in params], [p.detach() for p in params], 1.0 - d)
            group[EMA_STEPS] += 1
        return loss

    def ema_tensors(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: self.state[p][EMA_KEY] for g in self.param_groups for p in g["params"]}


_composed: dict[type, type] = {}


def ema_class(inner_cls: type) -> type:
    """``Ema<inner_cls>``: the EMA step composed onto an optimizer class (cached, so pickling/isinstance agree)."""
    if issubclass(inner_cls, EmaStep):
        return inner_cls
    if not issubclass(inner_cls, torch.optim.Optimizer):
        raise ValueError(f"the EMA composes onto a torch.optim.Optimizer subclass, got {inner_cls.__name__}")
    if inner_cls not in _composed:
        _composed[inner_cls] = type(f"Ema{inner_cls.__name__}", (EmaStep, inner_cls),
                                    {"__module__": __name__, "__doc__": f"{inner_cls.__name__} + weight EMA"})
    return _composed[inner_cls]


def attach_ema(optimizer: torch.optim.Optimizer, ema_decay_cap: float) -> torch.optim.Optimizer:
    """Turn an existing (inner) optimizer into its EMA-composed class, in place; returns it."""
    optimizer.__class__ = ema_class(type(optimizer))
    optimizer.init_ema(ema_decay_cap)
    return optimizer


class EmaAdamW(ema_class(torch.optim.AdamW)):
    """torch AdamW + EMA of the updated weights, kept in the optimizer state (a direct constructor)."""

    def __init__(self, params, *args, ema_decay_cap: float = 0.9999, **kwargs):
        torch.optim.AdamW.__init__(self, params, *args, **kwargs)
        self.init_ema(ema_decay_cap)


def make_ema_optimizer(megatron_optimizer, ema_decay_cap: float):
    """Compose the EMA onto each inner optimizer of a megatron optimizer (distributed or not, or chained)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        attach_ema(opt.optimizer, ema_decay_cap)
        if isinstance(opt, DistributedOptimizer) and not isinstance(opt, EmaDistributedOptimizer):
            opt.__class__ = EmaDistributedOptimizer
    return megatron_optimizer


def _distributed_optimizer_subclass():
    from mm.ops import current_backend

    current_backend()  # megatron may only be imported after the backend's patches
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class EmaDistributedOptimizer(DistributedOptimizer):
        """megatron's distributed optimizer whose per-parameter state also holds the EMA."""

        @property
        def optimizer_state_keys(self):
            return tuple(super().optimizer_state_keys) + (EMA_KEY,)

    return EmaDistributedOptimizer


EmaDistributedOptimizer = _distributed_optimizer_subclass()


def _ema_of(inner, main_param: torch.Tensor) -> torch.Tensor:
    """The EMA of one main parameter; before the first step the EMA is the weights themselves."""
    return inner.state.get(main_param, {}).get(EMA_KEY, main_param.detach())


def ema_model_state_dict(megatron_optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights in model space (this rank's TP shard, full over DP), keyed like ``model``.

    With the distributed optimizer every DP rank holds a disjoint flat slice of each parameter's EMA;
    the slices are placed into a zero tensor on the parameter's device and summed over the DP group
    (NCCL/HCCL need device tensors). Otherwise the inner optimizer's parameters map one-to-one (fp32
    copies of bf16 params, or the params themselves).
    """
    import torch.distributed as dist
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    found: dict[torch.nn.Parameter, torch.Tensor] = {}
    for opt in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        if isinstance(opt, DistributedOptimizer):
            group = opt.data_parallel_group
            for p, (gi, order) in opt.model_param_group_index_map.items():
                main = opt.optimizer.param_groups[gi]["params"][order]
                r = opt._get_model_param_range_map(p)["param"]
                flat = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                flat[r.start:r.end] = _ema_of(opt.optimizer, main).float().view(-1)
                found[p] = flat
            owned = set().union(*(buf.params for buf in opt.buffers))
            for p in model.parameters():  # model order: identical on every DP rank
                if p in owned:
                    if p not in found:
                        found[p] = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)  # no slice here
                    dist.all_reduce(found[p], group=group)
        else:
            pairs = []
            if hasattr(opt, "float16_groups"):
                for g16, g32 in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                    pairs += list(zip(g16, g32))
                pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
            else:
                pairs = [(p, p) for g in opt.optimizer.param_groups for p in g["params"]]
            for model_p, main_p in pairs:
                found[model_p] = _ema_of(opt.optimizer, main_p).float().reshape(-1)
    # parameters the optimizer does not own (frozen ones) have a constant EMA: themselves
    return {name: found[p].view(p.shape).to(p.dtype) if p in found else p.detach().clone()
            for name, p in model.named_parameters()}


def fuse_inner_optimizers(megatron_optimizer, device: torch.device) -> str:
    """Run torch Adam(W) inner optimizers with torch's fused kernel where ``device`` has one; describe the result.

    megatron builds TE/apex ``FusedAdam`` when either is installed (already fused) and torch's AdamW
    otherwise. torch's AdamW has a single-kernel ``fused`` implementation on CUDA (and on NPU where
    torch_npu registers it); it is switched on per param group, with its ``step`` counters on the device
    as that kernel requires. Elsewhere torch's default runs and the returned description names it: on cpu
    the per-parameter for-loop (torch has no cpu foreach kernels, and its fused cpu kernel is not bitwise
    equal to the reference the CPU tests pin); on npu the ``foreach`` path (torch_npu's ``NpuFusedAdamW``
    packs params into combined buffers, which the distributed optimizer's per-shard state cannot use).
    """
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

    names = set()
    for opt in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        inner = opt.optimizer
        base = next(c for c in type(inner).__mro__ if not issubclass(c, EmaStep))
        if _is_torch_adam(inner):
            # cpu stays on the reference path the CPU tests pin; npu: torch_npu registers no "npu" entry here
            if device.type != "cpu" and device.type in _get_fused_kernels_supported_devices():
                for group in inner.param_groups:
                    group["fused"], group["foreach"] = True, False
                for st in inner.state.values():
                    if isinstance(st.get("step"), torch.Tensor):
                        st["step"] = st["step"].to(device=device, dtype=torch.float32)
                names.add(f"torch.optim.{base.__name__}(fused)")
            else:
                path = "foreach" if device.type in _get_foreach_kernels_supported_devices() else "for-loop"
                names.add(f"torch.optim.{base.__name__}({path}; not fused on {device.type})")
        else:
            names.add(f"{base.__module__}.{base.__name__}")
    return ", ".join(sorted(names)) + " + EMA"
