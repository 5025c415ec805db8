"""Real DataLoader + GroupedDistributedSampler on 2 gloo ranks: each rank reads its shard, the union of a
step equals the global order, global batches are one shape, and the merged state resumes (§8.5, §7.9)."""

import torch.distributed as dist

from harness import run_distributed
from mm.data.config import DataConfig
from mm.data.index import build_index
from mm.data.loader import build_dataloader, merge_sampler_states
from mm.data.sampler import GroupedDistributedSampler
from mm.data.synthetic import write_dataset

CFG = DataConfig(num_frames=17, min_num_frames=9, drop_short_ratio=0.0, max_height=32, max_width=32,
                 enable_text_preprocess=False, batch_size=1, num_workers=0, cfg=0.0)


def _rank_fn(rank, world_size, data_txt, resume_state):
    r, n = rank, world_size  # each rank its own shard (as every rank of a PP stage under encoder-DP)
    loader = build_dataloader(CFG.replace(data_path=data_txt), rank=r, num_replicas=n, global_batch_size=4)
    if resume_state is not None:
        loader.load_state_dict(resume_state)
    out = []
    for k, batch in enumerate(loader):
        out.append((batch["sample_index"].tolist(), tuple(batch["video"].shape)))
        if resume_state is None and k == 3:
            break
    states = [None] * world_size
    dist.all_gather_object(states, loader.state_dict())
    return out, merge_sampler_states(states)


def test_distributed_loader_shards_and_resumes(tmp_path):
    write_dataset(str(tmp_path / "a"), num=6, frames=9, height=32, width=32, seed=0)
    write_dataset(str(tmp_path / "b"), num=5, frames=17, height=32, width=32, seed=1)
    (tmp_path / "data.txt").write_text("a,a/annotation.json\nb,b/annotation.json\n")
    data_txt = str(tmp_path / "data.txt")
    index = build_index(CFG.replace(data_path=data_txt))
    order = GroupedDistributedSampler(index.shape_keys, batch_size=1, global_batch_size=4).global_order().tolist()

    first = run_distributed(_rank_fn, world_size=2, args=(data_txt, None), timeout=60)
    (b0, state), (b1, _) = first
    assert [i for k in range(4) for i in b0[k][0] + b1[k][0]] == order[:8]
    assert state["consumed_samples"] == 8 and state["epoch"] == 0
    for k in range(4):
        assert b0[k][1] == b1[k][1]  # both ranks read the same shape at each step

    rest = run_distributed(_rank_fn, world_size=2, args=(data_txt, state), timeout=60)
    (r0, end_state), (r1, _) = rest
    assert [i for k in range(len(r0)) for i in r0[k][0] + r1[k][0]] == order[8:]
    assert end_state["epoch"] == 1 and end_state["consumed_samples"] == 0
    flat = order
    for g in range(0, len(flat), 4):
        assert len({index.entries[i].shape_key for i in flat[g:g + 4]}) == 1
