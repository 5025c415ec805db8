"""Fake ``apex`` package root (only ``apex.normalization.fused_layer_norm`` is provided)."""
