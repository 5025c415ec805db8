"""On-disk data index (``mm.data.index_store`` / ``mm.data.build_index``, spec §8.2 at the v1.5 scale): the
same samples, shapes, drop counts and sampler order as the in-memory index on records that hit every
filter; JSON lists and JSON Lines; rebuilt for another config or changed sources, never reused; two
builders at once give one index; a truncated shard is detected and rebuilt; loading memory is bounded."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from mm.data.build_index import build_store, main as build_main, open_index
from mm.data.config import DataConfig
from mm.data.dataset import VideoTextDataset
from mm.data.frames import num_resampled, resample_indices
from mm.data.index import build_index
from mm.data.index_store import IndexInvalid, IndexStore, index_key, record_bad_samples, source_manifest
from mm.data.sampler import GroupedDistributedSampler

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# fixed 64x112 (9:16-ish), 33 frames at 24 fps
FIXED = DataConfig(num_frames=33, min_num_frames=17, max_height=64, max_width=112, max_hxw=64 * 112,
                   min_hxw=64 * 112, max_h_div_w_ratio=1.0, min_h_div_w_ratio=0.42)
# multi-resolution, random short-clip drops, fps upsampling, rare shapes dropped
MULTI = FIXED.replace(force_resolution=False, max_hxw=96 * 160, min_hxw=32 * 48, drop_short_ratio=0.5,
                      allow_fps_upsampling=True, min_samples_per_shape=6, max_h_div_w_ratio=2.0)
# images only, 5 ratios
IMAGES = MULTI.replace(dataset_type="t2i", force_5_ratio=True, min_samples_per_shape=1, drop_short_ratio=1.0)

SPECIAL = [  # one record per parse-level drop reason, plus kept oddities
    {"cap": "no path"},
    {"path": "x.gif", "cap": "c"},
    {"path": "x.mp4", "cap": ""},
    {"path": "x.mp4", "cap": "c", "num_frames": 40},
    {"path": "x.mp4", "cap": "c", "resolution": {"height": 72, "width": 128}, "num_frames": 40, "crop": [0, 999, 0, 5]},
    {"path": "x.mp4", "cap": "c", "resolution": {"height": 72, "width": 128}},
    {"path": "x.mp4", "cap": "c", "resolution": {"height": 72, "width": 128}, "num_frames": 40, "fps": 0},
    {"path": "x.mp4", "cap": "c", "resolution": {"height": 72, "width": 128}, "num_frames": 40, "cut": ["a"]},
    {"path": "crop.mp4", "cap": ["one", "two"], "resolution": {"height": 100, "width": 200}, "num_frames": 40,
     "fps": 24, "crop": [10, 138, 20, 92], "aes": 5.5},
    "not a record",
]


def synth_records(n, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(72, 128), (64, 112), (60, 128), (48, 64), (128, 128), (40, 128), (200, 100), (90, 160), (300, 400)]
    out = list(SPECIAL)
    for i in range(n):
        h, w = sizes[rng.integers(len(sizes))]
        r = {"path": f"v/{i:05d}.mp4", "cap": f"clip {i} " + "word " * int(rng.integers(1, 8)),
             "resolution": {"height": int(h), "width": int(w)}, "num_frames": int(rng.choice([20, 30, 40, 80, 200, 900])),
             "fps": float(rng.choice([12, 24, 30, 60, 23.976]))}
        if i % 11 == 0:
            r["path"] = f"i/{i:05d}.jpg"
        if i % 7 == 0:
            r["cut"] = [int(rng.integers(0, 5)), 0]
        if i % 5 == 0:
            r["aesthetic"] = round(float(rng.uniform(3, 7)), 3)
        out.append(r)
    return out


def write_data(tmp_path, fmt, n=700, parts=2):
    """``parts`` datasets of ~n records each in ``fmt``; JSON Lines get one unparseable line."""
    lines = []
    for k in range(parts):
        ds = tmp_path / f"ds{k}"
        ds.mkdir(exist_ok=True)
        recs = synth_records(n, seed=k)
        if fmt == "json":
            (ds / "ann.json").write_text(json.dumps(recs))
        else:
            body = [json.dumps(r) for r in recs]
            body.insert(3, "{not json")
            body.insert(5, "")
            (ds / "ann.jsonl").write_text("\n".join(body) + "\n")
        lines.append(f"ds{k},ds{k}/ann.{fmt}")
    (tmp_path / "data.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.txt")


def assert_same(store, mem):
    assert (len(store), store.num_records) == (len(mem), mem.num_records)
    assert dict(store.dropped) == dict(mem.dropped)
    assert store.examples == dict(mem.examples)
    assert [store.entry(i) for i in range(len(store))] == mem.entries
    sg, mg = store.shape_groups(), mem.shape_groups()
    assert list(sg) == list(mg)
    for k in sg:
        np.testing.assert_array_equal(sg[k], mg[k])
    assert store.summary() == mem.summary()


@pytest.mark.parametrize("fmt,cfg,workers", [
    ("json", FIXED, 1), ("jsonl", FIXED, 2), ("json", MULTI, 1), ("jsonl", MULTI, 1), ("jsonl", IMAGES, 1),
])
def test_store_equals_in_memory_index(tmp_path, fmt, cfg, workers):
    cfg = cfg.replace(data_path=write_data(tmp_path, fmt))
    mem = build_index(cfg)
    # small chunks: several per file, so merging across chunks and files is exercised
    info = build_store(cfg, str(tmp_path / "idx"), workers=workers, chunk_records=97, chunk_bytes=9000)
    assert info["records_filtered"] == mem.num_records
    store = IndexStore(str(tmp_path / "idx"), index_key(cfg, source_manifest(cfg)))
    assert_same(store, mem)
    reasons = set(mem.dropped)
    if cfg is FIXED:  # the synthetic records reach every filter
        assert {"missing_path", "unsupported_extension", "missing_caption", "missing_resolution", "bad_crop",
                "missing_num_frames", "bad_fps", "bad_cut", "aspect_ratio", "too_small", "too_small_for_crop",
                "too_long", "fps_too_low", "too_short"} <= reasons
        assert ("bad_json" in reasons) == (fmt == "jsonl")
    if cfg is MULTI:
        assert {"shape_too_rare", "too_small_after_resize", "too_short"} <= reasons
        assert 0 < mem.dropped["too_short"]
    if cfg is IMAGES:
        assert "video_in_image_dataset" in reasons and len(store) > 0


def test_num_resampled_equals_resample_indices_length():
    steps = [0.5, 1.0, 1.25, 2.0, 2.5, 1 / 3, 0.7, 23.976 / 24, 30 / 24, 59.94 / 24, 7.3]
    steps += np.random.default_rng(0).uniform(0.05, 10, 30).tolist()
    for n in range(1, 300):
        for step in steps:
            assert num_resampled(n, step) == len(resample_indices(n, step)), (n, step)


def reference_order(keys, gbs, seed, epoch):
    """The list-based global order the sampler had before it worked on arrays."""
    groups = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    ordered = [np.asarray(v, dtype=np.int64) for _, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    rng = np.random.default_rng((seed, epoch))
    blocks = []
    for grp in ordered:
        perm = grp[rng.permutation(len(grp))]
        short = (-len(perm)) % gbs
        if short:
            perm = np.concatenate([perm, grp[rng.integers(0, len(grp), size=short)]])
        blocks.extend(perm.reshape(-1, gbs))
    return np.stack(blocks)[rng.permutation(len(blocks))].reshape(-1)


def test_sampler_order_and_replacement_match_list_based(tmp_path):
    cfg = MULTI.replace(data_path=write_data(tmp_path, "jsonl"), min_samples_per_shape=1)
    store = open_index(cfg, str(tmp_path / "idx"))
    keys = [store.entry(i).shape_key for i in range(len(store))]
    assert len(set(keys)) >= 3
    for gbs, seed, epoch in ((4, 42, 0), (8, 42, 3), (6, 7, 1)):
        s = GroupedDistributedSampler(store.shape_groups(), batch_size=1, global_batch_size=gbs, seed=seed)
        s.set_epoch(epoch)
        np.testing.assert_array_equal(s.global_order(), reference_order(keys, gbs, seed, epoch))
        # the lazily produced micro-batches of 2 replicas interleave into the same order
        r = [GroupedDistributedSampler(store.shape_groups(), batch_size=1, global_batch_size=gbs, seed=seed,
                                       num_replicas=2, rank=k) for k in range(2)]
        for x in r:
            x.set_epoch(epoch)
        merged = [i for a, b in zip(iter(r[0]), iter(r[1])) for i in a + b]
        assert merged == s.global_order().tolist()
    # bad-sample replacement: the k-th untried member of the group, as with a Python pool list
    ds = VideoTextDataset(store, cfg)
    rng = np.random.default_rng(0)
    for _ in range(50):
        i = int(rng.integers(len(store)))
        group = [j for j in range(len(store)) if keys[j] == keys[i]]
        tried = {i} | {int(j) for j in rng.choice(group, size=min(len(group) - 1, 3), replace=False)}
        pool = [j for j in group if j not in tried]
        expect = pool[int(np.random.default_rng((cfg.seed, 0, i, 2, 0x5EED)).integers(len(pool)))] if pool else None
        assert ds.replacement(i, 2, tried) == expect


def test_other_config_or_changed_sources_rebuild(tmp_path, caplog):
    data = write_data(tmp_path, "json", n=200, parts=1)
    d = str(tmp_path / "idx")
    a = open_index(FIXED.replace(data_path=data), d)
    cfg_b = FIXED.replace(data_path=data, num_frames=17, min_num_frames=17)
    with pytest.raises(IndexInvalid, match="another data config"):
        IndexStore(d, index_key(cfg_b, source_manifest(cfg_b)))
    with caplog.at_level(logging.WARNING, logger="mm.data.build_index"):
        b = open_index(cfg_b, d)
    assert "another data config" in caplog.text
    assert_same(b, build_index(cfg_b))
    assert len(b) != len(a)
    # an appended record changes the source manifest: rebuilt with it
    ann = tmp_path / "ds0" / "ann.json"
    recs = json.loads(ann.read_text()) + [{"path": "new.jpg", "cap": "c", "resolution": {"height": 72, "width": 128}}]
    ann.write_text(json.dumps(recs))
    c = open_index(cfg_b, d)
    assert c.num_records == b.num_records + 1 and c.entry(len(c) - 1).path.endswith("new.jpg")
    # samples recorded bad after the build are excluded by the next open, under their reason
    victim = c.entry(0).path
    assert record_bad_samples(d, {victim: "corrupt_video"}) == 1
    with pytest.raises(IndexInvalid, match="bad_samples"):
        IndexStore(d)
    e = open_index(cfg_b, d)
    assert len(e) == len(c) - 1 and e.dropped["corrupt_video"] == 1 and e.examples["corrupt_video"] == [
        os.path.relpath(victim, tmp_path / "ds0")]


BUILDER = r"""
import os, sys, time, logging
sys.path.insert(0, {root!r})
from mm.data.build_index import open_index
from mm.data.config import DataConfig
records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("mm.data.build_index").addHandler(handler)
logging.getLogger("mm.data.build_index").setLevel(logging.INFO)
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists({go!r}):
    time.sleep(0.01)
