"""The training data loader: dataset + group sampler + DataLoader workers, with resumable state
(spec §8.5, §7.3, §7.9).

``ResumableDataLoader`` iterates one epoch from the sampler's position. For every micro-batch it yields it
advances the sampler (so ``state_dict()`` taken between two batches resumes at the next one, exactly,
whatever DataLoader workers had prefetched), removes the ``skipped`` list from the batch, logs each
skip with its reason and counts it in the sampler state. ``merge_sampler_states`` combines the per-rank
skip bookkeeping (e.g. after ``all_gather_object``) before rank 0 saves it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any, Iterator, Sequence

from torch.utils.data import DataLoader

from mm.data.collate import Collator
from mm.data.config import DataConfig
from mm.data.dataset import VideoTextDataset
from mm.data.feature_cache import FeatureCache, FeatureCollator, FeatureDataset
from mm.data.build_index import open_index
from mm.data.index import DataIndex
from mm.data.index_store import IndexStore
from mm.data.sampler import GroupedDistributedSampler
from mm.data.text import TextProcessor, caption_cleaner, load_tokenizer

logger = logging.getLogger(__name__)


class ResumableDataLoader:
    """Iterable over this rank's micro-batches; ``state_dict``/``load_state_dict`` delegate to the sampler."""

    def __init__(self, dataset: Any, sampler: GroupedDistributedSampler, *, collate_fn: Any,
                 num_workers: int = 0, pin_memory: bool = False, timeout: float = 0,
                 multiprocessing_context: str | None = None) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.timeout = timeout
        self.multiprocessing_context = multiprocessing_context if num_workers > 0 else None
        # bad samples first met by this process (each counted once), with an example path per reason
        self.skips_this_run: Counter = Counter()
        self.skip_examples: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.sampler.epoch)
        if hasattr(self.dataset, "known_bad"):
            self.dataset.known_bad = dict(self.sampler.bad_samples)
        epoch = self.sampler.epoch
        loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, timeout=self.timeout,
                            multiprocessing_context=self.multiprocessing_context)
        skipped_this_epoch: Counter = Counter()
        for batch in loader:
            skipped = batch.pop("skipped", [])
            new = {s["index"]: s for s in skipped if s["index"] not in self.sampler.bad_samples}.values()
            for s in new:  # the one log line per bad sample (the dataset workers do not log)
                logger.warning("sample %d replaced (%s): %s %s", s["index"], s["reason"], s["path"], s["detail"])
                self.skips_this_run[s["reason"]] += 1
                self.skip_examples.setdefault(s["reason"], s["path"])
            self.sampler.record_skips(skipped)
            skipped_this_epoch.update(s["reason"] for s in skipped)
            self.sampler.advance(1)
            yield batch
        if skipped_this_epoch:
            logger.warning("epoch %d: replaced bad samples %s (known bad so far: %d)", epoch,
                           dict(skipped_this_epoch), len(self.sampler.bad_samples))

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def merge_sampler_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One state from every rank's: position from the first, skips summed, bad samples united."""
    if not states:
        raise ValueError("merge_sampler_states needs at least one state, got 0")
    merged = dict(states[0])
    skipped: Counter = Counter()
    bad: dict[str, str] = {}
    for s in states:
        if (s["epoch"], s["consumed_samples"]) != (merged["epoch"], merged["consumed_samples"]):
            raise ValueError(f"ranks disagree on the sampler position: {(s['epoch'], s['consumed_samples'])} "
                             f"vs {(merged['epoch'], merged['consumed_samples'])}")
        skipped.update(s.get("skipped", {}))
        bad.update(s.get("bad_samples", {}))
    merged["skipped"] = dict(skipped)
    merged["bad_samples"] = dict(sorted(bad.items(), key=lambda kv: int(kv[0])))
    return merged


def build_text_processor(cfg: DataConfig, tokenizer: Any = None, tokenizer_2: Any = None) -> TextProcessor:
    """Tokenizers given as objects win; otherwise loaded from ``cfg.tokenizer_path[_2]`` when text
    processing is on."""
    if cfg.use_text_processer:
        if tokenizer is None and cfg.tokenizer_path:
            tokenizer = load_tokenizer(cfg.tokenizer_path)
        if tokenizer_2 is None and cfg.tokenizer_path_2:
            tokenizer_2 = load_tokenizer(cfg.tokenizer_path_2)
    return TextProcessor(tokenizer, tokenizer_2, max_length=cfg.model_max_length, max_length_2=cfg.model_max_length_2,
                         cfg_rate=cfg.cfg, cleaner=caption_cleaner(cfg.enable_text_preprocess, cfg.keep_chinese),
                         use_aesthetic=cfg.use_aesthetic)


def shared_order_dir(index: Any) -> str | None:
    """The on-disk index's directory for epoch orders shared by the ranks; ``None`` (each rank keeps its
    own, 4 bytes per sample, with a warning) when the index is in memory or its directory is read-only."""
    if not isinstance(index, IndexStore):
        return None
    if not os.access(index.dir, os.W_OK):
        logger.warning("data index %s is read-only: each rank keeps its own epoch order (%.0f MB)", index.dir,
                       len(index) * 4 / 2 ** 20)
        return None
    return index.order_dir


def build_dataloader(cfg: DataConfig, *, rank: int = 0, num_replicas: int = 1,
                     global_batch_size: int | None = None, tokenizer: Any = None, tokenizer_2: Any = None,
                     index: DataIndex | IndexStore | None = None, num_workers: int | None = None,
                     dataset: Any = None, index_dir: str | None = None) -> ResumableDataLoader:
    """Index -> dataset -> sampler -> loader.

    The index defaults to the on-disk one of ``cfg`` (``open_index``: ``index_dir`` or the cache, built on
    first use); the sampler works on its memory-mapped shape groups.

    ``global_batch_size`` defaults to ``batch_size × num_replicas × gradient_accumulation_size``; with
    encoder-DP pass ``num_replicas = world`` and the real global batch ``DP × MBS × GA``.
    With ``cfg.load_video_features`` the batches come from the feature cache in ``cfg.feature_dir``
    (``FeatureDataset`` / ``FeatureCollator``). ``dataset`` replaces the pixel dataset; it must expose
    ``shape_keys``.
    """
    if global_batch_size is None:
        global_batch_size = cfg.batch_size * num_replicas * cfg.gradient_accumulation_size
    collate: Any = Collator(cfg.ae_stride, cfg.ae_stride_t, cfg.patch_size, cfg.patch_size_t)
    if dataset is None and cfg.load_video_features:
        text = None if cfg.load_text_features else build_text_processor(cfg, tokenizer, tokenizer_2)
        dataset = FeatureDataset(FeatureCache(cfg.feature_dir, cfg), cfg, text)
        collate = FeatureCollator()
    if dataset is None:
        index = index if index is not None else open_index(cfg, index_dir)
        dataset = VideoTextDataset(index, cfg, build_text_processor(cfg, tokenizer, tokenizer_2))
        groups: Any = index.shape_groups()
    else:
        groups = dataset.shape_keys
    sampler = GroupedDistributedSampler(groups, batch_size=cfg.batch_size, global_batch_size=global_batch_size,
                                        num_replicas=num_replicas, rank=rank, seed=cfg.seed,
                                        initial_global_step=cfg.initial_global_step_for_sampler,
                                        order_dir=shared_order_dir(index))
    workers = cfg.num_workers if num_workers is None else num_workers
    if workers > 0:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fast tokenizers in forked workers
    return ResumableDataLoader(dataset, sampler, num_workers=workers, pin_memory=cfg.pin_memory, collate_fn=collate)
