"""3-D rotary position tables for the SUV video tokens (spec §2.5).

The head dim is split into three contiguous chunks ``(t, h, w)`` of widths ``hd/16 * (4, 6, 6)``; each
chunk is rotated "rotate-half" style (pairs ``(j, j + d/2)``) by its axis position divided by the
interpolation scale, base theta 10000. Text tokens get no positional encoding. The rotation itself is
the ``mm.ops.apply_rope`` kernel; this file only builds the cos/sin tables (fp32).
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_chunks(head_dim: int) -> tuple[int, int, int]:
    """Widths of the (t, h, w) chunks of the head dim."""
    if head_dim % 16:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 16 for the 3-D RoPE split")
    unit = head_dim // 16
    return 4 * unit, 6 * unit, 6 * unit


def _axis_angles(positions: torch.Tensor, width: int) -> torch.Tensor:
    """``[N] -> [N, width]`` angles laid out ``[theta_0..theta_{d/2-1}, theta_0..theta_{d/2-1}]``."""
    inv = ROPE_THETA ** (-torch.arange(0, width, 2, dtype=torch.float64, device=positions.device) / width)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cat([ang, ang], dim=-1)


def rope_tables(
    grid: tuple[int, int, int],
    head_dim: int,
    interpolation_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[t*h*w, head_dim]`` fp32 for a token grid ``(t, h, w)`` in ``s = (ti*h + hi)*w + wi`` order."""
    t, h, w = grid
    pos = torch.cartesian_prod(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device)
    ).reshape(t * h * w, 3)
    angles = torch.cat(
        [_axis_angles(pos[:, i] / interpolation_scale[i], width) for i, width in enumerate(rope_chunks(head_dim))],
        dim=-1,
    )
    return angles.cos().float(), angles.sin().float()