store = open_index(DataConfig(**{cfg!r}), {index_dir!r})
print(sum("data index: building" in r.getMessage() for r in records), store.manifest["key"], store.manifest["build"])
"""


def test_two_builders_at_once_give_one_index(tmp_path):
    data = write_data(tmp_path, "jsonl", n=1500, parts=2)
    d, go = str(tmp_path / "idx"), str(tmp_path / "go")
    fields = {k: v for k, v in FIXED.replace(data_path=data).__dict__.items() if k != "train_pipeline"}
    code = BUILDER.format(root=ROOT, go=go, cfg=fields, index_dir=d)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"p{k}")], stdout=subprocess.PIPE, text=True)
             for k in range(2)]
    while not all(os.path.exists(tmp_path / f"p{k}.ready") for k in range(2)):
        assert all(p.poll() is None for p in procs), "a builder exited early"
    open(go, "w").close()  # both start at once
    outs = [p.communicate(timeout=300)[0].split(" ", 2) for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sorted(int(o[0]) for o in outs) == [0, 1]  # one built, the other waited for it and opened it
    assert outs[0][1:] == outs[1][1:]
    assert_same(IndexStore(d), build_index(FIXED.replace(data_path=data)))


def test_truncated_shard_is_detected_and_rebuilt(tmp_path):
    cfg = FIXED.replace(data_path=write_data(tmp_path, "json", n=300))
    d = str(tmp_path / "idx")
    first = open_index(cfg, d, chunk_records=50)
    chunks = first.manifest["chunks"]
    assert len(chunks) >= 6
    victim = os.path.join(d, "chunks", chunks[2]["name"] + ".arrow")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    with pytest.raises(IndexInvalid, match="truncated"):
        IndexStore(d, index_key(cfg, source_manifest(cfg)))
    again = open_index(cfg, d, chunk_records=50)
    assert again.manifest["build"]["resumed_chunks"] == len(chunks) - 1  # only the damaged chunk was redone
    assert_same(again, build_index(cfg))


def test_build_index_cli(tmp_path, capsys):
    data = write_data(tmp_path, "jsonl", n=100, parts=1)
    args = ["--data", data, "--out", str(tmp_path / "idx"), "--workers", "1", "--num-frames", "33", "--height", "64",
            "--width", "112"]
    assert build_main(args) == 0
    out = capsys.readouterr().out
    assert "index built" in out and "records/s" in out and "dropped too_long" in out
    assert build_main(args) == 0
    assert "index up to date" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        build_main(args[:4] + ["--workers", "0"])
    assert e.value.code == 2
    assert "error: --workers" in capsys.readouterr().err
    # a broken annotation file stops the build (all workers) with one error line naming it
    (tmp_path / "bad.json").write_text('{"path": "not a list"}')
    (tmp_path / "data2.txt").write_text("ds0,ds0/ann.jsonl\n.,bad.json\n")
    with pytest.raises(SystemExit) as e:
        build_main(["--data", str(tmp_path / "data2.txt"), "--out", str(tmp_path / "idx2"), "--workers", "2"])
    assert e.value.code == 2
    assert "bad.json' must hold a JSON list" in capsys.readouterr().err


MEMORY_PROBE = r"""
import json, sys
sys.path.insert(0, {root!r})
from mm.data.build_index import open_index
from mm.data.config import DataConfig
from mm.data.index import build_index
from mm.data.sampler import GroupedDistributedSampler
cfg = DataConfig(**json.loads({cfg!r}))
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
# warm the libraries first: their one-off set-up (numpy's generator, pyarrow's IPC reader) is not the index
import numpy as np, pyarrow as pa
np.random.default_rng((1, 2)).permutation(10)
t = pa.table({{"a": [1], "s": ["x"]}})
sink = pa.BufferOutputStream()
with pa.ipc.new_file(sink, t.schema) as w:
    w.write_table(t)
