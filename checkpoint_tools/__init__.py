"""Offline checkpoint tools for the SUV: ``python -m checkpoint_tools {inspect,convert,diff,verify}``.

Layouts (``--to``): ``ours`` (the trainer's megatron torch_dist checkpoints), ``released`` (one flat file,
``model_ema.pt`` / ``.safetensors``), ``upstream-legacy`` (megatron legacy ``iter_N/mp_rank_TT[_PPP]``
saves of Open-Sora Plan / MindSpeed-MM), ``mindspeed-mm`` (the key space of MindSpeed-MM's OSP v1.5
converter) and ``diffusers`` (a model folder of sharded safetensors). Every layout is read lazily, one
tensor at a time, into the released key space (:mod:`checkpoint_tools.keyspace`); writers stream back out.
"""
