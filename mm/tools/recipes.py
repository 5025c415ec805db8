"""The Open-Sora Plan v1.5 training stages (spec §11.4) as data, and what a stage means on a given cluster.

    python -m mm.tools.recipes list
    python -m mm.tools.recipes render STAGE --world-size N --pretrained DIR --out RUN_DIR [--data data.txt]

``render`` writes ``RUN_DIR/model.json`` and ``RUN_DIR/data.json`` (the released JSONs next to this
repository's ``examples/opensoraplan1.5/`` with the stage's shape, fps, sparsity, micro-batch and gradient
accumulation filled in, every input path absolute) and prints the stage's ``pretrain_sora.py`` flags, one
per line, for ``examples/opensoraplan1.5/train.sh``. The number of micro-batches per step follows from the
global batch, the data-parallel size of this world and the micro-batch; numbers that do not divide are
refused with one ``error:`` line (exit 2).

Paths are resolved one way: every ``pretrained/...`` entry of the released JSONs becomes
``<--pretrained>/...``; any other relative input path resolves against the JSON file that holds it (as the
loaders do) and is written absolute.

Values from the report: devices, shapes, fps, learning rates, global batches, steps, and for Video-1/3/4
the TP/SP, GA and micro-batch. Values the report does not give are our choices, named in ``notes`` and
checked by the planner (``tests/unit/test_recipes.py``: every stage fits on its devices as 910B 64 GB).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "opensoraplan1.5"
RELEASED_MODEL = EXAMPLES / "model_opensoraplan1_5.json"
RELEASED_DATA = EXAMPLES / "data.json"


@dataclass(frozen=True)
class Stage:
    name: str
    devices: int  # as reported
    frames: int
    height: int
    width: int
    fps: int
    lr: float
    global_batch: int
    train_iters: int
    tp: int
    micro_batch: int
    grad_accum: int  # at the reported device count
    sparse: bool  # SUV skiparse (sparse1d) or dense attention everywhere
    init: str  # "scratch" or the stage whose final weights start this one
    multi_res: bool = False  # images: 5 aspect ratios around height x width pixels
    cp: int = 1
    recompute_ffn_layers: int = 32  # selective recompute (FFN half) of the first N blocks; 0 = none
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def min_lr(self) -> float:
        return self.lr


SUV_INIT = ("The U-shaped model always carries its long-skip linears; skip_connection_zero_init makes them "
            "[I | 0] at init, i.e. the identity on the current stream.")
MULTI_RES = ("Multi-resolution: 5 aspect ratios (force_5_ratio) with a pixel area between half and all of HxW; the "
             "report gives no token bounds.")
OUR_LAYOUT = "TP/SP, micro-batch and GA are not in the report: our choice, feasible per mm.tools.plan on 910B 64 GB."

STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("Image-1", 512, 1, 256, 256, 24, 1e-4, 8192, 225_000, tp=2, micro_batch=16, grad_accum=2, sparse=False,
          init="scratch", multi_res=True,
          notes=("The report's batch reads 8096, which no data-parallel size of 512 devices divides; 8192 = 512 x 16.",
                 "Dense: the report trained a dense MMDiT here; we train the same U-shaped network with sparse1d "
                 "off. " + SUV_INIT, MULTI_RES, OUR_LAYOUT)),
    Stage("Image-2", 384, 1, 384, 384, 24, 1e-4, 6144, 150_000, tp=2, micro_batch=8, grad_accum=4, sparse=False,
          init="Image-1", multi_res=True, notes=(MULTI_RES, OUR_LAYOUT)),
    Stage("Image-3", 256, 1, 288, 512, 24, 1e-4, 4096, 110_000, tp=2, micro_batch=8, grad_accum=4, sparse=False,
          init="Image-2", notes=(OUR_LAYOUT,)),
    Stage("Image-4", 256, 1, 288, 512, 24, 1e-4, 4096, 160_000, tp=2, micro_batch=8, grad_accum=4, sparse=True,
          init="Image-3", notes=("Converted to SUV: Skiparse switched on (sparse1d), same weights. " + SUV_INIT,
                                 OUR_LAYOUT)),
    Stage("Video-1", 512, 57, 288, 512, 24, 6e-5, 1024, 40_000, tp=2, micro_batch=2, grad_accum=2, sparse=True,
          init="Image-4", notes=("Video only, 9:16.",)),
    Stage("Video-2", 512, 57, 288, 512, 12, 6e-5, 1024, 45_000, tp=2, micro_batch=2, grad_accum=2, sparse=True,
          init="Video-1", notes=("12 fps: longer content per sample. Layout not in the report: Video-1's (same "
                                 "shape).",)),
    Stage("Video-3", 512, 121, 288, 512, 24, 4e-5, 1024, 25_000, tp=4, micro_batch=4, grad_accum=2, sparse=True,
          init="Video-2"),
    Stage("Video-4", 512, 121, 576, 1024, 24, 2e-5, 512, 16_000, tp=4, micro_batch=1, grad_accum=4, sparse=True,
          init="Video-3", notes=("First part of Video-4 (lr 2e-5, 16 k steps); Video-4b continues at 1e-5.",)),
    Stage("Video-4b", 512, 121, 576, 1024, 24, 1e-5, 512, 9_000, tp=4, micro_batch=1, grad_accum=4, sparse=True,
          init="Video-4", notes=("Second part of Video-4 (lr 1e-5, 9 k steps).",)),
    Stage("Video-5", 512, 121, 576, 1024, 24, 1e-5, 512, 5_000, tp=4, micro_batch=1, grad_accum=4, sparse=True,
          init="Video-4b", notes=("High-quality subset: point --data at it. Layout not in the report: Video-4's.",)),
)}


def micro_batches(stage: Stage, world_size: int, global_batch: int | None = None) -> tuple[int, int]:
    """(data-parallel size, micro-batches per step) of ``stage`` on ``world_size`` devices; ``ValueError``
    naming the numbers when they do not divide."""
    gbs = global_batch or stage.global_batch
    group = stage.tp * stage.cp
    if world_size < 1 or world_size % group:
        raise ValueError(f"stage {stage.name}: world size {world_size} is not a multiple of TP x CP = {group}")
    dp = world_size // group
    if gbs % (stage.micro_batch * dp):
        raise ValueError(f"stage {stage.name}: global batch {gbs} is not divisible by micro-batch "
                         f"{stage.micro_batch} x data-parallel size {dp} (= world {world_size} / TP x CP {group})")
    return dp, gbs // (stage.micro_batch * dp)


def _absolute(value, base: Path, pretrained: Path):
    if not isinstance(value, str) or not value:
        return value
    p = Path(value)
    if p.is_absolute():
        return value
    if p.parts[0] == "pretrained":
        return str(pretrained.joinpath(*p.parts[1:]))
    return str((base / p).resolve())


def render_model(stage: Stage, pretrained: Path, init_weights: str | None = None) -> dict:
    doc = json.loads(RELEASED_MODEL.read_text())
    for block in ("ae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        if block in doc and "from_pretrained" in doc[block]:
            doc[block]["from_pretrained"] = _absolute(doc[block]["from_pretrained"], EXAMPLES, pretrained)
    doc["frames"] = stage.frames
    doc["predictor"]["sparse1d"] = stage.sparse
    doc["predictor"]["from_pretrained"] = str(Path(init_weights).resolve()) if init_weights else None
    return doc


def render_data(stage: Stage, pretrained: Path, grad_accum: int, data_txt: str | None = None) -> dict:
    doc = copy.deepcopy(json.loads(RELEASED_DATA.read_text()))
    ds = doc["dataset_param"]
    pre = ds["preprocess_parameters"]
    basic = ds["basic_parameters"]
    basic["data_path"] = str(Path(data_txt).resolve()) if data_txt else _absolute(basic["data_path"], EXAMPLES, pretrained)
    if basic.get("data_folder"):
        basic["data_folder"] = _absolute(basic["data_folder"], EXAMPLES, pretrained)
    for key in ("tokenizer_config", "tokenizer_config_2"):
        ds[key]["from_pretrained"] = _absolute(ds[key]["from_pretrained"], EXAMPLES, pretrained)
    area = stage.height * stage.width
    pre.update(num_frames=stage.frames, max_height=stage.height, max_width=stage.width, max_hxw=area,
               min_hxw=area // 2 if stage.multi_res else area, force_resolution=not stage.multi_res,
               force_5_ratio=stage.multi_res, train_fps=stage.fps, min_num_frames=min(stage.frames, pre["min_num_frames"]),
               batch_size=stage.micro_batch, gradient_accumulation_size=grad_accum)
    if stage.multi_res:
        pipeline = [{"trans_type": "ToTensorVideo"}, {"trans_type": "MaxHWResizeVideo"},
                    {"trans_type": "SpatialStrideCropVideo"}, {"trans_type": "ae_norm"}]
        pre["train_pipeline"] = {"video": pipeline, "image": copy.deepcopy(pipeline)}
    else:
        for pipe in pre["train_pipeline"].values():
            for t in pipe:
                if t["trans_type"] == "CenterCropResizeVideo":
                    t["param"]["size"] = [stage.height, stage.width]
    dl = doc["dataloader_param"]
    dl["batch_size"] = stage.micro_batch
    dl["collate_param"].update(batch_size=stage.micro_batch, num_frames=stage.frames)
    return doc


def stage_flags(stage: Stage, global_batch: int) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(stage.tp)]
    if stage.tp > 1:
        flags.append("--sequence-parallel")
    if stage.cp > 1:
        flags += ["--context-parallel-size", str(stage.cp)]
    flags += ["--micro-batch-size", str(stage.micro_batch), "--global-batch-size", str(global_batch),
              "--lr", f"{stage.lr:g}", "--min-lr", f"{stage.min_lr:g}", "--train-iters", str(stage.train_iters)]
    if stage.recompute_ffn_layers:
        flags += ["--selective_recom", "--recom_ffn_layers", str(stage.recompute_ffn_layers)]
    return flags


def render(stage: Stage, world_size: int, pretrained: str, out: str, data_txt: str | None = None,
           init_weights: str | None = None, global_batch: int | None = None) -> list[str]:
    """Write ``out/model.json`` and ``out/data.json``; returns the stage's flags (``--mm-model``/``--mm-data``
    included)."""
    gbs = global_batch or stage.global_batch
    _, ga = micro_batches(stage, world_size, gbs)
    root = Path(pretrained).resolve()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").write_text(json.dumps(render_model(stage, root, init_weights), indent=1))
    (out_dir / "data.json").write_text(json.dumps(render_data(stage, root, ga, data_txt), indent=1))
    return ["--mm-model", str(out_dir / "model.json"), "--mm-data", str(out_dir / "data.json")] + stage_flags(stage, gbs)


def _list() -> str:
    rows = [("stage", "devices", "shape", "fps", "lr", "batch", "TP/SP", "MBS", "GA", "steps", "attention", "init")]
    for s in STAGES.values():
        rows.append((s.name, str(s.devices), f"{s.frames}x{s.height}x{s.width}" + (" multi-res" if s.multi_res else ""),
                     str(s.fps), f"{s.lr:g}", str(s.global_batch), str(s.tp), str(s.micro_batch), str(s.grad_accum),
                     str(s.train_iters), "SUV" if s.sparse else "dense", s.init))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Open-Sora Plan v1.5 training stages (spec §11.4).")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the stage table")
    r = sub.add_parser("render", help="write the stage's model/data JSONs and print its flags")
    r.add_argument("stage", help=f"one of {', '.join(STAGES)}")
    r.add_argument("--world-size", type=int, required=True, help="devices of this run (nodes x processes per node)")
    r.add_argument("--pretrained", required=True, help="directory holding the released files (wfvae/, t5-v1_1-xl/, ...)")
    r.add_argument("--out", required=True, help="run directory for model.json / data.json")
    r.add_argument("--data", default=None, help="data.txt of your dataset (default: the released data.json's)")
    r.add_argument("--init-weights", default=None, help="released-layout SUV weights to start from (predictor.from_pretrained)")
    r.add_argument("--global-batch-size", type=int, default=None, help="override the stage's global batch")
    args = p.parse_args(argv)
    if args.cmd == "list":
        print(_list())
        return 0
    try:
        if args.stage not in STAGES:
            raise ValueError(f"unknown stage {args.stage!r}; stages: {', '.join(STAGES)}")
        if args.data and not Path(args.data).is_file():
            raise ValueError(f"--data {args.data}: file not found")
        if args.init_weights and not Path(args.init_weights).exists():
            raise ValueError(f"--init-weights {args.init_weights}: not found")
        flags = render(STAGES[args.stage], args.world_size, args.pretrained, args.out, args.data, args.init_weights,
                       args.global_batch_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(flags))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
