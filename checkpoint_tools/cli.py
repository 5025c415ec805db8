"""``python -m checkpoint_tools <command>``: inspect, convert (and reshard), diff and verify SUV checkpoints of
every layout (see :mod:`checkpoint_tools`).

Exit codes: 0 success (``diff``: equal within tolerance; ``verify``: intact), 1 ``diff`` found differences
or ``verify`` found problems, 2 bad input (one ``error:`` line naming the problem).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import sys
import warnings
from pathlib import Path

import torch

from checkpoint_tools.keyspace import (
    OPTIMIZER_GROUPS,
    WEIGHT_GROUPS,
    CheckpointError,
    Source,
    TensorInfo,
    cast,
    weights_group,
)

FORMATS = ("ours", "released", "upstream-legacy", "mindspeed-mm", "diffusers")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# what each target layout can hold
_HOLDS_BOTH_WEIGHTS = ("ours", "upstream-legacy")
_HOLDS_OPTIMIZER = ("ours", "upstream-legacy")

logger = logging.getLogger("checkpoint_tools")


# ------------------------------------------------------------------------------------------------ open
def open_checkpoint(path: str | Path) -> Source:
    """Open a checkpoint of any supported layout for reading (the layout is detected)."""
    from checkpoint_tools.flat import DiffusersSource, ReleasedSource, is_diffusers_dir
    from checkpoint_tools.legacy import LegacySource, is_legacy_dir
    from checkpoint_tools.ours import OursSource, is_ours

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file():
        if path.suffix not in (".pt", ".pth", ".safetensors", ".ckpt"):
            raise CheckpointError(f"{path}: a single-file checkpoint must be .pt, .pth, .ckpt or .safetensors")
        return ReleasedSource(path)
    if is_diffusers_dir(path):
        return DiffusersSource(path)
    if is_ours(path):
        return OursSource(path)
    if is_legacy_dir(path):
        return LegacySource(path)
    raise CheckpointError(f"{path}: not a checkpoint of a known layout ({', '.join(FORMATS)})")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=None, leave=False)


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


def peak_rss_mib() -> float:
    """Peak resident set size of this process (VmHWM; ``ru_maxrss`` where /proc is missing)."""
    peak = _status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def start_memory_watch() -> float:
    """RSS now (after imports and opening the source); resets the peak counter to it where Linux allows
    (``/proc/self/clear_refs``), so ``peak_rss_mib() - start`` is the memory the work itself used."""
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then counts from process start
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    now = _status_mib("VmRSS")
    return now if now is not None else peak_rss_mib()


def _model_config(source: Source, mm_model: str | None) -> dict | None:
    """The config a diffusers folder records: the predictor block (SUV) or the "ae" block (WFVAE) of the
    model JSON, validated by the model's config reader; else what the source carries."""
    if mm_model is None:
        return source.config
    try:
        with open(mm_model) as f:
            model_json = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--mm-model {mm_model}: {e}")
    if source.model == "WFVAE":
        from mm.models.wfvae import WFVAEConfig

        if not isinstance(model_json.get("ae"), dict):
            raise CheckpointError(f"--mm-model {mm_model}: no 'ae' block for the WFVAE")
        WFVAEConfig.from_upstream_dict(model_json["ae"])
        return {k: v for k, v in model_json["ae"].items() if k != "from_pretrained"}
    from mm.models.suv_config import SUVConfig

    return SUVConfig.from_upstream(model_json).to_upstream()


