"""mm.data: the training data pipeline (spec §8; encoder-DP sharding §7.3; sampler resume §7.9).

One concept per module:

* ``config``        ``DataConfig`` (typed, validated) and the upstream ``data.json`` adapter
* ``annotations``   ``data.txt`` lines and annotation records
* ``frames`` / ``resolution``  temporal (fps resampling, 8n+1) and spatial (fixed / multi-res / 5-ratio) rules
* ``index``         the filter decision per record; the in-memory ``DataIndex`` with per-reason drop counts
* ``index_store`` / ``build_index``  the on-disk, memory-mapped columnar index (built once, cached) and its CLI
* ``decode`` / ``transforms`` / ``text``  PyAV/decord/PIL readers, centre-crop-resize + ae_norm, captions + tokens
* ``dataset``       ``VideoTextDataset`` (bad input replaced by a same-shape sample, reported)
* ``sampler``       ``GroupedDistributedSampler`` (one shape per global batch, exact resumable state)
* ``collate`` / ``loader``  batch padding + masks; ``build_dataloader`` / ``ResumableDataLoader``
* ``feature_cache`` / ``extract_features``  cached WFVAE/T5/CLIP features and training from them
* ``synthetic`` / ``inspect``  CLIs: a moving-shapes mp4 dataset; what the filters keep and drop
* ``captions``      caption cleaning (``clean_caption``)

Submodules are imported explicitly (``from mm.data.loader import build_dataloader``); importing the
package loads nothing heavy.
"""
