"""AdamW fused with an EMA of the weights (spec §7.4, MindSpeed ``fused_ema_adamw``).

Per parameter, after the AdamW update of the fp32 master weight ``θ``:
``e = d·e + (1−d)·θ`` with ``d = min(cap, (1+u)/(10+u))``, where ``u`` is the number of optimizer
steps taken before this one (0 on the first step) and ``e`` starts at the initial ``θ``.

Unlike upstream, the EMA tensors (state key ``ema_params``) and the EMA step counter are checkpointed,
so the warm-up does not restart on every resume (spec §12.15). Inside megatron's distributed
optimizer the inner optimizer works on fp32 master *shards*; ``EmaDistributedOptimizer`` adds
``ema_params`` to megatron's list of per-parameter state keys so the EMA is sharded, gathered and
resharded exactly like ``exp_avg``/``exp_avg_sq`` (no megatron code is patched: a subclass).
"""

from __future__ import annotations

import torch

EMA_KEY = "ema_params"


def ema_decay(num_steps_before: int, cap: float) -> float:
    """EMA decay with warm-up: ``min(cap, (1+u)/(10+u))``."""
    u = float(num_steps_before)
    return min(cap, (1.0 + u) / (10.0 + u))


class EmaAdamW(torch.optim.AdamW):
    """torch AdamW + EMA of the updated weights, kept in the optimizer state."""

    def __init__(self, params, *args, ema_decay_cap: float = 0.9999, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.init_ema(ema_decay_cap)

    def init_ema(self, ema_decay_cap: float) -> None:
        """Turn an existing torch AdamW into an EmaAdamW (used after megatron built the optimizer)."""
        for group in self.param_groups:
            group.setdefault("ema_decay_cap", ema_decay_cap)
            group.setdefault("ema_steps", 0)
        self.ensure_state()

    def ensure_state(self) -> None:
        """Materialise AdamW + EMA state for parameters that have none (fresh optimizer, before a load)."""
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = torch.tensor(0.0)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if EMA_KEY not in st:
                    st[EMA_KEY] = p.detach().clone(memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            d = ema_decay(group["ema_steps"], group["ema_decay_cap"])
            emas = [self.state[p][EMA_KEY] for p in group["params"]]
            if emas:
                torch._foreach_mul_(emas, d)
                torch._foreach_add_(emas, [p.detach() for p in group["params"]], alpha=1.0 - d)
            group["ema_steps"] += 1
        return loss

    def ema_tensors(self) -> dict[torch.Tensor, torch.Tensor]:
        return {p: self.state[p][EMA_KEY] for g in self.param_groups for p in g["params"]}


def make_ema_optimizer(megatron_optimizer, ema_decay_cap: float):
    """Give a megatron optimizer (distributed or not, or chained) an EMA-AdamW inner optimizer."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer]):
        inner = opt.optimizer
        if not isinstance(inner, torch.optim.AdamW):
            raise ValueError(f"EMA-AdamW needs megatron's AdamW inner optimizer, got {type(inner).__name__}")
        inner.__class__ = EmaAdamW
        inner.init_ema(ema_decay_cap)
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


def ema_model_state_dict(megatron_optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA weights in model space (this rank's TP shard, full over DP), keyed like ``model``.

    With the distributed optimizer every DP rank holds a disjoint flat slice of each parameter's EMA;
    the slices are placed into a zero tensor and summed over the DP group. Otherwise the inner
    optimizer's parameters map one-to-one (fp32 copies of bf16 params, or the params themselves).
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
                flat = torch.zeros(p.numel(), dtype=torch.float32)
                flat[r.start:r.end] = opt.optimizer.state[main][EMA_KEY].float().view(-1)
                found[p] = flat
            owned = set().union(*(buf.params for buf in opt.buffers))
            for p in model.parameters():  # model order: identical on every DP rank
                if p in owned:
                    if p not in found:
                        found[p] = torch.zeros(p.numel(), dtype=torch.float32)  # no slice on this rank
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
                found[model_p] = opt.optimizer.state[main_p][EMA_KEY].float().reshape(-1)
    # parameters the optimizer does not own (frozen ones) have a constant EMA: themselves
    return {name: found[p].view(p.shape).to(p.dtype) if p in found else p.detach().clone()
            for name, p in model.named_parameters()}
