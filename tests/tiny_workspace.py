"""A tiny, real training/inference workspace in a temp dir: synthetic mp4 clips + tiny T5/CLIP, and
copies of the examples/tiny JSONs pointing at them (optionally smaller clips for speed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_workspace(tmp: str | os.PathLike, *, num: int = 4, frames: int = 9, size: int = 32, cfg_rate: float = 0.1,
                   text_len: int = 16) -> dict[str, str]:
    from mm.data.synthetic import write_dataset, write_tiny_encoders

    tmp = Path(tmp)
    data = tmp / "data"
    write_dataset(str(data), num=num, frames=frames, height=size, width=size, seed=0)
    write_tiny_encoders(str(data))
    model = json.loads((ROOT / "examples/tiny/model.json").read_text())
    model["text_encoder"]["from_pretrained"] = str(data / "text_encoders/t5")
    model["text_encoder_2"]["from_pretrained"] = str(data / "text_encoders/clip")
    model["ae"]["from_pretrained"] = str(data / "wfvae/wfvae_tiny.ckpt")
    d = json.loads((ROOT / "examples/tiny/data.json").read_text())
    ds, pre = d["dataset_param"], d["dataset_param"]["preprocess_parameters"]
    ds["basic_parameters"]["data_path"] = str(data / "data.txt")
    ds["tokenizer_config"]["from_pretrained"] = str(data / "text_encoders/t5")
    ds["tokenizer_config_2"]["from_pretrained"] = str(data / "text_encoders/clip")
    ds["model_max_length"] = text_len
    pre.update(num_frames=frames, max_height=size, max_width=size, max_hxw=size * size, min_hxw=size * size,
               min_num_frames=min(frames, 9), cfg=cfg_rate)
    for p in pre["train_pipeline"].values():
        p[1]["param"]["size"] = [size, size]
    d["dataloader_param"]["collate_param"]["num_frames"] = frames
    inf = json.loads((ROOT / "examples/tiny/inference.json").read_text())
    for k in ("ae", "text_encoder", "text_encoder_2"):
        inf[k] = model[k]
    inf["pipeline_config"]["input_size"] = [frames, size, size]
    inf["model_max_length"] = text_len
    inf["prompt"] = str(ROOT / "examples/tiny/prompts.txt")
    paths = {"model": tmp / "model.json", "data": tmp / "data.json", "inference": tmp / "inference.json"}
    paths["model"].write_text(json.dumps(model, indent=1))
    paths["data"].write_text(json.dumps(d, indent=1))
    paths["inference"].write_text(json.dumps(inf, indent=1))
    return {k: str(v) for k, v in paths.items()} | {"root": str(tmp), "data_dir": str(data)}