t = pa.ipc.open_file(pa.BufferReader(sink.getvalue())).read_all()
t.column("s").combine_chunks(), t.column("a").to_numpy()
base = status("RssAnon")
index = open_index(cfg, {index_dir!r}) if sys.argv[1] == "store" else build_index(cfg)
s = GroupedDistributedSampler(index.shape_groups(), batch_size=1, global_batch_size=8, num_replicas=8)
batches = [b for _, b in zip(range(100), iter(s))]
entries = [index.entry(b[0]) for b in batches]
print(status("RssAnon") - base)
"""


def test_loading_memory_is_bounded(tmp_path):
    """Private (anonymous) memory growth of opening the index + a sampler + reading entries, in a fresh
    process: the on-disk index stays under ``bound``, the in-memory index of the same 50 k records exceeds
    it. The shards' pages are file-backed: the page cache holds one copy for all the ranks of a node."""
    n = 50_000
    ds = tmp_path / "ds"
    ds.mkdir()
    rec = ('{{"path": "v/{i:07d}.mp4", "cap": "a small red car drives along a wet street at night while people '
           'with umbrellas walk past shop windows {i}", "resolution": {{"height": 720, "width": 1280}}, '
           '"num_frames": 240, "fps": 24.0}}\n')
    with open(ds / "ann.jsonl", "w") as f:
        f.writelines(rec.format(i=i) for i in range(n))
    (tmp_path / "data.txt").write_text("ds,ds/ann.jsonl\n")
    cfg = FIXED.replace(data_path=str(tmp_path / "data.txt"), num_frames=121, min_num_frames=29, max_height=576,
                        max_width=1024, max_hxw=576 * 1024, min_hxw=576 * 1024)
    d = str(tmp_path / "idx")
    assert len(open_index(cfg, d)) == n
    fields = {k: v for k, v in cfg.__dict__.items() if k != "train_pipeline"}
    code = MEMORY_PROBE.format(root=ROOT, cfg=json.dumps(fields), index_dir=d)
    grow = {mode: int(subprocess.run([sys.executable, "-c", code, mode], check=True, capture_output=True,
                                     text=True, timeout=300).stdout.split()[-1]) for mode in ("store", "memory")}
    bound = 8 << 20
    assert grow["store"] < bound < grow["memory"], grow


