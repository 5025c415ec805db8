"""Device checks, one per command: ``python tests/backends/device_suite.py CHECK [--out FILE]``.

Each check runs in its own process with the accelerator backend (``MM_BACKEND``, default ``auto``: cuda,
else npu) because the pytest session is pinned to the cpu backend (tests/conftest.py). It prints one JSON
line with what it measured (and writes it to ``--out``) and exits non-zero when a check fails.
``tests/backends/test_device.py`` runs them under pytest (skipped without a device);
``make device-check`` runs that plus ``timing``.

Checks:
* ``kernels``: attention (key mask / none, with gradients), the ring's block kernel (two key blocks, one fully
  masked for a sample: merged out/lse, backward from them), rms_norm, layer_norm, RoPE of the selected
  backend on the device vs ``mm.ops.reference`` on the CPU, fp32 and bf16;
* ``suv``: the tiny SUV forward + backward on the device vs the same weights on the CPU (fp32);
* ``train``: two training steps of the tiny preset on one device, bf16, distributed optimizer, saved;
* ``inference``: one prompt through ``inference_sora.py`` from that checkpoint (mp4 + sidecar);
* ``timing``: attention fwd+bwd TFLOP/s at 8k and 32k tokens for Skiparse k = 1, 4, 8 (cuda: flash-attn
  varlen and torch SDPA with a boolean mask, the two ``MM_CUDA_ATTENTION`` choices, and the fastest per row;
  npu: the backend's kernel and SDPA), and one SUV training step at a mid-size config with MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from mm.ops import reference, select_backend  # noqa: E402

# |device - reference| <= atol + rtol * |reference| (reference in fp32 on the CPU; bf16: ~2 ulps)
TOL = {"float32": (1e-4, 1e-3), "bfloat16": (1e-2, 2e-2)}
# --cpu-dry-run: every check's code on the cpu backend at toy sizes, to test this script without a device
# (its numbers say nothing about an accelerator and are labelled so)
DRY_RUN = False


class CheckFailed(AssertionError):
    """A device check whose result is outside its tolerance (the message names the check and the numbers)."""


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def _backend():
    backend = select_backend("cpu" if DRY_RUN else os.environ.get("MM_BACKEND", "auto"))
    if backend.device_type == "cpu" and not DRY_RUN:
        raise CheckFailed("no accelerator backend: the device checks need CUDA or an Ascend NPU")
    from mm.distributed.init import init_device

    return backend, init_device()


def _max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().float().cpu() - want.detach().float()).abs().max())


def _tol_ratio(got: torch.Tensor, want: torch.Tensor, dtype_name: str) -> float:
    """max of |got - want| / (atol + rtol |want|): <= 1 passes."""
    atol, rtol = TOL[dtype_name]
    want = want.detach().float()
    return float(((got.detach().float().cpu() - want).abs() / (atol + rtol * want.abs())).max())


# ------------------------------------------------------------------------------------------------ kernels
def _ring_block_pairs(k, dev, q, kk, v, go, mask, name) -> dict:
    """The ring's block kernel over two key blocks (the second fully masked for sample 0): merged out and lse,
    and each block's (dq, dk, dv) from the merged out/lse, on the device vs the cpu kernel in fp32."""
    from mm.distributed.ring_attention import merge_blocks

    half = kk.shape[1] // 2
    bias = torch.zeros(mask.shape).masked_fill_(~mask, reference.MASKED_BIAS)
    bias[0, half:] = reference.MASKED_BIAS
    blocks = [(slice(0, half)), slice(half, kk.shape[1])]
    dev_merged, ref_merged = (None, None), (None, None)
    for sl in blocks:
        dev_merged = merge_blocks(*dev_merged, *k["attention_block"](
            q.to(dev), kk[:, sl].to(dev), v[:, sl].to(dev), bias[:, sl].to(dev), 0.125))
        ref_merged = merge_blocks(*ref_merged, *reference.attention_block(
            q.float(), kk[:, sl].float(), v[:, sl].float(), bias[:, sl], 0.125))
    out = dev_merged[0].to(q.dtype)
    pairs = {f"ring_block_out_{name}": (out, ref_merged[0]), f"ring_block_lse_{name}": (dev_merged[1], ref_merged[1])}
    for i, sl in enumerate(blocks):
        got = k["attention_block_backward"](go.to(dev), q.to(dev), kk[:, sl].to(dev), v[:, sl].to(dev), out,
                                            dev_merged[1], bias[:, sl].to(dev), 0.125)
        want = reference.attention_block_backward(go.float(), q.float(), kk[:, sl].float(), v[:, sl].float(),
                                                  ref_merged[0], ref_merged[1], bias[:, sl], 0.125)
        pairs.update({f"ring_block{i}_grad_{'qkv'[j]}_{name}": (a, r) for j, (a, r) in enumerate(zip(got, want))})
    return pairs


