"""Ring attention over a context-parallel group: non-causal, with a key-padding mask (SCALING_NOTES §2).

Each rank of the ring holds one contiguous block of the queries and of the keys/values. The K/V blocks
travel around the ring (``batch_isend_irecv`` to rank+1, from rank-1; the transfer of the next block runs
while the current one is computed); each step calls the backend's block kernel
``mm.ops.attention_block`` -> ``(out, lse)`` and merges it into fp32 accumulators:

    lse = logaddexp(lse_acc, lse_i);  out = out_acc * exp(lse_acc - lse) + out_i * exp(lse_i - lse)

The backward runs the same ring: every step computes this block's ``(dq, dk, dv)`` from the *merged* out
and lse (``mm.ops.attention_block_backward``), keeps dq, and adds dk/dv to the accumulator that travels
with the K/V block (one shift behind it, overlapped with the next step's kernel); a last shift returns each
accumulator to the rank that owns the block.

Masks are never communicated: every rank knows the whole key-padding mask and passes one additive key bias
per source rank (``key_biases[j]``: the keys of rank j's block, 0 = attend, ``MASKED_BIAS`` = masked). The
bias is finite on purpose: a fully masked block then has a finite log-sum-exp that the merge weights by
exp(-10000) = 0, where ``-inf`` would give the kernel's lse = 0 and a wrong normaliser.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

import mm.ops

KV_TAG, GRAD_TAG = 0, 1  # two streams between the same peers (gloo matches by tag; NCCL ignores tags)


def _shift(tensors: Sequence[torch.Tensor], group, tag: int):
    """Start sending ``tensors`` to the next ring rank and receiving the same shapes from the previous one;
    returns (requests, receive buffers)."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    tensors = [t.contiguous() for t in tensors]
    bufs = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group, tag) for b in bufs]
    return dist.batch_isend_irecv(ops), bufs


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def merge_blocks(out: torch.Tensor | None, lse: torch.Tensor | None, out_i: torch.Tensor, lse_i: torch.Tensor):
    """Merge one block ``(out_i [B, S, H, D], lse_i [B, H, S])`` into the running ``(out, lse)`` (fp32 or
    wider; None before the first block)."""
    acc = torch.promote_types(out_i.dtype, torch.float32)
    out_i, lse_i = out_i.to(acc), lse_i.to(acc)
    if out is None:
        return out_i, lse_i
    new = torch.logaddexp(lse, lse_i)
    w_old = torch.exp(lse - new).transpose(1, 2).unsqueeze(-1)  # [B, H, S] -> [B, S, H, 1]
    w_new = torch.exp(lse_i - new).transpose(1, 2).unsqueeze(-1)
    return out * w_old + out_i * w_new, new


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_biases, scale, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        out = lse = None
        kv = (k, v)
        for step in range(size):
            src = (rank - step) % size  # whose K/V block this rank holds now
            if step < size - 1:
                reqs, nxt = _shift(kv, group, KV_TAG)
            out_i, lse_i = mm.ops.attention_block(q, kv[0], kv[1], key_biases[src], scale)
            out, lse = merge_blocks(out, lse, out_i, lse_i)
            if step < size - 1:
                _wait(reqs)
                kv = tuple(nxt)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_biases, ctx.scale, ctx.group = key_biases, scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group = ctx.group
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        acc = torch.promote_types(q.dtype, torch.float32)
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = (k, v)
        grad_reqs = grad_in = None
        for step in range(size):
            src = (rank - step) % size
            if step < size - 1:
                kv_reqs, kv_next = _shift(kv, group, KV_TAG)
            dq_i, dk_i, dv_i = mm.ops.attention_block_backward(dout, q, kv[0], kv[1], out, lse,
                                                               ctx.key_biases[src], ctx.scale)
            dq += dq_i
            dkv = [dk_i.to(acc), dv_i.to(acc)]
            if grad_reqs is not None:  # the partial dK/dV of this block from the ranks that held it before
                _wait(grad_reqs)
                dkv = [dkv[0] + grad_in[0], dkv[1] + grad_in[1]]
            grad_reqs, grad_in = _shift(dkv, group, GRAD_TAG)  # travels one shift behind its K/V block
            if step < size - 1:
                _wait(kv_reqs)
                kv = tuple(kv_next)
        _wait(grad_reqs)  # after `size` shifts each rank holds the summed dK/dV of its own block
        return dq.to(q.dtype), grad_in[0].to(k.dtype), grad_in[1].to(v.dtype), None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_biases: Sequence[torch.Tensor | None],
                   scale: float | None, group) -> torch.Tensor:
    """Attention of this rank's queries over the keys of every rank of ``group``.

    q ``[B, Sq, H, D]``, k/v ``[B, Sk, H, D]`` (this rank's blocks; every rank the same shapes), ``key_biases``
    one ``[B, Sk]`` additive bias (or None: all keys valid) per rank of the group, in group-rank order ->
    ``[B, Sq, H, D]``. Differentiable in q, k, v. Collective over ``group`` (point-to-point on a ring).
    """
    if dist.get_world_size(group) != len(key_biases):
        raise ValueError(f"ring attention needs one key bias per ring rank: {len(key_biases)} for a ring of "
                         f"{dist.get_world_size(group)}")
    return _RingAttention.apply(q, k, v, tuple(key_biases), scale, group)
