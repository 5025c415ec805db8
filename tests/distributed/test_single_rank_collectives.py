"""P10 (``single_rank_gloo.*`` in megatron_patches/cpu.py): on a gloo group of size 1, megatron's grad
reduce-scatter and param all-gather become the identity without calling into gloo, and change no bit.

The gloo spy wraps the ``ProcessGroup`` collective methods (the layer every ``torch.distributed`` collective
reaches, coalesced or not) and counts calls, so "did not call into gloo" is observed, not assumed. Each case
runs in a forked rank (``run_distributed``) so the pytest process never holds a process group and never
sees a half-restored patch set.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import megatron_patches
from harness import run_distributed
from megatron_patches import cpu as cpu_patches
from tiny_workspace import make_workspace, tiny_trainer

NAMES = ("single_rank_gloo.reduce_scatter", "single_rank_gloo.all_gather")
_GLOO_METHODS = (
    "allreduce", "allreduce_coalesced", "reduce_scatter_single", "reduce_scatter_single_coalesced",
    "_reduce_scatter_base", "reduce_scatter_tensor_coalesced", "all_gather_single", "all_gather_single_coalesced",
    "_allgather_base", "allgather_into_tensor_coalesced",
)


@contextlib.contextmanager
def gloo_spy():
    """Counts calls of the ProcessGroup collectives by method name while active."""
    PG = torch.distributed.ProcessGroup
    counts: dict[str, int] = {}
    originals = {m: getattr(PG, m) for m in _GLOO_METHODS}

    def counting(name, fn):
        def wrapper(self, *args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(self, *args, **kwargs)

        return wrapper

    for m, fn in originals.items():
        setattr(PG, m, counting(m, fn))
    try:
        yield counts
    finally:
        for m, fn in originals.items():
            setattr(PG, m, fn)


@contextlib.contextmanager
def unpatched():
    with contextlib.ExitStack() as stack:
        for n in NAMES:
            stack.enter_context(megatron_patches.disabled(n))
        yield


def _megatron_funcs():
    from megatron.core.distributed import param_and_grad_buffer as pgb

    return pgb.dist_reduce_scatter_func, pgb.dist_all_gather_func


def test_patches_are_applied_and_wrap_the_torch_collectives():
    import torch.distributed as dist

    assert all(megatron_patches.is_patch_applied(n) for n in NAMES)
    rs, ag = _megatron_funcs()
    assert rs.__wrapped_original__ is dist.reduce_scatter_tensor
    assert ag.__wrapped_original__ is dist.all_gather_into_tensor


@pytest.mark.parametrize("build", [cpu_patches._single_rank_reduce_scatter, cpu_patches._single_rank_all_gather])
def test_patch_refuses_an_unexpected_megatron_target(build):
    with pytest.raises(RuntimeError, match="megatron-core changed"):
        build(None)  # the attribute is gone from param_and_grad_buffer
    with pytest.raises(RuntimeError, match="megatron-core changed"):
        build(lambda *a, **k: None)  # megatron points it at something other than the torch collective


# ---------------------------------------------------------------------------------------------- (a) identity
def _identity_cases(rank, world):
    """Every call shape megatron uses, patched vs unpatched, on a fresh size-1 gloo group and on WORLD."""
    import torch.distributed as dist
    from torch.distributed import _coalescing_manager

    one = dist.new_group([0])
    out = {}
    for gname, group in (("new_group", one), ("default", None)):
        for fname in ("rs", "ag"):
            for layout in ("in_place", "separate"):
                for mode in ("sync", "async", "coalesced_sync", "coalesced_async"):
                    results = []
                    for patched in (True, False):
                        torch.manual_seed(0)
                        src = torch.randn(6, 5)
                        dst = src if layout == "in_place" else torch.full((6, 5), 7.0)
                        src_before = src.clone()
                        cm_ctx = unpatched() if not patched else contextlib.nullcontext()
                        with cm_ctx, gloo_spy() as calls:
                            rs, ag = _megatron_funcs()
                            kw = {"group": group, "async_op": mode.endswith("async")}
                            call = (lambda: rs(dst, src, op=dist.ReduceOp.SUM, **kw)) if fname == "rs" else \
                                (lambda: ag(dst, src, **kw))
                            if mode.startswith("coalesced"):
                                with _coalescing_manager(group, async_ops=kw["async_op"]) as cm:
                                    ret = call()
                                handle = cm if kw["async_op"] else ret
                            else:
                                ret = call()
                                handle = ret
                            if mode == "async" and patched:
                                assert ret.is_completed()  # already done before wait()
                            if kw["async_op"]:
                                assert handle is not None, (gname, fname, layout, mode, patched)
                                assert handle.wait() in (True, None)  # a Work says True, the manager None
                            else:
                                assert handle is None, (gname, fname, layout, mode, patched, handle)
                        results.append((dst.clone(), torch.equal(src, src_before), sum(calls.values())))
                    (p_dst, p_src_kept, p_calls), (u_dst, u_src_kept, u_calls) = results
                    out[(gname, fname, layout, mode)] = (
                        torch.equal(p_dst, u_dst) and torch.equal(p_dst, src_before), p_src_kept and u_src_kept,
                        p_calls, u_calls)
    return out


def test_size1_gloo_collectives_are_identities_without_gloo():
    cases = run_distributed(_identity_cases, 1, timeout=60)[0]
    assert len(cases) == 2 * 2 * 2 * 4
    for key, (same_result, src_kept, patched_calls, unpatched_calls) in cases.items():
        assert same_result, key  # patched == unpatched == the input, bit for bit
        assert src_kept, key
        assert patched_calls == 0, key  # never reached gloo
        assert unpatched_calls >= 1, key  # the spy sees the unpatched path


def _fallbacks(rank, world):
    """Edge calls: the same outcome (values or error type) as unpatched, and which ones reach gloo."""
    import torch.distributed as dist

    one = dist.new_group([0])
    R = dist.ReduceOp
    def rs_case(out, inp, **kw):
        return lambda rs, ag: rs(out, inp, group=one, **kw) or out

    def ag_case(out, inp):
        return lambda rs, ag: ag(out, inp, group=one) or out

    cases = {
        "avg_float": rs_case(torch.empty(4), torch.arange(4.0), op=R.AVG),  # the short cut (floating AVG)
        "avg_int": rs_case(torch.empty(4, dtype=torch.int64), torch.arange(4), op=R.AVG),
        "band_float": rs_case(torch.empty(4), torch.ones(4), op=R.BAND),
        "band_int": rs_case(torch.empty(4, dtype=torch.int32), torch.arange(4, dtype=torch.int32), op=R.BAND),
        "rs_shape": rs_case(torch.empty(3), torch.ones(4)),
        "ag_dtype": ag_case(torch.empty(4, dtype=torch.float64), torch.ones(4)),
        "ag_2d_out": ag_case(torch.empty(1, 4), torch.ones(4)),
        "rs_non_contiguous": rs_case(torch.empty(4, 4), torch.arange(16.0).view(4, 4).t()),
        "rs_complex": rs_case(torch.empty(2, dtype=torch.complex64), torch.ones(2, dtype=torch.complex64)),
    }

    def overlapping(fname):
        def call(rs, ag):
            buf = torch.arange(12.0)  # output buf[2:8] partly overlaps input buf[0:6]
            (rs if fname == "rs" else ag)(buf[2:8], buf[0:6], group=one)
            return buf

        return call

    cases["rs_partial_overlap"] = overlapping("rs")
    cases["ag_partial_overlap"] = overlapping("ag")

    def outcome(fn):
        rs, ag = _megatron_funcs()
        with gloo_spy() as calls:
            try:
                res = fn(rs, ag).tolist()
            except Exception as e:  # noqa: BLE001  (compared between patched and unpatched)
                res = type(e).__name__
        return res, sum(calls.values())

    out = {}
    for name, fn in cases.items():
        patched = outcome(fn)
        with unpatched():
            plain = outcome(fn)
        out[name] = (patched, plain)
    return out


def test_calls_outside_the_identity_go_to_gloo_unchanged():
    out = run_distributed(_fallbacks, 1, timeout=60)[0]
    for name, ((p_res, p_calls), (u_res, u_calls)) in out.items():
        assert p_res == u_res, (name, p_res, u_res)  # same values, or the same error type
        assert u_calls >= 1, name
        if name == "avg_float":
            assert p_calls == 0 and p_res == [0.0, 1.0, 2.0, 3.0]  # AVG over one rank on floats: the short cut
        else:
            assert p_calls >= 1, name  # left to gloo
    assert isinstance(out["avg_int"][0][0], str) and isinstance(out["band_float"][0][0], str)  # gloo's errors
    assert out["band_int"][0][0] == [0, 1, 2, 3]


def _two_ranks(rank, world):
    """WORLD has 2 ranks: the wrappers hand everything to gloo; a 1-rank subgroup still takes the short cut."""
    import torch.distributed as dist

    mine = [dist.new_group([r]) for r in range(world)][rank]  # every rank creates every group
    rs, ag = _megatron_funcs()
    with gloo_spy() as calls:
        x = torch.arange(4.0) + rank
        red = torch.empty(2)
        rs(red, x, group=None)
        gathered = torch.empty(4)
        ag(gathered, torch.full((2,), float(rank)), group=None)
    world_calls = sum(calls.values())
    with gloo_spy() as calls:
        y = torch.empty(3)
        ag(y, torch.full((3,), float(rank)), group=mine)
    # the predicate itself (for these collectives the shape checks alone would also exclude 2 ranks)
    sizes_seen = (cpu_patches._is_single_rank_gloo(None), cpu_patches._is_single_rank_gloo(dist.group.WORLD),
                  cpu_patches._is_single_rank_gloo(mine))
    return red.tolist(), gathered.tolist(), world_calls, sum(calls.values()), y.tolist(), sizes_seen


def test_two_rank_group_is_untouched():
    r0, r1 = run_distributed(_two_ranks, 2, timeout=60)
    assert r0[0] == [1.0, 3.0] and r1[0] == [5.0, 7.0]  # sum of [0,1,2,3] and [1,2,3,4], scattered
    assert r0[1] == r1[1] == [0.0, 0.0, 1.0, 1.0]
    assert r0[2] == r1[2] == 2  # both collectives reached gloo
    assert r0[3] == r1[3] == 0 and r0[4] == [0.0] * 3 and r1[4] == [1.0] * 3
    assert r0[5] == r1[5] == (False, False, True)


# ---------------------------------------------------------------------------------------------- (b) training
@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"), num=2, cfg_rate=0.0)


def _train(rank, world, ws, patched, distopt):
    cm = contextlib.nullcontext() if patched else unpatched()
    with cm, gloo_spy() as calls:
        t = tiny_trainer(ws, gbs=1, iters=3, lr=1e-3, distopt=distopt)
        losses = [r.loss for r in t.train()]
    params = {k: v.detach().clone() for k, v in t.model.state_dict().items() if isinstance(v, torch.Tensor)}
    return losses, params, dict(calls)


@pytest.mark.parametrize("distopt", [True, False], ids=["distopt", "ddp"])
def test_one_rank_training_is_bit_identical_with_and_without_the_patch(ws, distopt):
    losses_p, params_p, calls_p = run_distributed(_train, 1, args=(ws, True, distopt), timeout=180)[0]
    losses_u, params_u, calls_u = run_distributed(_train, 1, args=(ws, False, distopt), timeout=180)[0]
    assert losses_p == losses_u  # exact float equality
    assert params_p.keys() == params_u.keys() and params_p
    for k in params_p:
        assert torch.equal(params_p[k], params_u[k]), k
    rs_ag = ("reduce_scatter", "all_gather", "allgather")
    if distopt:
        # unpatched: 1 grad reduce-scatter + 1 param all-gather per step; patched: none reach gloo
        assert sum(n for m, n in calls_u.items() if m.startswith(rs_ag)) >= 2 * 3, calls_u
        assert not any(m.startswith(rs_ag) for m in calls_p), calls_p
    else:
        # plain DDP all-reduces the grads; P10 leaves all_reduce alone (gloo returns at once for one rank)
        assert calls_p.get("allreduce_coalesced") == calls_u.get("allreduce_coalesced") >= 3
