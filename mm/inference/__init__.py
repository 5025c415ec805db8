"""Batch text-to-video inference (spec §9): prompts -> DP shard -> text features -> seeded noise -> flow-ODE
sampling with CFG in fp32 -> tiled WFVAE decode -> mp4/png + JSON sidecar per sample.

* :mod:`mm.inference.pipeline`  ``OpenSoraPlanPipeline`` (build from a JSON spec; the sampling loop) and
  ``SamplingConfig``
* :mod:`mm.inference.runner`    ``generate_videos``: sharding over DP replicas, resume, writing, progress
* :mod:`mm.inference.prompts`   prompt files, v1.5 text templates, sharding, output names
* :mod:`mm.inference.video_io`  uint8 conversion, mp4/png/sidecar writing (atomic), reading back
* :mod:`mm.inference.cli`       the ``inference_sora.py`` flags and their validation
"""

from mm.inference.pipeline import GenerationOutput, OpenSoraPlanPipeline, SamplingConfig, TextConditioning
from mm.inference.runner import OutputOptions, RunSummary, generate_videos

__all__ = ["OpenSoraPlanPipeline", "SamplingConfig", "TextConditioning", "GenerationOutput", "OutputOptions",
           "RunSummary", "generate_videos"]