# --------------------------------------------------------------------------------------------- convert
def convert(load: str, save: str, to: str, *, tp: int = 1, pp: int = 1, ema: bool | None = None,
            dtype: str | None = None, iteration: int | None = None, mm_model: str | None = None,
            max_shard_size_gb: float = 5.0) -> dict:
    """Convert the checkpoint at ``load`` to layout ``to`` at ``save``; returns a summary dict."""
    if to not in FORMATS:
        raise CheckpointError(f"--to {to!r}: unknown format, expected one of {', '.join(FORMATS)}")
    if tp < 1 or pp < 1:
        raise CheckpointError(f"--tp/--pp must be >= 1, got {tp}/{pp}")
    if to not in ("upstream-legacy", "mindspeed-mm") and (tp, pp) != (1, 1):
        raise CheckpointError(f"--tp/--pp apply to upstream-legacy and mindspeed-mm; {to} holds full tensors "
                              "(ours reshards to any TP/DP when it is loaded)")
    if to == "mindspeed-mm" and pp != 1:
        raise CheckpointError("mindspeed-mm checkpoints (MindSpeed-MM's OSP v1.5 converter) are TP-only: --pp must be 1")
    src = open_checkpoint(load)
    if src.model != "SUV" and to not in ("released", "diffusers"):
        raise CheckpointError(f"{load} holds a {src.model}: only the SUV is trained with megatron, so it converts "
                              "to released or diffusers only")
    out = Path(save)
    dt = DTYPES[dtype] if dtype else None
    notes = []
    if to in _HOLDS_BOTH_WEIGHTS and ema is None:
        weight_groups = [g for g in WEIGHT_GROUPS if g in src.groups()]
    else:
        weight_groups = [weights_group(src, ema)]
    if not weight_groups:
        raise CheckpointError(f"{load} holds no model weights")
    groups: dict[str, dict[str, TensorInfo]] = {
        g: {k: TensorInfo(i.shape, dt or i.dtype) for k, i in src.keys(g).items()} for g in weight_groups}
    opt = [g for g in OPTIMIZER_GROUPS if g in src.groups()]
    if opt and to in _HOLDS_OPTIMIZER:
        groups.update({g: src.keys(g) for g in opt})
    elif opt or "optimizer" in src.extra:
        notes.append(f"optimizer state dropped: {to} holds no optimizer state" if opt else src.extra["optimizer"])
    alias = {}
    if to in _HOLDS_BOTH_WEIGHTS and len(weight_groups) == 1:  # both weight sets are kept: one serves as both
        other = "ema" if weight_groups[0] == "raw" else "raw"
        groups[other] = groups[weight_groups[0]]
        alias[other] = weight_groups[0]
        notes.append(f"{src.format} weights ({weight_groups[0]}) written as both the weights and the EMA")

    def read(group: str, key: str) -> torch.Tensor:
        group = alias.get(group, group)
        t = src.read(group, key)
        return cast(t, dt) if group in WEIGHT_GROUPS else t

    import safetensors.torch  # noqa: F401  (imported before the memory watch: code is not working memory)
    import tqdm  # noqa: F401

    from checkpoint_tools import flat, legacy  # noqa: F401

    start_rss = start_memory_watch()
    it = iteration if iteration is not None else src.iteration
    total = sum(len(v) for v in groups.values())
    bar = _progress(total, f"{src.format} -> {to}")
    single = weight_groups[0]
    try:
        if to == "released":
            from checkpoint_tools.flat import write_released

            written = write_released(out, groups[single], lambda k: read(single, k), weights=single, iteration=it,
                                     config=src.config, progress=bar)
        elif to == "diffusers":
            from checkpoint_tools.flat import write_diffusers

            config = _model_config(src, mm_model)
            if config is None:
                raise CheckpointError(f"{load} carries no model config: pass --mm-model MODEL_JSON for config.json")
            written = write_diffusers(out, groups[single], lambda k: read(single, k), weights=single, iteration=it,
                                      config=config, class_name="SparseUMMDiT" if src.model == "SUV" else "WFVAE",
                                      max_shard_bytes=int(max_shard_size_gb * 2**30), progress=bar)
            from mm.training.checkpoint_manifest import write_manifest

            written.append(write_manifest(out))
        elif to in ("upstream-legacy", "mindspeed-mm"):
            from checkpoint_tools.legacy import write_legacy
            from mm.training.checkpoint_manifest import write_manifest

            consumed = src.common.get("samples_seen", src.extra.get("consumed_train_samples"))
            written = write_legacy(out, groups, read, tp=tp, pp=pp, iteration=it, mindspeed=to == "mindspeed-mm",
                                   optimizer_common=src.optimizer_common if opt else None, common=src.common,
                                   rng=src.rng, consumed_samples=consumed, progress=bar)
            written.append(write_manifest(written[0].parent.parent))
        else:
            from checkpoint_tools.ours import write_ours

            common = dict(src.common) or {"iteration": it or 0}
            written = write_ours(out, groups, read, iteration=it or 0, common=common,
                                 optimizer_common=src.optimizer_common if opt else None, rng=src.rng, progress=bar)
    finally:
        bar.close()
        src.close()
    return {"from": src.format, "to": to, "load": str(load), "save": str(out), "groups": sorted(groups),
            "tensors": total, "bytes": sum(p.stat().st_size for p in written if p.is_file()), "notes": notes,
            "peak_rss_mib": peak_rss_mib(), "start_rss_mib": start_rss}