def check_kernels() -> dict:
    backend, dev = _backend()
    k = backend.kernels
    g = torch.Generator().manual_seed(0)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    b, sq, sk, h, d = 2, 77, 96, 4, 64
    mask = torch.rand(b, sk, generator=g) > 0.3
    mask[:, 0] = True
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        q, kk, v = (torch.randn(b, s, h, d, generator=g).to(dtype) for s in (sq, sk, sk))
        go = torch.randn(b, sq, h, d, generator=g).to(dtype)
        for masked in (True, False):
            km = mask if masked else None
            leaves = [t.float().requires_grad_() for t in (q, kk, v)]
            ref = reference.attention(*leaves, km, 0.125)
            ref_grads = torch.autograd.grad(ref, leaves, go.float())
            dev_leaves = [t.to(dev).requires_grad_() for t in (q, kk, v)]
            out = k["attention"](*dev_leaves, None if km is None else km.to(dev), 0.125)
            grads = torch.autograd.grad(out, dev_leaves, go.to(dev))
            tag = f"attention_{'mask' if masked else 'nomask'}_{name}"
            pairs[tag] = (out, ref)
            for i, (a, r) in enumerate(zip(grads, ref_grads)):
                pairs[f"{tag}_grad_{'qkv'[i]}"] = (a, r)
        x = (2 * torch.randn(3, 50, 256, generator=g)).to(dtype)
        w, bias = (1 + 0.1 * torch.randn(256, generator=g)).to(dtype), (0.1 * torch.randn(256, generator=g)).to(dtype)
        pairs[f"rms_norm_{name}"] = (k["rms_norm"](x.to(dev), w.to(dev), 1e-6),
                                     reference.rms_norm(x.float(), w.float(), 1e-6))
        pairs[f"layer_norm_{name}"] = (k["layer_norm"](x.to(dev), w.to(dev), bias.to(dev), 1e-6),
                                       reference.layer_norm(x.float(), w.float(), bias.float(), 1e-6))
        pairs.update(_ring_block_pairs(k, dev, q, kk, v, go, mask, name))
        chunks = (32, 48, 48)
        xr = torch.randn(2, 40, h, sum(chunks), generator=g).to(dtype)
        ang = torch.rand(1, 40, 1, sum(chunks), generator=g) * 6
        pairs[f"rope_{name}"] = (k["apply_rope"](xr.to(dev), ang.cos().to(dev), ang.sin().to(dev), chunks),
                                 reference.apply_rope(xr.float(), ang.cos(), ang.sin(), chunks))
    errors = {t: round(_max_err(a, r), 6) for t, (a, r) in pairs.items()}
    ratios = {t: round(_tol_ratio(a, r, "bfloat16" if "bfloat16" in t else "float32"), 3) for t, (a, r) in pairs.items()}
    result = {"device": backend.device_name(), "kernels": backend.kernel_table(), "max_abs_error": errors,
              "error_over_tolerance": ratios, "tolerance_atol_rtol": TOL}
    bad = {t: r for t, r in ratios.items() if not r <= 1.0}
    _expect(not bad, f"kernels differ from the reference beyond tolerance (ratio > 1): {bad}")
    return result


