"""Key-padding mask -> packed ("varlen") keys, shared by the flash-attn and NPU fused-attention wrappers.

Every query of a ``[B, Sq, H, D]`` batch is kept (the mask is a *key*-padding mask), so the packed query
sequence ``b`` is simply rows ``b*Sq .. (b+1)*Sq``; the keys/values of sequence ``b`` are its valid keys,
in their original order. Attention without a causal mask is invariant to the order of the keys, so a
mask that is not a prefix (SUV: valid video tokens, then valid caption tokens) packs the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mm.ops.reference import MASKED_BIAS, check_key_mask


@dataclass
class PackedKeys:
    q: torch.Tensor  # [B*Sq, H, D]
    k: torch.Tensor  # [total_k, H, D] (valid keys only)
    v: torch.Tensor  # [total_k, H, D]
    cu_seqlens_q: torch.Tensor  # int32 [B+1]: 0, Sq, 2*Sq, ...
    cu_seqlens_k: torch.Tensor  # int32 [B+1]: 0, n_0, n_0 + n_1, ...
    keep: torch.Tensor  # int64 [total_k]: flat ``b * Sk + j`` index of each packed key (scatters dK/dV back)


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
        keep=keep,
    )


def block_key_mask(key_bias: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ring block's additive key bias (0 = attend, ``MASKED_BIAS`` = masked) -> ``(key_mask [B, Sk] bool,
    lse_shift [B] fp32)`` for a kernel that packs valid keys instead of adding a bias.

    Packing the valid keys equals the finite bias wherever a sample has one (a masked key's weight
    ``exp(score - 10000 - lse)`` is 0 in fp32). A sample whose keys in this block are *all* masked has the
    same bias on every key, so its finite-bias attention is plain attention over all of them with the
    log-sum-exp lowered by ``MASKED_BIAS``: its mask row becomes all True and ``lse_shift`` is ``MASKED_BIAS``
    (0 for the others). Add ``lse_shift`` to the kernel's lse; subtract it from the lse handed to the backward.
    Any other bias value is an error (packing cannot express it). One device->host sync (the value check).
    """
    if key_bias.shape != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_bias must be [B, Sk] = {(k.shape[0], k.shape[1])}, got {tuple(key_bias.shape)}")
    attend, masked = key_bias == 0, key_bias == MASKED_BIAS
    if not bool((attend | masked).all()):
        raise ValueError(f"key_bias values must be 0 (attend) or {MASKED_BIAS} (masked) for a packed-key kernel")
    none_valid = ~attend.any(dim=1)
    shift = torch.where(none_valid, MASKED_BIAS, 0.0).to(torch.float32)
    return attend | none_valid[:, None], shift
