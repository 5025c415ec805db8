"""Feature cache: sharded, resumable extraction with the tiny WFVAE/T5/CLIP equals on-the-fly encoding, and
training batches from the cache (upstream load_video_features / load_text_features)."""

import json
import os

import pytest
import torch

from mm.data.config import DataConfig
from mm.data.dataset import VideoTextDataset
from mm.data.extract_features import extract_features
from mm.data.feature_cache import INDEX_FILE, FeatureCache, list_shards
from mm.data.index import build_index
from mm.data.loader import build_dataloader, build_text_processor
from mm.data.synthetic import write_dataset
from mm.models.text_encoders import CLIPTextEncoder, T5TextEncoder
from mm.models.tiny_text_encoders import write_tiny_clip, write_tiny_t5
from mm.models.wfvae import WFVAE, tiny_wfvae_config

CFG = DataConfig(num_frames=9, min_num_frames=9, max_height=32, max_width=32, enable_text_preprocess=True,
                 batch_size=1, num_workers=0, cfg=0.0, tokenizer_path=None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    write_dataset(str(root / "ds"), num=3, frames=9, height=32, width=32, seed=4)
    ann = json.loads((root / "ds/annotation.json").read_text())
    ann.append(dict(ann[0], path="videos/missing.mp4"))  # recorded as bad, left out of the cache
    (root / "ds/annotation.json").write_text(json.dumps(ann))
    corpus = sorted({c for a in ann for c in a["cap"]})
    t5 = T5TextEncoder.from_pretrained(write_tiny_t5(root / "t5", corpus), dtype=torch.float32)
    clip = CLIPTextEncoder.from_pretrained(write_tiny_clip(root / "clip", corpus), dtype=torch.float32)
    vae = WFVAE.from_upstream(tiny_wfvae_config())
    cfg = CFG.replace(data_path=str(root / "ds/data.txt"), tokenizer_path=str(root / "t5"),
                      tokenizer_path_2=str(root / "clip"))
    # staged extraction: rank 1 of 2 finishes, rank 0 is interrupted after one sample, then restarts
    out = str(root / "cache")
    kw = dict(vae=vae, t5=t5, clip=clip, shard_size=2, model_id="tiny")
    counts = [extract_features(cfg, out, rank=1, world_size=2, **kw)]  # indices 1, 3 (bad)
    counts.append(extract_features(cfg, out, rank=0, world_size=2, max_samples=1, **kw))  # index 0
    counts.append(os.path.exists(os.path.join(out, INDEX_FILE)))  # incomplete: no index yet
    counts.append(extract_features(cfg, out, rank=0, world_size=2, **kw))  # only the missing index 2
    counts.append(extract_features(cfg, out, rank=0, world_size=1, **kw))  # nothing left at another world size
    return root, cfg, vae, t5, clip, out, counts


def test_extract_resume_and_round_trip(setup):
    root, cfg, vae, t5, clip, out, counts = setup
    assert counts == [1, 1, False, 1, 0]
    assert len(list_shards(out)) == 3
    cache = FeatureCache(out, cfg)
    assert [s["index"] for s in cache.samples] == [0, 1, 2]
    assert cache.meta["bad_samples"] == {"3": "missing_file"}
    assert cache.shape_keys == ["2x4x4"] * 3

    # on the fly, epoch 0: identical pixels -> identical latents and text features
    index = build_index(cfg)
    ds = VideoTextDataset(index, cfg, build_text_processor(cfg))
    for j, s in enumerate(cache.samples):
        ref = ds[s["index"]]
        got = cache.read(j, ("latents", "prompt_embeds", "prompt_mask", "pooled_embeds"))
        torch.testing.assert_close(got["latents"], vae.encode(ref["video"][None])[0], rtol=0, atol=0)
        torch.testing.assert_close(got["prompt_embeds"], t5.encode(ref["prompt_ids"], ref["prompt_mask"]))
        torch.testing.assert_close(got["pooled_embeds"], clip.encode(ref["prompt_ids_2"]))
        assert torch.equal(got["prompt_mask"], ref["prompt_mask"]) and s["caption"] == ref["caption"]


def test_train_from_cache(setup):
    root, cfg, vae, t5, clip, out, _ = setup
    train_cfg = cfg.replace(load_video_features=True, load_text_features=True, feature_dir=out, batch_size=2)
    loader = build_dataloader(train_cfg, global_batch_size=2)
    batches = list(loader)
    assert len(batches) == 2  # 3 cached samples, padded to whole global batches
    b = batches[0]
    assert b["latents"].shape == (2, 32, 2, 4, 4) and b["video_mask"].shape == (2, 2, 4, 4)
    assert b["prompt_embeds"].shape == (2, 1, 512, t5.hidden_size) and b["prompt_mask"].shape == (2, 1, 512)
    assert b["pooled_embeds"].shape == (2, 1, clip.projection_dim)
    # CFG drop swaps in the empty-prompt features
    dropped = next(iter(build_dataloader(train_cfg.replace(cfg=1.0), global_batch_size=2)))
    null_ids = t5.tokenize([""])
    torch.testing.assert_close(dropped["prompt_embeds"][0], t5.encode(*null_ids))
    assert dropped["caption"] == ["", ""]
    # text tokenised on the fly from the cached caption
    tok = next(iter(build_dataloader(train_cfg.replace(load_text_features=False), global_batch_size=2)))
    assert tok["prompt_ids"].shape == (2, 1, 512) and tok["prompt_ids_2"].shape == (2, 1, 77)
    # a cache made with other data settings is refused
    with pytest.raises(ValueError, match="other data settings"):
        FeatureCache(out, cfg.replace(seed=1))
