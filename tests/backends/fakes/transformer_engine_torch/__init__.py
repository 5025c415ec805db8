"""Fake ``transformer_engine_torch`` (TE >= 2.x pybind module): the fused norm kernels behind TE's
``RMSNorm``/``LayerNorm`` ops, with their call contract:

* ``rmsnorm_fwd(x, gamma, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma)`` ->
  ``(y, None, rsigma)``; ``rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma)`` -> ``(dx, dgamma)``;
* ``layernorm_fwd(x, gamma, beta, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma)`` ->
  ``(y, mu, rsigma)``; ``layernorm_bwd(dz, x, mu, rsigma, gamma, sm_margin, zero_centered_gamma)`` ->
  ``(dx, dgamma, dbeta)``.

``x``/``dz`` are 2-D ``[N, H]`` contiguous; gamma/beta ``[H]`` in x's dtype; statistics fp32 ``[N]``; math in
fp32, outputs in x's dtype (``otype`` must name it). No autograd: the caller's backward calls ``*_bwd``.
"""

import enum

import torch

calls = {"rmsnorm_fwd": 0, "rmsnorm_bwd": 0, "layernorm_fwd": 0, "layernorm_bwd": 0}


class DType(enum.Enum):
    kFloat32 = "float32"
    kFloat16 = "float16"
    kBFloat16 = "bfloat16"


def _check(x, otype, zero_centered_gamma, *params):
    if x.dim() != 2 or not x.is_contiguous():
        raise RuntimeError(f"input must be a contiguous 2-D [N, H] tensor, got {tuple(x.shape)}")
    for p in params:
        if p.dtype != x.dtype or tuple(p.shape) != (x.shape[1],):
            raise RuntimeError(f"param {p.dtype} {tuple(p.shape)} vs input {x.dtype} [N, {x.shape[1]}]")
    if otype is not None and otype.value != str(x.dtype).removeprefix("torch."):
        raise RuntimeError(f"otype {otype} does not name the input dtype {x.dtype}")
    if zero_centered_gamma:
        raise RuntimeError("fake: zero_centered_gamma is not modelled")


def rmsnorm_fwd(x, gamma, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma):
    calls["rmsnorm_fwd"] += 1
    _check(x, otype, zero_centered_gamma, gamma)
    xf = x.float()
    rsigma = torch.rsqrt(xf.pow(2).mean(-1) + eps)
    return (xf * rsigma[:, None] * gamma.float()).to(x.dtype), None, rsigma


def rmsnorm_bwd(dz, x, rsigma, gamma, sm_margin, zero_centered_gamma):
    calls["rmsnorm_bwd"] += 1
    _check(x, None, zero_centered_gamma, gamma)
    _check(dz, None, False)
    xf, r, g = x.float(), rsigma[:, None], dz.float() * gamma.float()
    dx = r * g - xf * r.pow(3) * (g * xf).mean(-1, keepdim=True)
    dgamma = (dz.float() * xf * r).sum(0)
    return dx.to(x.dtype), dgamma.to(gamma.dtype)


def layernorm_fwd(x, gamma, beta, eps, ln_out, quantizer, otype, sm_margin, zero_centered_gamma):
    calls["layernorm_fwd"] += 1
    _check(x, otype, zero_centered_gamma, gamma, beta)
    xf = x.float()
    mu = xf.mean(-1)
    rsigma = torch.rsqrt((xf - mu[:, None]).pow(2).mean(-1) + eps)
    y = (xf - mu[:, None]) * rsigma[:, None] * gamma.float() + beta.float()
    return y.to(x.dtype), mu, rsigma


def layernorm_bwd(dz, x, mu, rsigma, gamma, sm_margin, zero_centered_gamma):
    calls["layernorm_bwd"] += 1
    _check(x, None, zero_centered_gamma, gamma)
    _check(dz, None, False)
    xhat = (x.float() - mu[:, None]) * rsigma[:, None]
    g = dz.float() * gamma.float()
    dx = rsigma[:, None] * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dz.float() * xhat).sum(0).to(gamma.dtype), dz.float().sum(0).to(gamma.dtype)