# --------------------------------------------------------------------------------------------- inspect
def inspect(path: str) -> tuple[Source, list[str]]:
    src = open_checkpoint(path)
    have = src.groups()
    weights = weights_group(src, None)
    infos = src.keys(weights)
    dtypes = sorted({str(i.dtype).removeprefix("torch.") for i in infos.values()})
    size = sum(p.stat().st_size for p in src.files())
    lay = src.layout
    layout = " x ".join(f"{k.upper()} {v}" for k, v in lay.items()) if lay else "single file (no parallel layout)"
    consumed = src.common.get("samples_seen", src.extra.get("consumed_train_samples"))
    lines = [
        f"format:       {src.format} ({src.model})",
        f"path:         {src.path}",
        f"iteration:    {src.iteration if src.iteration is not None else 'n/a (release)'}",
        f"saved layout: {layout}",
        f"weights:      raw {'yes' if 'raw' in have else 'no'}, EMA {'yes' if 'ema' in have else 'no'}",
        f"optimizer:    {', '.join(g for g in have if g in OPTIMIZER_GROUPS) or src.extra.get('optimizer', 'no')}",
        f"consumed samples: {consumed if consumed is not None else 'not recorded'}",
        f"parameters:   {sum(i.numel for i in infos.values()):,} in {len(infos)} tensors ({weights})",
        f"dtype:        {', '.join(dtypes)}",
        f"total size:   {size / 2**20:,.1f} MiB in {len(src.files())} files",
    ]
    if src.config and src.model == "SUV":
        lines.append(f"model:        num_layers {src.config.get('num_layers')}, heads {src.config.get('num_heads')} "
                     f"x {src.config.get('head_dim')}")
    return src, lines


# ------------------------------------------------------------------------------------------------ diff
def diff(a: str, b: str, *, atol: float = 0.0, rtol: float = 0.0, ema: bool | None = None, all_groups: bool = False,
         show: int = 10) -> tuple[bool, list[str]]:
    """Compare two checkpoints tensor by tensor in the released key space. Returns (equal, report lines)."""
    sa, sb = open_checkpoint(a), open_checkpoint(b)
    if all_groups:
        pairs = [(g, g) for g in sa.groups() if g in sb.groups()]
        only = sorted(set(sa.groups()) ^ set(sb.groups()))
    else:
        pairs = [(weights_group(sa, ema), weights_group(sb, ema))]
        only = []
    lines, worst = [], []
    equal = not only
    if only:
        lines.append(f"groups in only one checkpoint: {', '.join(only)}")
    n = 0
    for ga, gb in pairs:
        ka, kb = sa.keys(ga), sb.keys(gb)
        for k in sorted(set(ka) ^ set(kb)):
            equal = False
            lines.append(f"{ga}: {k} only in {'A' if k in ka else 'B'}")
        common = [k for k in ka if k in kb]  # in A's order: the readers prefetch in file order
        bar = _progress(len(common), f"diff {ga}")
        for k in common:
            bar.update(1)
            n += 1
            if ka[k].shape != kb[k].shape:
                equal = False
                lines.append(f"{ga}: {k} shape {ka[k].shape} vs {kb[k].shape}")
                continue
            x, y = sa.read(ga, k).to(torch.float64), sb.read(gb, k).to(torch.float64)
            d = (x - y).abs()
            max_abs = float(d.max()) if d.numel() else 0.0
            ok = bool((d <= atol + rtol * y.abs()).all())
            equal &= ok
            worst.append((max_abs, ok, f"{ga}/{gb}", k, ka[k].dtype, kb[k].dtype))
        bar.close()
    worst.sort(key=lambda w: -w[0])
    if worst:
        lines.append(f"worst tensors (max |A - B|, A dtype / B dtype):")
        for max_abs, ok, g, k, da, db in worst[:show]:
            lines.append(f"  {'ok  ' if ok else 'DIFF'} {max_abs:.3e}  {g}  {k}  "
                         f"{str(da).removeprefix('torch.')}/{str(db).removeprefix('torch.')}")
    lines.append(f"{'equal' if equal else 'NOT equal'} within atol={atol:g} rtol={rtol:g}: {n} tensors compared "
                 f"({sa.format} {', '.join(p[0] for p in pairs)} vs {sb.format} {', '.join(p[1] for p in pairs)})")
    return equal, lines


