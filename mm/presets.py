"""The tiny preset (``examples/tiny``) re-pointed at generated data: what ``make demo`` and the tests use.

``write_tiny_configs`` copies the preset's model / data / inference JSONs into ``out`` with every input
path pointing into ``data`` (a ``python -m mm.data.synthetic`` output: clips, tiny T5/CLIP, tiny WFVAE)
and the sample size set to the generated clips.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "examples" / "tiny"


def write_tiny_configs(out: str | Path, data: str | Path, *, frames: int, size: int, text_len: int = 16,
                       cfg_rate: float | None = None, ae_update: dict | None = None,
                       features: str | Path | None = None, infer_steps: int | None = None) -> dict[str, Path]:
    """Write ``model.json``, ``data.json`` and ``inference.json`` into ``out``; returns their paths.

    ``ae_update`` overrides the ae block (default: the tiny WFVAE written by ``mm.data.synthetic``);
    ``features`` switches training to that feature cache (``mm.data.extract_features``).
    """
    out, data = Path(out), Path(data)
    out.mkdir(parents=True, exist_ok=True)
    t5, clip = str(data / "text_encoders" / "t5"), str(data / "text_encoders" / "clip")
    model = json.loads((PRESET / "model.json").read_text())
    model["ae"].update(ae_update or {"from_pretrained": str(data / "wfvae" / "wfvae_tiny.ckpt")})
    model["text_encoder"]["from_pretrained"] = t5
    model["text_encoder_2"]["from_pretrained"] = clip
    d = json.loads((PRESET / "data.json").read_text())
    ds, pre = d["dataset_param"], d["dataset_param"]["preprocess_parameters"]
    ds["basic_parameters"]["data_path"] = str(data / "data.txt")
    ds["tokenizer_config"]["from_pretrained"] = t5
    ds["tokenizer_config_2"]["from_pretrained"] = clip
    ds["model_max_length"] = text_len
    if features is not None:
        ds["feature_dir"] = str(features)
        model.update(load_video_features=True, load_text_features=True)
    pre.update(num_frames=frames, max_height=size, max_width=size, max_hxw=size * size, min_hxw=size * size,
               min_num_frames=min(frames, 9))
    if cfg_rate is not None:
        pre["cfg"] = cfg_rate
    for pipe in pre["train_pipeline"].values():
        pipe[1]["param"]["size"] = [size, size]
    d["dataloader_param"]["collate_param"]["num_frames"] = frames
    inf = json.loads((PRESET / "inference.json").read_text())
    for k in ("ae", "text_encoder", "text_encoder_2", "predictor", "weight_dtype"):
        inf[k] = model[k]
    inf["pipeline_config"]["input_size"] = [frames, size, size]
    inf["model_max_length"] = text_len
    inf["prompt"] = str(PRESET / "prompts.txt")
    if infer_steps is not None:
        inf["diffusion"]["num_inference_steps"] = infer_steps
    paths = {"model": out / "model.json", "data": out / "data.json", "inference": out / "inference.json"}
    for key, doc in (("model", model), ("data", d), ("inference", inf)):
        paths[key].write_text(json.dumps(doc, indent=1))
    return paths
