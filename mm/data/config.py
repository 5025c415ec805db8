"""Typed data configuration and the upstream ``data.json`` adapter (spec §8, §7.9, §12 items 17/20/26).

``DataConfig`` is one flat, validated dataclass: every upstream key that changes behaviour has a field.
``DataConfig.from_upstream(json_or_dict)`` reads the upstream layout (``dataset_param`` /
``dataloader_param``) with an explicit key table; ``load_data_config(path)`` accepts either a
``data.json`` or a bare ``data.txt``.

Path rules (documented in the README):

* relative paths inside a ``data.json`` (``data_path``, ``data_folder``, tokenizer ``from_pretrained``,
  ``feature_dir``) resolve against the directory holding the JSON file; a tokenizer entry is resolved
  the same way when it exists there or starts with ``./``/``../``, otherwise kept verbatim (a hub id);
* relative roots and annotation files inside a ``data.txt`` resolve against the ``data.txt`` directory
  (see ``mm/data/annotations.py``).

Deliberate differences from upstream: ``enable_text_preprocess`` is honoured (upstream silently ignored
it, §12.20); shapes with few samples are only dropped when ``min_samples_per_shape`` asks for it and the
drop is reported (§12.26); ``group_data`` must be true because every global batch has one shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

VIDEO_READERS = ("auto", "decoder", "pyav", "av", "decord")
IMAGE_READERS = ("Image", "pil", "PIL")
TRANSFORMS = (
    "ToTensorVideo",
    "CenterCropResizeVideo",
    "MaxHWResizeVideo",
    "SpatialStrideCropVideo",
    "ae_norm",
)
RESIZE_TRANSFORMS = ("CenterCropResizeVideo", "MaxHWResizeVideo", "SpatialStrideCropVideo")

_DEFAULT_PIPELINE = (
    {"trans_type": "ToTensorVideo"},
    {"trans_type": "CenterCropResizeVideo"},
    {"trans_type": "ae_norm"},
)


@dataclass(frozen=True)
class DataConfig:
    """Everything the data pipeline needs; defaults are the released v1.5 video-stage values (§8.2)."""

    # --- files (§8.1) -------------------------------------------------------------------------------
    data_path: str = ""
    data_folder: str = ""
    data_storage_mode: str = "combine"
    dataset_type: str = "t2v"
    # --- readers -----------------------------------------------------------------------------------
    video_reader_type: str = "auto"
    image_reader_type: str = "Image"
    # --- temporal (§8.2 step 5) ----------------------------------------------------------------------
    num_frames: int = 121
    frame_interval: int = 1
    train_fps: float = 24.0
    speed_factor: float = 1.0
    drop_short_ratio: float = 1.0
    min_num_frames: int = 29
    allow_fps_upsampling: bool = False
    # --- spatial (§8.2 steps 2-4) --------------------------------------------------------------------
    max_height: int = 576
    max_width: int = 1024
    max_hxw: int | None = None
    min_hxw: int | None = None
    force_resolution: bool = True
    max_h_div_w_ratio: float = 1.0
    min_h_div_w_ratio: float = 0.42
    force_5_ratio: bool = False
    hw_stride: int = 16
    # --- VAE / patch strides (collate_param, §8.5) ---------------------------------------------------
    ae_stride: int = 8
    ae_stride_t: int = 8
    patch_size: int = 2
    patch_size_t: int = 1
    # --- transforms (§8.3) ---------------------------------------------------------------------------
    train_pipeline: tuple[Mapping[str, Any], ...] = _DEFAULT_PIPELINE
    # --- text (§8.4) ---------------------------------------------------------------------------------
    cfg: float = 0.1
    use_aesthetic: bool = False
    use_text_processer: bool = True
    enable_text_preprocess: bool = True
    keep_chinese: bool = False
    model_max_length: int = 512
    model_max_length_2: int = 77
    tokenizer_path: str | None = None
    tokenizer_path_2: str | None = None
    # --- sampler / loader (§8.5, §7.9) ---------------------------------------------------------------
    batch_size: int = 1
    gradient_accumulation_size: int = 1
    num_workers: int = 4
    shuffle: bool = False
    drop_last: bool = True
    pin_memory: bool = False
    group_data: bool = True
    initial_global_step_for_sampler: int = 0
    seed: int = 42
    min_samples_per_shape: int = 1
    max_replacement_tries: int = 16
    # --- feature cache (upstream load_video_features / load_text_features) ---------------------------
    load_video_features: bool = False
    load_text_features: bool = False
    feature_dir: str | None = None

    def __post_init__(self) -> None:
        if self.max_hxw is None:
            object.__setattr__(self, "max_hxw", self.max_height * self.max_width)
        if self.min_hxw is None:
            object.__setattr__(self, "min_hxw", self.max_hxw)
        object.__setattr__(self, "train_pipeline", tuple(dict(t) for t in self.train_pipeline))
        self._validate()

    # ------------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ValueError(f"DataConfig.{name} must be a number {bound}, got {v!r}")

        def integer(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DataConfig.{name} must be an int, got {v!r}")

        for name in ("num_frames", "frame_interval", "min_num_frames", "max_height", "max_width", "max_hxw",
                     "hw_stride", "ae_stride", "ae_stride_t", "patch_size", "patch_size_t", "batch_size",
                     "gradient_accumulation_size", "model_max_length", "model_max_length_2",
                     "min_samples_per_shape", "max_replacement_tries"):
            integer(name)
            positive(name)
        for name in ("min_hxw", "num_workers", "initial_global_step_for_sampler", "seed"):
            integer(name)
            positive(name, allow_zero=True)
        for name in ("train_fps", "speed_factor", "max_h_div_w_ratio", "min_h_div_w_ratio"):
            positive(name)
        for name in ("drop_short_ratio", "cfg"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise ValueError(f"DataConfig.{name} must be in [0, 1], got {v!r}")
        if self.data_storage_mode != "combine":
            raise ValueError(f"DataConfig.data_storage_mode must be 'combine', got {self.data_storage_mode!r}")
        if self.dataset_type not in ("t2v", "t2i"):
            raise ValueError(f"DataConfig.dataset_type must be one of ('t2v', 't2i'), got {self.dataset_type!r}")
        if self.video_reader_type not in VIDEO_READERS:
            raise ValueError(f"DataConfig.video_reader_type must be one of {VIDEO_READERS}, "
                             f"got {self.video_reader_type!r}")
        if self.image_reader_type not in IMAGE_READERS:
            raise ValueError(f"DataConfig.image_reader_type must be one of {IMAGE_READERS}, "
                             f"got {self.image_reader_type!r}")
        if (self.num_frames - 1) % self.ae_stride_t != 0:
            raise ValueError(f"DataConfig.num_frames must be {self.ae_stride_t}n+1 (ae_stride_t={self.ae_stride_t}),"
                             f" got {self.num_frames}")
        if self.min_num_frames > self.num_frames:
            raise ValueError(f"DataConfig.min_num_frames must be <= num_frames={self.num_frames}, "
                             f"got {self.min_num_frames}")
        if self.min_h_div_w_ratio > self.max_h_div_w_ratio:
            raise ValueError(f"DataConfig.min_h_div_w_ratio ({self.min_h_div_w_ratio}) must be <= "
                             f"max_h_div_w_ratio ({self.max_h_div_w_ratio})")
        if self.min_hxw > self.max_hxw:
            raise ValueError(f"DataConfig.min_hxw must be <= max_hxw={self.max_hxw}, got {self.min_hxw}")
        if self.force_resolution and (self.max_height % self.hw_stride or self.max_width % self.hw_stride):
            raise ValueError(f"DataConfig.max_height/max_width must be multiples of hw_stride={self.hw_stride} "
                             f"with force_resolution, got {self.max_height}x{self.max_width}")
        if not self.group_data:
            raise ValueError("DataConfig.group_data must be true: every global batch has one shape "
                             "(the group sampler is the only sampler), got False")
        self._validate_pipeline()
        if (self.load_video_features or self.load_text_features) and not self.feature_dir:
            raise ValueError("DataConfig.feature_dir must be set when load_video_features or "
                             f"load_text_features is true, got {self.feature_dir!r}")

    def _validate_pipeline(self) -> None:
        if not self.train_pipeline:
            raise ValueError("DataConfig.train_pipeline must list at least one transform, got []")
        for t in self.train_pipeline:
            kind = t.get("trans_type")
            if kind not in TRANSFORMS:
                raise ValueError(f"DataConfig.train_pipeline trans_type must be one of {TRANSFORMS}, got {kind!r}")
            size = (t.get("param") or {}).get("size")
            if kind == "CenterCropResizeVideo" and size is not None and self.force_resolution:
                if [int(s) for s in size] != [self.max_height, self.max_width]:
                    raise ValueError(
                        "DataConfig.train_pipeline CenterCropResizeVideo size must equal "
                        f"[max_height, max_width]=[{self.max_height}, {self.max_width}] with force_resolution, "
                        f"got {list(size)}")
        kinds = [t["trans_type"] for t in self.train_pipeline]
        if kinds[0] != "ToTensorVideo":
            raise ValueError(f"DataConfig.train_pipeline must start with ToTensorVideo, got {kinds[0]!r}")

    # ------------------------------------------------------------------------------------------------
    @property
    def spatial_multiple(self) -> int:
        """Pixel multiple that H and W are padded to in collate (VAE stride x patch size)."""
        return self.ae_stride * self.patch_size

    def replace(self, **changes: Any) -> "DataConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_upstream(cls, source: str | os.PathLike | Mapping[str, Any], **overrides: Any) -> "DataConfig":
        """Build from an upstream ``data.json`` (path or parsed dict); unknown keys are errors."""
        base_dir = "."
        if isinstance(source, (str, os.PathLike)):
            base_dir = os.path.dirname(os.path.abspath(source))
            if not os.path.isfile(source):
                raise ValueError(f"data config not found: {source}")
            with open(source, encoding="utf-8") as f:
                try:
                    source = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source} is not valid JSON: {e}") from None
        kwargs = upstream_to_kwargs(source, base_dir)
        kwargs.update(overrides)
        return cls(**kwargs)


def _resolve(path: str, base_dir: str) -> str:
    if not path:
        return path
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _resolve_tokenizer(path: str | None, base_dir: str) -> str | None:
    """Resolve against the JSON directory when the entry exists there or is explicitly relative
    (``./``, ``../``); otherwise keep it verbatim (it may be a hub id such as ``org/name``)."""
    if not path:
        return None
    candidate = _resolve(path, base_dir)
    explicit = path.startswith(("./", "../", ".\\", "..\\"))
    return candidate if explicit or os.path.exists(candidate) else path


# upstream key -> DataConfig field, per JSON section
_PREPROCESS_KEYS = {
    "video_reader_type": "video_reader_type", "image_reader_type": "image_reader_type",
    "num_frames": "num_frames", "frame_interval": "frame_interval", "max_height": "max_height",
    "max_width": "max_width", "max_hxw": "max_hxw", "min_hxw": "min_hxw", "force_resolution": "force_resolution",
    "max_h_div_w_ratio": "max_h_div_w_ratio", "min_h_div_w_ratio": "min_h_div_w_ratio",
    "force_5_ratio": "force_5_ratio", "hw_stride": "hw_stride", "ae_stride_t": "ae_stride_t",
    "train_fps": "train_fps", "speed_factor": "speed_factor", "drop_short_ratio": "drop_short_ratio",
    "min_num_frames": "min_num_frames", "cfg": "cfg", "batch_size": "batch_size",
    "gradient_accumulation_size": "gradient_accumulation_size", "use_aesthetic": "use_aesthetic",
    "allow_fps_upsampling": "allow_fps_upsampling", "min_samples_per_shape": "min_samples_per_shape",
    "enable_text_preprocess": "enable_text_preprocess",  # some upstream files put it here
}
_DATASET_KEYS = {
    "dataset_type": "dataset_type", "use_text_processer": "use_text_processer",
    "enable_text_preprocess": "enable_text_preprocess", "model_max_length": "model_max_length",
    "keep_chinese": "keep_chinese", "load_video_features": "load_video_features",
    "load_text_features": "load_text_features",
}
_LOADER_KEYS = {
    "batch_size": "batch_size", "num_workers": "num_workers", "shuffle": "shuffle", "drop_last": "drop_last",
    "pin_memory": "pin_memory", "group_data": "group_data", "seed": "seed",
    "initial_global_step_for_sampler": "initial_global_step_for_sampler",
}
_COLLATE_KEYS = {"ae_stride": "ae_stride", "ae_stride_t": "ae_stride_t", "patch_size": "patch_size",
                 "patch_size_t": "patch_size_t"}


# keys read elsewhere, or accepted for upstream compatibility without effect (values are not used)
_SECTION_EXTRA_KEYS = {
    "": {"dataset_param", "dataloader_param"},
    "dataset_param": {"basic_parameters", "preprocess_parameters", "tokenizer_config", "tokenizer_config_2",
                      "feature_dir"},
    "dataset_param.basic_parameters": {"data_path", "data_folder", "data_storage_mode"},
    "dataset_param.preprocess_parameters": {"train_pipeline"},
    "dataloader_param": {"collate_param", "dataloader_mode", "sampler_type"},
    "dataloader_param.collate_param": {"batch_size", "num_frames", "group_data"},
    "tokenizer": {"hub_backend", "autotokenizer_name", "from_pretrained", "model_max_length"},
}
_FIELD_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _check_section(section: Any, where: str, known: set[str]) -> Mapping[str, Any]:
    """The section itself; ValueError naming an unknown key (with the closest known one) or a non-object."""
    import difflib

    if not isinstance(section, Mapping):
        raise ValueError(f"data.json {where or 'top level'} must be an object, got {type(section).__name__}")
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; accepted: {sorted(known)}"
            raise ValueError(f"data.json {where + '.' if where else ''}{key}: unknown key{hint}")
    return section


def _check_type(where: str, value: Any, field: str) -> None:
    """ValueError when an upstream value has the wrong JSON type for its ``DataConfig`` field."""
    kind = str(DataConfig.__dataclass_fields__[field].type).split(" | ")[0]
    if kind not in _FIELD_TYPES or (value is None and "None" in str(DataConfig.__dataclass_fields__[field].type)):
        return
    ok = isinstance(value, _FIELD_TYPES[kind]) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        quoted = " (a quoted string: drop the quotes)" if isinstance(value, str) else ""
        raise ValueError(f"data.json {where} must be {_TYPE_WORDS[kind]}, got {value!r}{quoted}")


def upstream_to_kwargs(doc: Mapping[str, Any], base_dir: str) -> dict[str, Any]:
    """Translate the upstream nested JSON into ``DataConfig`` keyword arguments.

    Unknown keys (typos such as ``num_frame``) and values of the wrong JSON type are errors naming
    the key's path; keys upstream uses only for its own loader selection are accepted and unused.
    """
    if not isinstance(doc, Mapping) or "dataset_param" not in doc:
        raise ValueError("data.json must be an object with a 'dataset_param' section, got keys "
                         f"{sorted(doc) if isinstance(doc, Mapping) else type(doc).__name__}")
    _check_section(doc, "", _SECTION_EXTRA_KEYS[""])
    ds = _check_section(doc["dataset_param"], "dataset_param",
                        set(_DATASET_KEYS) | _SECTION_EXTRA_KEYS["dataset_param"])
    basic = _check_section(ds.get("basic_parameters", {}), "dataset_param.basic_parameters",
                           _SECTION_EXTRA_KEYS["dataset_param.basic_parameters"])
    pre = _check_section(ds.get("preprocess_parameters", {}), "dataset_param.preprocess_parameters",
                         set(_PREPROCESS_KEYS) | _SECTION_EXTRA_KEYS["dataset_param.preprocess_parameters"])
    dl = _check_section(doc.get("dataloader_param", {}), "dataloader_param",
                        set(_LOADER_KEYS) | _SECTION_EXTRA_KEYS["dataloader_param"])
    cp = _check_section(dl.get("collate_param", {}), "dataloader_param.collate_param",
                        set(_COLLATE_KEYS) | _SECTION_EXTRA_KEYS["dataloader_param.collate_param"])
    for key in ("tokenizer_config", "tokenizer_config_2"):
        if ds.get(key):
            _check_section(ds[key], f"dataset_param.{key}", _SECTION_EXTRA_KEYS["tokenizer"])
    for where, section, table in (("dataset_param.preprocess_parameters", pre, _PREPROCESS_KEYS),
                                  ("dataset_param", ds, _DATASET_KEYS), ("dataloader_param", dl, _LOADER_KEYS),
                                  ("dataloader_param.collate_param", cp, _COLLATE_KEYS)):
        for key, name in table.items():
            if key in section:
                _check_type(f"{where}.{key}", section[key], name)
    for key, name in (("num_frames", "num_frames"), ("batch_size", "batch_size"), ("group_data", "group_data")):
        if key in cp:
            _check_type(f"dataloader_param.collate_param.{key}", cp[key], name)
    out: dict[str, Any] = {}
    if "data_path" not in basic:
        raise ValueError("data.json dataset_param.basic_parameters.data_path is required, got nothing")
    out["data_path"] = _resolve(basic["data_path"], base_dir)
    out["data_folder"] = _resolve(basic.get("data_folder", ""), base_dir)
    out["data_storage_mode"] = basic.get("data_storage_mode", "combine")
    for table, section in ((_PREPROCESS_KEYS, pre), (_DATASET_KEYS, ds), (_LOADER_KEYS, dl),
                           (_COLLATE_KEYS, dl.get("collate_param", {}))):
        for key, name in table.items():
            if key in section:
                out[name] = section[key]
    if "train_pipeline" in pre:
        pipe = pre["train_pipeline"]
        video = pipe.get("video") if isinstance(pipe, Mapping) else None
        image = pipe.get("image", video) if isinstance(pipe, Mapping) else None
        if not video:
            raise ValueError(f"data.json train_pipeline.video must be a non-empty list, got {video!r}")
        if image and [t.get("trans_type") for t in image] != [t.get("trans_type") for t in video]:
            raise ValueError("data.json train_pipeline.image must use the same transforms as .video "
                             f"(one pipeline for both, §8.3), got {image!r}")
        out["train_pipeline"] = tuple(video)
    for key, name in (("tokenizer_config", "tokenizer_path"), ("tokenizer_config_2", "tokenizer_path_2")):
        tok = ds.get(key)
        if tok:
            out[name] = _resolve_tokenizer(tok.get("from_pretrained"), base_dir)
            if tok.get("model_max_length") is not None and name == "tokenizer_path_2":
                out["model_max_length_2"] = tok["model_max_length"]
    if ds.get("feature_dir"):
        out["feature_dir"] = _resolve(ds["feature_dir"], base_dir)
    # the collate section repeats values; the preprocess ones win when both are given
    if "num_frames" in cp and "num_frames" in pre and cp["num_frames"] != pre["num_frames"]:
        raise ValueError(f"data.json collate_param.num_frames ({cp['num_frames']}) must equal "
                         f"preprocess_parameters.num_frames ({pre['num_frames']})")
    if "batch_size" in pre and "batch_size" in dl and pre["batch_size"] != dl["batch_size"]:
        raise ValueError(f"data.json dataloader_param.batch_size ({dl['batch_size']}) must equal "
                         f"preprocess_parameters.batch_size ({pre['batch_size']})")
    return out


def load_data_config(path: str | os.PathLike, **overrides: Any) -> DataConfig:
    """``data.json`` -> ``DataConfig.from_upstream``; ``data.txt`` -> defaults with that data_path."""
    path = os.fspath(path)
    if path.endswith(".json"):
        return DataConfig.from_upstream(path, **overrides)
    if path.endswith(".txt"):
        return DataConfig(data_path=os.path.abspath(path), **overrides)
    raise ValueError(f"data config path must end in .json (data.json) or .txt (data.txt), got {path!r}")


def frames_to_latent(num_frames: int, ae_stride_t: int) -> int:
    """Latent frames of an ``ae_stride_t·n+1`` clip (§4.6)."""
    return math.ceil((num_frames - 1) / ae_stride_t) + 1


__all__ = ["DataConfig", "load_data_config", "upstream_to_kwargs", "frames_to_latent"]
