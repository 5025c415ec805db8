"""Fake apex fused norms: fp32 statistics and affine, output in the input dtype; weight/bias must share
the input dtype (the real CUDA kernels dispatch on one dtype)."""

import torch


def _check(x, normalized_shape, *params):
    if tuple(normalized_shape) != tuple(x.shape[-len(normalized_shape):]):
        raise RuntimeError(f"normalized_shape {tuple(normalized_shape)} does not match input {tuple(x.shape)}")
    for p in params:
        if p.dtype != x.dtype or tuple(p.shape) != tuple(normalized_shape):
            raise RuntimeError(f"param {p.dtype} {tuple(p.shape)} vs input {x.dtype} / {tuple(normalized_shape)}")


def fused_rms_norm(input, normalized_shape, eps=1e-6, memory_efficient=False):
    _check(input, normalized_shape)
    xf = input.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(input.dtype)


def fused_rms_norm_affine(input, weight, normalized_shape, eps=1e-6, memory_efficient=False):
    _check(input, normalized_shape, weight)
    xf = input.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(input.dtype)


def fused_layer_norm(input, normalized_shape, eps=1e-6, memory_efficient=False):
    _check(input, normalized_shape)
    xf = input.float()
    mean = xf.mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)).to(input.dtype)


def fused_layer_norm_affine(input, weight, bias, normalized_shape, eps=1e-6, memory_efficient=False):
    _check(input, normalized_shape, weight, bias)
    xf = input.float()
    mean = xf.mean(-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() + bias.float()).to(input.dtype)
