"""The on-disk data index at scale: build rate, per-rank start-up and memory, next to the in-memory index
(spec §8.2 at the v1.5 scale; issue 21).

1. **data**: ``--records N`` synthetic upstream-format records (720p, 240 frames at 24 fps, one ~30-word
   caption), streamed into ``--files`` JSON-list annotation files (nothing held in memory) plus data.txt.
2. **build**: ``build_store`` with ``--build-workers`` processes: wall time, CPU time of the builder and its
   workers, records/s and records per CPU-second (the per-core rate, little affected by other load).
3. **ranks**: ``--ranks`` processes started at once, as the ranks of one node, each opening the cached index,
   building its sampler (rank r of R) and a DataLoader with ``--loader-workers`` forked workers that read
   index entries (no decoding), the sampler sharing its epoch order through the index directory as in
   training (``shared_order_dir``); per rank: start-up (launch -> first batch; and without the imports of
   torch etc.: index open + sampler + DataLoader workers -> first batch), peak RSS (VmHWM), and the
   private memory attributable to the index: the rank's anonymous-memory growth from after its imports to
   after ``--batches`` batches, plus each worker's growth from its first item to its last. The shards are
   file-backed pages shared by every rank (one page-cache copy per node), reported once as the index size.
4. **in-memory**: the same probe with ``mm.data.index.build_index`` in one rank (every rank would pay the
   same; running 8 at 1 M records needs ~12 GB, so one is measured), at ``--in-memory-records`` (default
   the smaller of N and 1 M).
5. **inspect**: ``python -m mm.data.inspect`` a second time on the cached index (the first run builds):
   wall time and the child's peak RSS.

Prints a table and the machine's load average; the last line is one JSON object
``{"bench": "data_index", "records": N, "build": {...}, "ranks": {...}, "in_memory": {...}, "inspect": {...}}``.

    python bench/data_index.py [--records 1000000] [--files 8] [--ranks 8] [--loader-workers 4] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("a small red car drives slowly along a wet city street at night while people with umbrellas walk past "
         "bright shop windows and the camera follows from a low angle").split()
FILTERS = {"num_frames": 121, "max_height": 576, "max_width": 1024}


def write_records(out_dir: str, n: int, files: int) -> str:
    """``files`` JSON lists of synthetic records (streamed) and the data.txt listing them."""
    os.makedirs(out_dir, exist_ok=True)
    lines = []
    per = -(-n // files)
    for k in range(files):
        name = f"ann{k:03d}.json"
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write("[")
            for i in range(k * per, min(n, (k + 1) * per)):
                words = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(30))
                f.write(("," if i > k * per else "") + json.dumps(
                    {"path": f"videos/{i // 1000:05d}/{i:09d}.mp4", "cap": words,
                     "resolution": {"height": 720, "width": 1280}, "num_frames": 240, "fps": 24.0,
                     "cut": [0, 240], "aesthetic": round(4 + (i % 300) / 100, 2)}))
            f.write("]")
        lines.append(f".,{name}")
    with open(os.path.join(out_dir, "data.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out_dir, "data.txt")


def data_config(data_txt: str):
    from mm.data.config import DataConfig

    h, w = FILTERS["max_height"], FILTERS["max_width"]
    return DataConfig(data_path=data_txt, num_frames=FILTERS["num_frames"], max_height=h, max_width=w,
                      max_hxw=h * w, min_hxw=h * w)


def measure_build(data_txt: str, index_dir: str, workers: int) -> dict:
    from mm.data.build_index import build_store

    shutil.rmtree(index_dir, ignore_errors=True)
    cpu0 = _cpu_s()
    t0 = time.time()
    info = build_store(data_config(data_txt), index_dir, workers=workers, progress=True)
    wall = time.time() - t0
    cpu = _cpu_s() - cpu0
    size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(index_dir) for f in fs)
    n = info["records_filtered"]
    return {"records": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "records_per_s": round(n / wall),
            "records_per_cpu_s": round(n / cpu), "workers": workers, "index_mb": round(size / 2 ** 20, 1)}


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


RANK_PROBE = r"""
import json, os, sys, time
launched = float(sys.argv[1]); mode, rank, ranks, workers, batches = sys.argv[2], *map(int, sys.argv[3:7])
sys.path.insert(0, {root!r})
import numpy as np
from torch.utils.data import DataLoader, Dataset
from mm.data.build_index import open_index
from mm.data.config import DataConfig
from mm.data.index import build_index
from mm.data.loader import shared_order_dir
from mm.data.sampler import GroupedDistributedSampler

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

