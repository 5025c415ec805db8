"""Fake MindSpeed package root (only ``mindspeed.ops.npu_rotary_position_embedding`` is provided)."""