# ------------------------------------------------------------------------------------------------ suv
def _suv_inputs(cfg, g, batch=2, t=3, hw=8, text_len=12):
    x = torch.randn(batch, cfg.in_channels, t, hw, hw, generator=g)
    ts = torch.rand(batch, generator=g) * 1000
    text = torch.randn(batch, text_len, cfg.caption_channels, generator=g)
    text_mask = torch.ones(batch, text_len, dtype=torch.int64)
    text_mask[1, text_len // 2:] = 0  # a padded caption: the key-mask path
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    video_mask = torch.ones(batch, t, hw, hw, dtype=torch.int64)
    return x, ts, text, text_mask, pooled, video_mask


@contextlib.contextmanager
def _reference_kernels(backend):
    saved = dict(backend.kernels)
    backend.kernels.update(reference.kernels())
    try:
        yield
    finally:
        backend.kernels.update(saved)


def check_suv() -> dict:
    backend, dev = _backend()
    from mm.models.sparse_ummdit import SparseUMMDiT
    from mm.models.suv_config import tiny_suv_config

    torch.manual_seed(0)
    cpu_model = SparseUMMDiT.from_upstream(tiny_suv_config())
    for name, p in cpu_model.named_parameters():  # non-zero skip merges: every path of the U matters
        if "skip_norm_linear" in name:
            p.data.normal_(0, 0.05)
    dev_model = SparseUMMDiT.from_upstream(tiny_suv_config(), device=dev)
    dev_model.load_state_dict(cpu_model.state_dict())
    _expect(all(p.device.type == dev.type for p in dev_model.parameters()), "SUV parameters not all on the device")
    inputs = _suv_inputs(cpu_model.suv_config, torch.Generator().manual_seed(1))
    with _reference_kernels(backend):  # the CPU copy runs the oracle, not the device kernels
        ref = cpu_model(*inputs)
        ref.square().mean().backward()
    out = dev_model(*(t.to(dev) for t in inputs))
    out.square().mean().backward()
    grad_err = max(_max_err(pd.grad, pc.grad) for pc, pd in zip(cpu_model.parameters(), dev_model.parameters())
                   if pc.grad is not None)
    result = {"device": backend.device_name(), "forward_max_abs_error": _max_err(out, ref),
              "grad_max_abs_error": grad_err}
    _expect(result["forward_max_abs_error"] < 1e-3 and grad_err < 1e-3, f"SUV device != CPU: {result}")
    return result


# ------------------------------------------------------------------------------------------------ train + inference
def _workspace() -> Path:
    root = Path(os.environ.get("MM_DEVICE_CHECK_WORK") or tempfile.mkdtemp(prefix="mm_device_check_"))
    if not (root / "model.json").exists():
        from tiny_workspace import make_workspace

        make_workspace(root, num=2, cfg_rate=0.0)
    return root


def check_train() -> dict:
    backend, dev = _backend()
    from mm.training.ema_adamw import EMA_KEY
    from tiny_workspace import tiny_trainer

    root = _workspace()
    ws = {"model": str(root / "model.json"), "data": str(root / "data.json")}
    t = tiny_trainer(ws, iters=2, bf16=True, save=str(root / "ckpt"))
    losses = [r.loss for r in t.train()]
    inner = t.optimizer.optimizer
    main = [p for grp in inner.param_groups for p in grp["params"]]
    where = {p.device.type for p in t.model.parameters()} | {p.device.type for p in main} | \
        {inner.state[p][EMA_KEY].device.type for p in main}
    t.close()
    # resume for one more step: the optimizer state comes back on the device, with the device's kernel
    resumed = tiny_trainer(ws, iters=3, bf16=True, save=str(root / "ckpt_resumed"), load=str(root / "ckpt"))
    losses += [r.loss for r in resumed.train()]
    result = {"device": backend.device_name(), "losses": losses, "optimizer": t.optimizer_kind,
              "optimizer_after_resume": resumed.optimizer_kind, "tensor_devices": sorted(where),
              "checkpoint": str(root / "ckpt")}
    resumed.close()
    _expect(len(losses) == 3 and all(math.isfinite(x) for x in losses), f"losses {losses}")
    _expect(where == {dev.type}, f"model/optimizer/EMA tensors not all on {dev.type}: {sorted(where)}")
    if dev.type == "cuda":  # torch AdamW must run fused on CUDA (TE/apex FusedAdam are fused anyway)
        _expect(all("foreach" not in k for k in (t.optimizer_kind, resumed.optimizer_kind)),
                f"AdamW not fused on cuda: {t.optimizer_kind} / after resume {resumed.optimizer_kind}")
    return result


def check_inference() -> dict:
    backend, _ = _backend()
    root = _workspace()
    if not (root / "ckpt").exists():
        check_train()
    out = root / "samples"
    prompts = root / "one_prompt.txt"
    prompts.write_text("a red square moving right\n")
    cmd = [sys.executable, str(ROOT / "inference_sora.py"), "--mm-model", str(root / "inference.json"), "--load",
           str(root / "ckpt"), "--prompt-file", str(prompts), "--save-path", str(out), "--num-inference-steps", "2",
           "--no-progress"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _expect(proc.returncode == 0, f"inference_sora.py exit {proc.returncode}: {proc.stderr[-3000:]}")
    videos = sorted(p.name for p in out.glob("*.mp4")) + sorted(p.name for p in out.glob("*.png"))
    sidecars = sorted(p.name for p in out.glob("*.json"))
    _expect(len(videos) == 1 and len(sidecars) >= 1, f"expected one sample + sidecar in {out}: {videos} {sidecars}")
    return {"device": backend.device_name(), "outputs": videos + sidecars, "seconds": round(time.time() - t0, 1)}


# ------------------------------------------------------------------------------------------------ timing
def _timed(fn, repeats: int) -> float:
    sync = (lambda: None) if DRY_RUN else torch.accelerator.synchronize
    fn()
    fn()  # warm-up (autotuning, compilation)
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def _attention_impls(backend) -> dict:
    """What the table times: on cuda every ``MM_CUDA_ATTENTION`` implementation installed (flash, sdpa), so
    the row's ``fastest`` is the measurement behind that setting; elsewhere the backend's kernel and SDPA."""
    from mm import ops
    from mm.ops.registry import backend_module

    module = backend_module(backend.name)
    if hasattr(module, "attention_impls"):
        return module.attention_impls()
    return {"backend": ops.attention, "sdpa": reference.attention}


def _attention_table(backend, dev, heads=24, head_dim=128, repeats=5) -> list[dict]:
    """fwd+bwd of one joint attention call: k sub-sequences of S/k tokens (Skiparse), ~5% padded keys."""
    impls = _attention_impls(backend)
    rows = []
    if DRY_RUN:
        heads, head_dim, repeats = 2, 16, 1
    for total in ((256, 512) if DRY_RUN else (8192, 32768)):
        for k in (1, 4, 8):
            s = total // k
            q, kk, v = (torch.randn(k, s, heads, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
                        for _ in range(3))
            mask = torch.ones(k, s, dtype=torch.bool, device=dev)
            mask[:, s - s // 20:] = False
            go = torch.randn(k, s, heads, head_dim, device=dev, dtype=torch.bfloat16)
            # model FLOPs: QK^T and PV = 4*k*H*S_k^2*D forward; backward = 2.5x forward (flash-attn convention)
            flops = 3.5 * 4 * k * heads * s * s * head_dim
            row = {"tokens": total, "k": k}
            for label, fn in impls.items():
                def step(fn=fn):
                    out = fn(q, kk, v, mask, None)
                    torch.autograd.grad(out, (q, kk, v), go)

                sec = _timed(step, repeats)
                row[f"{label}_ms"] = round(sec * 1e3, 3)
                row[f"{label}_tflops"] = round(flops / sec / 1e12, 1)
            row["fastest"] = min(impls, key=lambda label: row[f"{label}_ms"])
            rows.append(row)
            del q, kk, v, go
    return rows


def _suv_step(backend, dev) -> dict:
    """One training step (fwd + bwd + EMA optimizer) of a mid-size SUV on one device, bf16, with MFU."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from mm.config import ParallelConfig
    from mm.distributed.init import init_parallel
    from mm.distributed.parallelize import wrap_ddp
    from mm.models.sparse_ummdit import SparseUMMDiT
    from mm.models.suv_config import SUVConfig
    from mm.training.ema_adamw import fuse_inner_optimizers, make_ema_optimizer
    from mm.training.metrics import SUVShape, mfu, peak_tflops_for, train_flops

    ps = init_parallel(ParallelConfig())
    cfg = SUVConfig(num_layers=[2, 2, 2, 2, 2, 2, 2], sparse_n=[1, 2, 4, 8, 4, 2, 1], num_heads=12, head_dim=128)
    latent, text_len = (8, 48, 48), 512  # 8 x 24 x 24 = 4608 video tokens + 512 caption tokens
    if DRY_RUN:
        cfg = SUVConfig(num_layers=[2, 2, 2], sparse_n=[1, 2, 1], num_heads=2, head_dim=16, in_channels=4,
                        out_channels=4, timestep_embed_dim=32, caption_channels=32, pooled_projection_dim=16)
        latent, text_len = (2, 8, 8), 8
    model = SparseUMMDiT(cfg, ps, torch.bfloat16, device=dev)
    model.train()
    ddp = wrap_ddp(model, use_distributed_optimizer=True)
    opt = make_ema_optimizer(get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-5, bf16=True, params_dtype=torch.bfloat16, clip_grad=0.0,
                        use_distributed_optimizer=True), [ddp]), 0.9999)
    kind = fuse_inner_optimizers(opt, dev)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, *latent, generator=g).to(dev, torch.bfloat16)
    ts = torch.full((1,), 500.0, device=dev)
    text = torch.randn(1, text_len, cfg.caption_channels, generator=g).to(dev, torch.bfloat16)
    text_mask = torch.ones(1, text_len, dtype=torch.int64, device=dev)
    text_mask[:, 300:] = 0
    pooled = torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dev, torch.bfloat16)
    video_mask = torch.ones(1, *latent, dtype=torch.int64, device=dev)

    def step():
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(x, ts, text, text_mask, pooled, video_mask).float().square().mean().backward()
        ddp.finish_grad_sync()
        opt.step()

    sec = _timed(step, 3)
    flops = train_flops(SUVShape(tuple(cfg.num_layers), tuple(cfg.effective_sparse_n()), cfg.hidden_size,
                                 cfg.timestep_embed_dim, cfg.patch_size, cfg.patch_size_t), latent, text_len, 1)
    name = backend.device_name()
    m = mfu(flops, sec, 1, peak_tflops_for(name))
    return {"config": {"num_layers": cfg.num_layers, "sparse_n": cfg.sparse_n, "hidden": cfg.hidden_size,
                       "latent_thw": latent, "text_len": text_len},
            "params": sum(p.numel() for p in model.parameters()), "optimizer": kind, "step_s": round(sec, 4),
            "tflops": round(flops / sec / 1e12, 1), "mfu": None if m is None else round(m, 4),
            "peak_tflops": peak_tflops_for(name)}


def check_timing() -> dict:
    backend, dev = _backend()
    t0 = time.time()
    result = {"device": backend.device_name() + (" (cpu dry run: toy sizes)" if DRY_RUN else ""),
              "kernels": backend.kernel_table(), "attention_fwd_bwd": _attention_table(backend, dev)}
    from mm.ops.registry import backend_module

    choice = getattr(backend_module(backend.name), "ATTENTION", None)
    if choice is not None:  # cuda: the setting in force, and what the table says (MM_CUDA_ATTENTION)
        rows = result["attention_fwd_bwd"]
        result["attention_setting"] = {"MM_CUDA_ATTENTION": choice, "fastest_per_row": sorted(
            {r["fastest"] for r in rows}), "fastest_at_32k": sorted({r["fastest"] for r in rows if r["tokens"] >= 32768})}
    result["suv_train_step"] = _suv_step(backend, dev)
    result["seconds"] = round(time.time() - t0, 1)
    return result


CHECKS = {"kernels": check_kernels, "suv": check_suv, "train": check_train, "inference": check_inference,
          "timing": check_timing}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("check", choices=sorted(CHECKS))
    p.add_argument("--out", help="also write the result JSON here")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run the check's code on the cpu backend at toy sizes (tests this script; no device numbers)")
    a = p.parse_args(argv)
    global DRY_RUN
    DRY_RUN = a.cpu_dry_run
    try:
        result, status = CHECKS[a.check](), 0
    except CheckFailed as e:
        result, status = {"error": str(e)}, 1
    line = json.dumps({"check": a.check, **result}, default=str)
    print(line)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
