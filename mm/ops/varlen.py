"""Key-padding mask -> packed ("varlen") keys, shared by the flash-attn and NPU fused-attention wrappers.

Every query of a ``[B, Sq, H, D]`` batch is kept (the mask is a *key*-padding mask), so the packed query
sequence ``b`` is simply rows ``b*Sq .. (b+1)*Sq``; the keys/values of sequence ``b`` are its valid keys,
in their original order. Attention without a causal mask is invariant to the order of the keys, so a
mask that is not a prefix (SUV: valid video tokens, then valid caption tokens) packs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm.ops.reference import check_key_mask


@dataclass
class PackedKeys:
    q: torch.Tensor  # [B*Sq, H, D]
    k: torch.Tensor  # [total_k, H, D] (valid keys only)
    v: torch.Tensor  # [total_k, H, D]
    cu_seqlens_q: torch.Tensor  # int32 [B+1]: 0, Sq, 2*Sq, ...
    cu_seqlens_k: torch.Tensor  # int32 [B+1]: 0, n_0, n_0 + n_1, ...


def pack_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> PackedKeys:
    check_key_mask(key_mask, k)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    keep = key_mask.reshape(-1).nonzero(as_tuple=True)[0]  # flat indices of the valid keys, batch-major
    lens = key_mask.sum(dim=1, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=q.device)
    return PackedKeys(
        q=q.reshape(b * sq, h, d),
        k=k.reshape(b * sk, h, d).index_select(0, keep),
        v=v.reshape(b * sk, h, v.shape[-1]).index_select(0, keep),
        cu_seqlens_q=torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device),
        cu_seqlens_k=torch.cat([zero, lens.cumsum(0, dtype=torch.int32).to(q.device)]),
    )
