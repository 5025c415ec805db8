"""Preflight: run on every node, under torchrun, with the real job's flags, before the real job.

    torchrun --nnodes N --nproc-per-node 8 ... -m mm.tools.preflight --mm-model model.json --mm-data data.json \\
        [every pretrain_sora.py flag] [--sample-videos 4] [--comm-mb 64]

(``MODE=preflight examples/opensoraplan1.5/train.sh STAGE`` and ``train.slurm`` do exactly this.) Checks, all of
them, every problem listed at once, in one table printed by rank 0:

* versions: Python, torch, megatron-core, and what the backend uses (CUDA + NCCL, flash-attn, Transformer
  Engine; torch_npu, MindSpeed, CANN);
* per node: the backend and its device count against the processes on the node;
* the configuration at this world size: ``mm.training.preflight.validate_training`` (flags, JSONs, world size vs
  TP x PP x CP x DP, heads, batch divisibility, every input path: weights, tokenizers, data lists, annotation
  files), checked from every node, plus the sequence constraints of CP and SP at the data's clip shape;
* a sample of the data: the first ``--sample-videos`` records decoded (one frame each) on every node;
* the checkpoint directory: free disk for ``--keep-last`` + 1 checkpoints of this model (size from the
  parameter count, :func:`mm.tools.plan.checkpoint_bytes`), and whether it is one shared filesystem (a token
  file written by rank 0 must read back identically on every node);
* collectives: an all-reduce and an all-to-all of ``--comm-mb`` MB over every group type (world, TP, CP, DP) of
  the real layout, with the measured bus bandwidth (slowest group of each type).

Exit 0 only when every check passes; 1 when one fails; 2 for unusable arguments.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass

OK, FAIL, INFO = "ok", "FAIL", "info"


@dataclass(frozen=True)
class Row:
    check: str
    status: str
    detail: str


def build_parser() -> argparse.ArgumentParser:
    from pretrain_sora import build_parser as training_parser

    p = training_parser()
    p.prog = "python -m mm.tools.preflight"
    p.description = "Check a launch before running it: versions, devices, inputs, storage, collectives."
    g = p.add_argument_group("preflight")
    g.add_argument("--sample-videos", type=int, default=4, help="records of the data decoded on every node")
    g.add_argument("--comm-mb", type=float, default=64.0, help="MB per collective in the bandwidth test")
    return p


# ------------------------------------------------------------------------------------------ per node
def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions(backend) -> list[Row]:
    import torch

    parts = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    rows = []
    mcore = _version("megatron-core")
    rows.append(Row("megatron-core", OK if mcore else FAIL, mcore or "not installed"))
    if backend.name == "cuda":
        nccl = torch._C._nccl_version() if hasattr(torch._C, "_nccl_version") else None
        parts += [f"CUDA {torch.version.cuda}", f"NCCL {nccl}"]
        for name in ("flash-attn", "transformer-engine"):
            parts.append(f"{name} {_version(name) or 'absent'}")
    elif backend.name == "npu":
        home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
        parts += [f"torch_npu {_version('torch-npu') or _version('torch_npu')}", f"mindspeed {_version('mindspeed')}",
                  f"CANN {home or 'ASCEND_TOOLKIT_HOME unset'}"]
    rows.insert(0, Row("versions", INFO, ", ".join(parts)))
    return rows


def check_devices(backend, local_processes: int) -> list[Row]:
    import torch

    if backend.device_type == "cpu":
        return [Row("devices", OK, f"backend cpu (gloo); {local_processes} processes on this node")]
    count = torch.accelerator.device_count()
    status = OK if count >= local_processes else FAIL
    return [Row("devices", status, f"backend {backend.name}: {count} {backend.device_type} devices for "
                                   f"{local_processes} processes on this node")]


def check_config(args, world: int):
    """(rows, spec, data config, run config); the configs are None when invalid."""
    from mm.config import ConfigErrors
    from mm.training.preflight import validate_training

    try:
        spec, data_cfg, run = validate_training(args, world)
    except ConfigErrors as e:
        return [Row("config + inputs", FAIL, p) for p in e.problems], None, None, None
    return [Row("config + inputs", OK, f"model, data and flags valid at world size {world}; input paths present")], \
        spec, data_cfg, run


def check_sequence(facts, data_cfg, run, world: int) -> list[Row]:
    from mm.tools import plan

    layout, work = plan.Layout.of_run(run, world), plan.Workload.of_run(data_cfg, run)
    problems = plan.layout_problems(facts, layout, work, world)
    if problems:
        return [Row("layout vs sequence", FAIL, p) for p in problems]
    return [Row("layout vs sequence", OK, f"{layout.label()}: {work.video_tokens(facts)} video + {work.text_len} text "
                                          f"tokens split evenly")]


def check_samples(data_cfg, count: int) -> list[Row]:
    from mm.data.annotations import iter_annotations, parse_record, read_data_txt
    from mm.data.decode import read_image, read_video, resolve_video_backend
    from mm.data.errors import SampleError

    if count <= 0:
        return []
    backend = resolve_video_backend(data_cfg.video_reader_type)
    rows, seen = [], 0
    for src in read_data_txt(data_cfg.data_path):
        for _, raw in iter_annotations(src.annotation):
            rec = parse_record(raw, src.root)
            if isinstance(rec, str):
                continue
            try:
                frame = read_image(rec.path) if rec.kind == "image" else read_video(rec.path, [rec.start_frame], backend)
            except SampleError as e:
                rows.append(Row("data sample", FAIL, f"{rec.path}: {e}"))
            else:
                rows.append(Row("data sample", OK, f"{rec.path}: {tuple(frame.shape)}"))
            seen += 1
            if seen >= count:
                return rows
    if not seen:
        rows.append(Row("data sample", FAIL, f"no usable record in the annotation files of {data_cfg.data_path}"))
    return rows


def check_disk(save: str | None, need: int) -> list[Row]:
    if not save:
        return [Row("checkpoint disk", FAIL, "no --save directory: the run would keep no checkpoint")]
    if not os.path.isabs(save):
        return [Row("checkpoint disk", FAIL, f"--save {save} is relative: use an absolute path on shared storage")]
    probe = save
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    status = OK if free >= need else FAIL
    return [Row("checkpoint disk", status, f"{free / 1e9:.1f} GB free at {probe}, {need / 1e9:.1f} GB needed")]


# ------------------------------------------------------------------------------------------ collective checks
def check_shared_fs(save: str | None, is_node_leader: bool) -> list[Row]:
    """Rank 0 writes a token into --save; the first rank of every node must read the same token back."""
    import torch.distributed as dist

    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(save, f".preflight-{token[0]}") if save and os.path.isabs(save) else None
    if path and dist.get_rank() == 0:
        os.makedirs(save, exist_ok=True)
        with open(path, "w", encoding="ascii") as f:
            f.write(token[0])
    dist.barrier()
    rows = []
    if path and is_node_leader:
        try:
            with open(path, encoding="ascii") as f:
                same = f.read() == token[0]
        except OSError:
            same = False
        rows.append(Row("shared checkpoint fs", OK if same else FAIL,
                        f"{save}: token file {'read back' if same else 'not visible'} on this node"))
    dist.barrier()
    if path and dist.get_rank() == 0:
        os.remove(path)
    return rows


def _bandwidth(op, group, size: int, nbytes: int, device) -> float:
    """Bus bandwidth (GB/s) of ``op`` over ``group``: median of 3 timed calls after a warm-up."""
    import torch
    import torch.distributed as dist

    numel = max(size, nbytes // 4 // size * size)  # divisible by the group size for the all-to-all
    x = torch.ones(numel, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    times = []
    for i in range(4):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        if op == "all-reduce":
            dist.all_reduce(x, group=group)
        else:
            dist.all_to_all_single(out, x, group=group)
        if device.type != "cpu":
            torch.accelerator.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    factor = 2 * (size - 1) / size if op == "all-reduce" else (size - 1) / size  # bytes each rank moves / size
    return numel * 4 * factor / statistics.median(times) / 1e9


def check_collectives(run, backend, comm_mb: float) -> list[Row]:
    """All-reduce + all-to-all over each group type of the layout; every rank returns its measurements."""
    from megatron.core import parallel_state as mps

    from mm.distributed.init import init_parallel

    init_parallel(run.parallel, backend.name)
    groups = {"world": None, "TP": mps.get_tensor_model_parallel_group(), "CP": mps.get_context_parallel_group(),
              "DP": mps.get_data_parallel_group()}
    import torch.distributed as dist

    device = backend.local_device()
    rows = []
    for name, group in groups.items():
        size = dist.get_world_size(group)
        if size == 1:
            continue
        for op in ("all-reduce", "all-to-all"):
            gbps = _bandwidth(op, group, size, int(comm_mb * 1e6), device)
            rows.append(Row(f"{op} {name}", OK, f"{gbps:.2f} GB/s over {size} ranks"))
    mps.destroy_model_parallel()
    return rows


# ------------------------------------------------------------------------------------------ report
def summarize(per_rank: list[tuple[str, list[Row]]]) -> list[list[str]]:
    """Table rows: identical (check, status, detail) from several nodes are shown once with the node count;
    bandwidths are reported for the slowest rank of each group type."""
    table: dict[tuple, list[str]] = {}
    slowest: dict[str, tuple[float, str, str]] = {}
    for host, rows in per_rank:
        for r in rows:
            if r.check.startswith(("all-reduce", "all-to-all")):
                gbps = float(r.detail.split()[0])
                if r.check not in slowest or gbps < slowest[r.check][0]:
                    slowest[r.check] = (gbps, r.detail, host)
                continue
            table.setdefault((r.check, r.status, r.detail), [])
            if host not in table[(r.check, r.status, r.detail)]:
                table[(r.check, r.status, r.detail)].append(host)
    out = [["check", "status", "where", "detail"]]
    for (check, status, detail), hosts in table.items():
        out.append([check, status, hosts[0] if len(hosts) == 1 else f"{len(hosts)} nodes", detail])
    for check, (_, detail, host) in slowest.items():
        out.append([check, OK, f"slowest: {host}", detail])
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mm.ops import BackendUnavailableError, select_backend

    try:
        backend = select_backend(args.backend)
    except BackendUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.sample_videos < 0 or args.comm_mb <= 0:
        print(f"error: --sample-videos must be >= 0 and --comm-mb > 0, got {args.sample_videos} and {args.comm_mb}",
              file=sys.stderr)
        return 2
    import torch.distributed as dist

    from mm.distributed.init import init_process_group
    from mm.tools.plan import checkpoint_bytes, model_facts

    owned = not dist.is_initialized()  # under torchrun: ours to tear down; inside a test harness: not
    init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    leader = int(os.environ.get("LOCAL_RANK", rank)) == 0  # the first process of each node checks the node
    host = socket.gethostname()
    rows: list[Row] = []
    config_rows, spec, data_cfg, run = check_config(args, world)
    if leader:
        rows += check_versions(backend) + check_devices(backend, local_processes) + config_rows
    if run is not None and leader:
        facts = model_facts(spec)
        if rank == 0:
            rows += check_sequence(facts, data_cfg, run, world)
        rows += check_samples(data_cfg, args.sample_videos)
        need = (run.checkpoint.keep_last + 1) * checkpoint_bytes(facts.total_params, run.training.bf16)
        rows += check_disk(run.checkpoint.save, need)
    rows += check_shared_fs(os.path.abspath(args.save) if args.save else None, leader)
    # the collectives need every rank: run them only when the configuration is valid on all of them (a node
    # that cannot see an input must not leave the others waiting in a group it never joins)
    import torch

    valid = torch.tensor([int(run is not None)], device=backend.local_device())  # NCCL reduces device tensors
    dist.all_reduce(valid, op=dist.ReduceOp.MIN)
    if valid.item():
        rows += check_collectives(run, backend, args.comm_mb)
    gathered = [None] * world
    dist.all_gather_object(gathered, (host, rows))
    failed = sum(r.status == FAIL for _, rs in gathered for r in rs)
    if rank == 0:
        from mm.tools.plan import format_table

        print(format_table(summarize(gathered)))
        print(f"preflight: {'all checks passed' if not failed else f'{failed} problem(s)'} on {world} ranks")
    if owned:
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