# ---------------------------------------------------------------------------------------------- verify
def verify(path: str) -> list[str]:
    """Problems with a checkpoint against its manifest (``mm.training.checkpoint_manifest``)."""
    from mm.training.checkpoint_manifest import verify_manifest

    p = Path(path)
    if p.is_file():
        raise CheckpointError(f"{p} is a single file: verify checks the manifest of a checkpoint directory")
    from checkpoint_tools.flat import is_diffusers_dir
    from checkpoint_tools.legacy import find_iteration_dir, is_legacy_dir
    from checkpoint_tools.ours import is_ours, resolve_iteration_dir

    if not p.is_dir():
        raise CheckpointError(f"{p} does not exist")
    if is_diffusers_dir(p):
        d = p
    elif is_ours(p):
        d = resolve_iteration_dir(p)[0]
    elif is_legacy_dir(p):
        d = find_iteration_dir(p)[0]
    else:
        raise CheckpointError(f"{p}: not a checkpoint of a known layout ({', '.join(FORMATS)})")
    return verify_manifest(d)  # no tensor is opened: a damaged file is reported, not raised


# ------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m checkpoint_tools",
                                description="Inspect, convert/reshard, diff and verify SUV checkpoints "
                                            f"(layouts: {', '.join(FORMATS)}).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("inspect", help="what a checkpoint holds: layout, iteration, EMA/optimizer, size",
                       description="Print a checkpoint's format, iteration, saved TP/PP/DP layout, whether EMA and "
                                   "optimizer state are present, consumed samples, parameter count, dtype and size.")
    s.add_argument("path")
    s.add_argument("--keys", action="store_true", help="also list every tensor with its shape and dtype")
    c = sub.add_parser("convert", help="convert between layouts (and TP/PP sizes)",
                       description="Convert a checkpoint to another layout, streaming tensor by tensor. Optimizer "
                                   "state converts between ours and upstream-legacy; other targets drop it (said).")
    c.add_argument("--load", required=True, help="source checkpoint (any layout; detected)")
    c.add_argument("--save", required=True, help="target: a directory (ours, upstream-legacy, mindspeed-mm, "
                                                 "diffusers) or a .pt/.safetensors file (released)")
    c.add_argument("--to", required=True, help=f"target format: {', '.join(FORMATS)}")
    c.add_argument("--tp", type=int, default=1, help="TP size of an upstream-legacy / mindspeed-mm target")
    c.add_argument("--pp", type=int, default=1, help="PP size of an upstream-legacy target")
    w = c.add_mutually_exclusive_group()
    w.add_argument("--ema", dest="ema", action="store_true", default=None, help="convert the EMA weights only")
    w.add_argument("--raw", dest="ema", action="store_false", help="convert the trained (raw) weights only")
    c.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="store the weights in this dtype "
                   "(default: as in the source; optimizer state stays fp32)")
    c.add_argument("--iteration", type=int, default=None, help="iteration recorded in the target")
    c.add_argument("--mm-model", default=None, help="model JSON whose predictor (SUV) or ae (WFVAE) block becomes a "
                   "diffusers config.json")
    c.add_argument("--max-shard-size", type=float, default=5.0, help="diffusers shard size in GiB (default 5)")
    d = sub.add_parser("diff", help="compare two checkpoints tensor by tensor",
                       description="Compare two checkpoints of any layouts in the released key space; exit 0 only "
                                   "when equal within tolerance (default: bitwise).")
    d.add_argument("a")
    d.add_argument("b")
    d.add_argument("--atol", type=float, default=0.0)
    d.add_argument("--rtol", type=float, default=0.0)
    g = d.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_true", default=None, help="compare the EMA weights")
    g.add_argument("--raw", dest="ema", action="store_false", help="compare the raw weights")
    d.add_argument("--all", action="store_true", help="compare every tensor group (weights, EMA, optimizer state)")
    d.add_argument("--show", type=int, default=10, help="how many of the worst tensors to print")
    i = sub.add_parser("to-i2v", help="T2V checkpoint -> I2V layout (zero-initialised conditioning channels)",
                       description="Widen patch_embed to [noisy ; masked cond latents ; mask] input channels "
                                   "(new channels zero: the result starts as the T2V model) and write a released "
                                   "flat file; see checkpoint_tools.i2v.")
    i.add_argument("--load", required=True, help="T2V checkpoint (any layout; detected)")
    i.add_argument("--save", required=True, help="target .pt or .safetensors file")
    i.add_argument("--mask-channels", type=int, default=8, help="the VAE's temporal compression (8 for WFVAE)")
    ie = i.add_mutually_exclusive_group()
    ie.add_argument("--ema", dest="ema", action="store_true", default=None, help="convert the EMA weights")
    ie.add_argument("--raw", dest="ema", action="store_false", help="convert the raw weights")
    v = sub.add_parser("verify", help="check a checkpoint directory against its manifest (sizes, SHA-256)",
                       description="Check every file of a checkpoint directory against its manifest.json.")
    v.add_argument("path")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # megatron-core's import-time notes (no Transformer Engine / Apex) and DCP's "single process" note say
    # nothing about the checkpoint
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    try:
        if args.command == "inspect":
            src, lines = inspect(args.path)
            print("\n".join(lines))
            if args.keys:
                for g in src.groups():
                    for k, i in src.keys(g).items():
                        print(f"  {g:10s} {k}  {list(i.shape)}  {str(i.dtype).removeprefix('torch.')}")
            return 0
        if args.command == "convert":
            r = convert(args.load, args.save, args.to, tp=args.tp, pp=args.pp, ema=args.ema, dtype=args.dtype,
                        iteration=args.iteration, mm_model=args.mm_model, max_shard_size_gb=args.max_shard_size)
            for note in r["notes"]:
                print(f"note: {note}")
            print(f"converted {r['from']} -> {r['to']}: {r['tensors']} tensors ({', '.join(r['groups'])}), "
                  f"{r['bytes'] / 2**20:,.1f} MiB written to {r['save']}; peak RSS {r['peak_rss_mib']:,.0f} MiB "
                  f"({r['peak_rss_mib'] - r['start_rss_mib']:,.0f} MiB above the {r['start_rss_mib']:,.0f} MiB "
                  "after start-up)")
            return 0
        if args.command == "diff":
            equal, lines = diff(args.a, args.b, atol=args.atol, rtol=args.rtol, ema=args.ema,
                                all_groups=args.all, show=args.show)
            print("\n".join(lines))
            print(f"peak RSS {peak_rss_mib():,.0f} MiB")
            return 0 if equal else 1
        if args.command == "to-i2v":
            from checkpoint_tools.i2v import t2v_to_i2v

            r = t2v_to_i2v(args.load, args.save, mask_channels=args.mask_channels, ema=args.ema)
            print(f"converted the {r['group']} weights to the I2V layout: {r['tensors']} tensors, patch_embed takes "
                  f"{r['in_channels']} channels, written to {r['save']}")
            return 0
        problems = verify(args.path)
        for line in problems:
            print(line)
        print("ok: every file matches the manifest" if not problems else f"{len(problems)} problem(s)")
        return 0 if not problems else 1
    except (CheckpointError, ValueError, FileNotFoundError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2