def test_index_with_nothing_kept(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"path": "a.mp4", "cap": "x", "resolution": {"height": 9, "width": 16},
                                                   "num_frames": 50}]))
    (tmp_path / "data.txt").write_text(".,a.json\n")
    cfg = FIXED.replace(data_path=str(tmp_path / "data.txt"))
    store = open_index(cfg, str(tmp_path / "idx"))
    assert len(store) == 0 and store.dropped == {"too_small": 1} and store.shape_groups() == {}
    with pytest.raises(ValueError, match="empty after filtering"):
        VideoTextDataset(store, cfg)


def test_epoch_order_shared_through_the_index_directory(tmp_path, monkeypatch):
    cfg = MULTI.replace(data_path=write_data(tmp_path, "jsonl", n=300), min_samples_per_shape=1)
    store = open_index(cfg, str(tmp_path / "idx"))
    kw = dict(batch_size=1, global_batch_size=4, num_replicas=2, seed=3)
    plain = [GroupedDistributedSampler(store.shape_groups(), rank=r, **kw) for r in range(2)]
    shared = [GroupedDistributedSampler(store.shape_groups(), rank=r, order_dir=store.order_dir, **kw)
              for r in range(2)]
    for epoch in range(4):
        for s in plain + shared:
            s.set_epoch(epoch)
        assert shared[0].rank_batches() == plain[0].rank_batches()  # rank 0 writes the epoch's order
        monkeypatch.setattr(shared[1], "_shuffle", lambda e: pytest.fail("rank 1 recomputed the order"))
        assert shared[1].rank_batches() == plain[1].rank_batches()  # rank 1 maps it
        np.testing.assert_array_equal(shared[1].global_order(), plain[1].global_order())
    kept = sorted(f.rsplit("-", 1)[1] for f in os.listdir(store.order_dir) if f.endswith(".npy"))
    assert kept == ["e2.blocks.npy", "e2.visit.npy", "e3.blocks.npy", "e3.visit.npy"]  # older epochs deleted
    build_store(cfg, store.dir)  # a rebuild drops the orders of the old samples
    assert not os.path.exists(store.order_dir)


def test_verify_writes_bad_files_into_the_index(tmp_path, capsys):
    from mm.data import inspect
    from mm.data.synthetic import write_dataset

    data_txt = write_dataset(str(tmp_path), num=5, frames=9, height=32, width=32, seed=0)
    (tmp_path / "videos" / "clip_00002.mp4").write_bytes(b"")
    args = ["--data", data_txt, "--data-index", str(tmp_path / "idx"), "--num-frames", "9", "--height", "32",
            "--width", "32"]
    assert inspect.main(args + ["--verify"]) == 1
    assert "1 new bad files recorded" in capsys.readouterr().out
    assert inspect.main(args) == 0  # the index is rebuilt without the empty file
    out = capsys.readouterr().out
    assert "kept: 4" in out and "dropped empty_file: 1" in out and "clip_00002.mp4" in out