class Probe(Dataset):
    # reads index entries the way VideoTextDataset does, reports its worker's private-memory growth
    def __init__(self, index):
        self.index, self.base = index, None
    def __len__(self):
        return len(self.index)
    def __getitem__(self, i):
        if self.base is None:
            self.base = status("RssAnon")
        e = self.index.entry(i)
        return os.getpid(), e.num_frames + len(e.captions[0]), status("RssAnon") - self.base

np.random.default_rng((1, 2)).permutation(10)  # library set-up is not the index
t_imported = time.time()
base = status("RssAnon")
cfg = DataConfig(**json.loads({cfg!r}))
index = open_index(cfg, {index_dir!r}) if mode == "store" else build_index(cfg)
t_index = time.time()
sampler = GroupedDistributedSampler(index.shape_groups(), batch_size=2, global_batch_size=2 * ranks,
                                    num_replicas=ranks, rank=rank, seed=0, order_dir=shared_order_dir(index))
loader = DataLoader(Probe(index), batch_sampler=sampler, num_workers=workers, collate_fn=list,
                    multiprocessing_context="fork" if workers else None)
it = iter(loader)
worker_growth = {{}}
for k, batch in enumerate(it):
    if k == 0:
        t_first = time.time()
    for pid, _, grow in batch:
        worker_growth[pid] = max(worker_growth.get(pid, 0), grow)
    if k + 1 == batches:
        break
rank_growth = status("RssAnon") - base
print(json.dumps({{"startup_s": t_first - launched, "import_s": t_imported - launched, "index_s": t_index - t_imported,
                  "index_startup_s": t_first - t_imported,
                  "peak_rss_mb": status("VmHWM") / 2 ** 20,
                  "index_private_mb": (rank_growth + sum(worker_growth.values())) / 2 ** 20,
                  "rank_private_mb": rank_growth / 2 ** 20}}))
"""


def measure_ranks(mode: str, data_txt: str, index_dir: str, ranks: int, workers: int, batches: int) -> dict:
    cfg = data_config(data_txt)
    fields = {k: v for k, v in cfg.__dict__.items() if k != "train_pipeline"}
    code = RANK_PROBE.format(root=ROOT, cfg=json.dumps(fields), index_dir=index_dir)
    launched = time.time()
    procs = [subprocess.Popen([sys.executable, "-c", code, repr(launched), mode, str(r), str(ranks), str(workers),
                               str(batches)], stdout=subprocess.PIPE, text=True) for r in range(ranks)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        if p.returncode:
            raise RuntimeError(f"rank probe ({mode}) failed with exit code {p.returncode}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    agg = {"ranks": ranks, "loader_workers": workers}
    for key in ("startup_s", "import_s", "index_s", "index_startup_s", "peak_rss_mb", "index_private_mb",
                "rank_private_mb"):
        vals = [o[key] for o in outs]
        agg[key] = {"median": round(statistics.median(vals), 2), "max": round(max(vals), 2)}
    return agg


def measure_inspect(data_txt: str, index_dir: str) -> dict:
    h, w = FILTERS["max_height"], FILTERS["max_width"]
    cmd = [sys.executable, "-m", "mm.data.inspect", "--data", data_txt, "--num-frames", str(FILTERS["num_frames"]),
           "--height", str(h), "--width", str(w), "--data-index", index_dir]
    runs = []
    for _ in range(2):  # the first run builds the index when it is missing
        t0 = time.time()
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(p.pid, 0)  # this child's own rusage
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            raise RuntimeError(f"inspect failed: {' '.join(cmd)}")
        runs.append({"wall_s": round(time.time() - t0, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)})
    return {"first": runs[0], "cached": runs[1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=8, help="annotation files (a JSON list is parsed by one worker)")
    p.add_argument("--build-workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--loader-workers", type=int, default=4)
    p.add_argument("--batches", type=int, default=50, help="micro-batches each rank reads")
    p.add_argument("--in-memory-records", type=int, default=None, help="default: min(records, 1 M); 0 skips it")
    p.add_argument("--dir", default="/tmp/mm_bench_data_index", help="work directory (data + indexes)")
    p.add_argument("--keep-data", action="store_true", help="reuse the records already in --dir")
    a = p.parse_args()
    for name in ("records", "files", "build_workers", "ranks", "batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data_dir = os.path.join(a.dir, f"data_{a.records}")
    t0 = time.time()
    if not (a.keep_data and os.path.exists(os.path.join(data_dir, "data.txt"))):
        write_records(data_dir, a.records, a.files)
    data_txt = os.path.join(data_dir, "data.txt")
    gen_s = time.time() - t0
    index_dir = os.path.join(a.dir, f"index_{a.records}")
    result = {"bench": "data_index", "records": a.records, "files": a.files, "generate_s": round(gen_s, 1),
              "load_avg_before": os.getloadavg()}
    result["build"] = build = measure_build(data_txt, index_dir, a.build_workers)
    result["ranks"] = ranks = measure_ranks("store", data_txt, index_dir, a.ranks, a.loader_workers, a.batches)
    result["inspect"] = insp = measure_inspect(data_txt, index_dir)
    n_mem = min(a.records, 1_000_000) if a.in_memory_records is None else a.in_memory_records
    if n_mem:
        mem_txt = data_txt if n_mem == a.records else write_records(os.path.join(a.dir, f"data_{n_mem}"), n_mem,
                                                                    a.files)
        result["in_memory"] = measure_ranks("memory", mem_txt, "", 1, a.loader_workers, a.batches)
        result["in_memory"]["records"] = n_mem
    result["load_avg_after"] = os.getloadavg()

    print(f"\n{a.records:,} records in {a.files} JSON-list files (generated in {gen_s:.0f} s); "
          f"load average before {result['load_avg_before'][0]:.1f}, after {result['load_avg_after'][0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    print(f"build: {build['wall_s']:.1f} s wall, {build['cpu_s']:.1f} CPU-s with {build['workers']} workers: "
          f"{build['records_per_s']:,} records/s, {build['records_per_cpu_s']:,} records per CPU-second; "
          f"index {build['index_mb']:.0f} MB")
    rows = [("on-disk index", a.records, ranks)] + ([("in-memory", n_mem, result["in_memory"])] if n_mem else [])
    print(f"{'path':<15} {'records':>11} {'ranks':>5} {'start-up s':>16} {'w/o imports s':>16} {'peak RSS MB':>16} "
          f"{'index private MB':>18}   (median / max over ranks)")
    for name, n, r in rows:
        cells = [f"{r[k]['median']:>7.2f} /{r[k]['max']:>7.2f}" for k in ("startup_s", "index_startup_s")]
        cells += [f"{r['peak_rss_mb']['median']:>7.0f} /{r['peak_rss_mb']['max']:>7.0f}",
                  f"{r['index_private_mb']['median']:>8.1f} /{r['index_private_mb']['max']:>8.1f}"]
        print(f"{name:<15} {n:>11,} {r['ranks']:>5} " + " ".join(f"{c:>16}" for c in cells))
    print(f"inspect, index cached: {insp['cached']['wall_s']:.2f} s, peak RSS {insp['cached']['peak_rss_mb']:.0f} MB "
          f"(first run: {insp['first']['wall_s']:.2f} s, {insp['first']['peak_rss_mb']:.0f} MB)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
