"""Frozen T5 / CLIP text encoders (spec §5) loaded from tiny real HF directories written in-process."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mm.models import CLIPTextEncoder, T5TextEncoder
from mm.models.text_encoders import load_clip_tokenizer, load_t5_tokenizer, tokenize
from mm.models.tiny_text_encoders import write_tiny_clip, write_tiny_t5

COLOURS = "red green blue yellow white black orange purple".split()
SHAPES = "square circle triangle".split()
DIRECTIONS = "left right up down".split()
CORPUS = [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]
PROMPTS = ["a red square moving right", "a blue circle moving up", ""]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_encoders")
    return write_tiny_t5(root / "t5", CORPUS), write_tiny_clip(root / "clip", CORPUS)


@pytest.fixture(scope="module")
def t5(dirs):
    return T5TextEncoder.from_pretrained(dirs[0], dtype=torch.float32)


@pytest.fixture(scope="module")
def clip(dirs):
    return CLIPTextEncoder.from_pretrained(dirs[1], dtype=torch.float32)


def test_t5_shapes_padding_and_mask(t5):
    ids, mask = t5.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, 512) and ids.dtype == mask.dtype == torch.long
    hidden = t5.encode(ids, mask)
    assert hidden.shape == (3, 512, t5.hidden_size) and hidden.dtype == torch.float32
    tok = t5.tokenizer
    # EOS appended, pad after it; the empty prompt has exactly one valid token: </s>.
    assert mask[2].sum() == 1 and ids[2, 0] == tok.eos_token_id and (ids[2, 1:] == tok.pad_token_id).all()
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok.eos_token_id and (mask[0, :n] == 1).all() and (mask[0, n:] == 0).all()


def test_t5_mask_is_passed_to_the_model(t5):
    ids, mask = t5.tokenize(PROMPTS[:1])
    n = int(mask[0].sum())
    padded = t5.encode(ids, mask)[0, :n]
    unpadded = t5.model(input_ids=ids[:, :n]).last_hidden_state[0]
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)


def test_t5_leading_dims_and_call(t5):
    ids, mask = t5.tokenize(PROMPTS)
    hidden = t5.encode(ids[:, None], mask[:, None])  # collate layout [B, 1, L]
    assert hidden.shape == (3, 1, 512, t5.hidden_size)
    hidden2, mask2 = t5(PROMPTS)
    torch.testing.assert_close(hidden2, hidden[:, 0])
    assert torch.equal(mask2, mask)


def test_truncation(t5, clip):
    long_text = [" ".join(CORPUS * 3)]
    ids, mask = t5.tokenize(long_text)
    assert ids.shape == (1, 512) and mask.all() and ids[0, -1] == t5.tokenizer.eos_token_id
    ids, mask = clip.tokenize(long_text)
    assert ids.shape == (1, 77) and mask.all() and ids[0, -1] == clip.tokenizer.eos_token_id


def test_clip_shapes_and_pooling(clip):
    ids, mask = clip.tokenize(PROMPTS)
    assert ids.shape == mask.shape == (3, 77)
    tok = clip.tokenizer
    # "" -> [BOS, EOS, pad...]
    assert ids[2, 0] == tok.bos_token_id and ids[2, 1] == tok.eos_token_id and mask[2].sum() == 2
    pooled = clip.encode(ids)
    assert pooled.shape == (3, clip.projection_dim)
    # text_embeds = projection of the final-normed hidden state at the first EOS, causal mask only.
    out = clip.model(input_ids=ids)
    first_eos = (ids == tok.eos_token_id).int().argmax(-1)
    expected = clip.model.text_projection(out.last_hidden_state[torch.arange(3), first_eos])
    torch.testing.assert_close(pooled, expected)
    assert clip.encode(ids[:, None]).shape == (3, 1, clip.projection_dim)
    torch.testing.assert_close(clip(PROMPTS), pooled)


def test_vocabularies_cover_demo_captions(t5, clip):
    texts = ["high quality, a yellow triangle moving left", "a white square moving down"]
    t5_ids, _ = t5.tokenize(texts)
    clip_ids, _ = clip.tokenize(texts)
    assert not (t5_ids == t5.tokenizer.unk_token_id).any()
    # Corpus words are whole tokens in the tiny CLIP BPE: BOS + 5 words + EOS.
    tokens = clip.tokenizer.convert_ids_to_tokens(clip_ids[1, :7].tolist())
    assert tokens == ["<|startoftext|>", "a</w>", "white</w>", "square</w>", "moving</w>", "down</w>", "<|endoftext|>"]


def test_weightless_tokenizers_match_encoders(tmp_path, dirs, t5, clip):
    """The data pipeline tokenises without loading weights; ids must equal the encoders' own."""
    ids, mask = tokenize(load_t5_tokenizer(dirs[0]), PROMPTS, 512)
    ref = t5.tokenize(PROMPTS)
    assert torch.equal(ids, ref[0]) and torch.equal(mask, ref[1])
    ids, mask = tokenize(load_clip_tokenizer(dirs[1]), PROMPTS, 77)
    ref = clip.tokenize(PROMPTS)
    assert torch.equal(ids, ref[0]) and torch.equal(mask, ref[1])
    with pytest.raises(ValueError, match="single str"):
        tokenize(t5.tokenizer, "a red square", 512)
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_t5_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_clip_tokenizer(tmp_path)


def test_frozen_and_eval(t5, clip):
    for enc in (t5, clip):
        assert not any(p.requires_grad for p in enc.parameters())
        assert not enc.model.training
        with pytest.raises(ValueError, match="frozen"):
            enc.train()
        enc.eval()
    hidden, _ = t5(PROMPTS[:1])
    assert not hidden.requires_grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_respected(dirs, dtype):
    t5 = T5TextEncoder.from_pretrained(dirs[0], dtype=dtype, max_length=16)
    clip = CLIPTextEncoder.from_pretrained(dirs[1], dtype=dtype)
    assert t5.dtype == clip.dtype == dtype
    hidden, mask = t5(PROMPTS)
    assert hidden.dtype == dtype and hidden.shape[1] == 16 and torch.isfinite(hidden).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # encoders ignore an enclosing autocast
        assert clip(PROMPTS).dtype == dtype


def test_deterministic_writers(tmp_path, dirs):
    again = write_tiny_t5(tmp_path / "t5", CORPUS)
    a = T5TextEncoder.from_pretrained(dirs[0], dtype=torch.float32)(PROMPTS)[0]
    b = T5TextEncoder.from_pretrained(again, dtype=torch.float32)(PROMPTS)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_full_upstream_checkpoint_layouts(tmp_path, dirs):
    """Real snapshots hold a full T5 (encoder+decoder) and a full CLIP (text+vision) checkpoint."""
    from transformers import CLIPConfig, CLIPModel, T5Config, T5ForConditionalGeneration

    t5_dir = tmp_path / "t5_full"
    shutil.copytree(dirs[0], t5_dir)
    cfg = T5Config.from_pretrained(dirs[0])
    cfg.num_decoder_layers = 1
    T5ForConditionalGeneration(cfg).save_pretrained(t5_dir)
    assert T5TextEncoder.from_pretrained(t5_dir, dtype=torch.float32)(PROMPTS)[0].shape[-1] == cfg.d_model

    clip_dir = tmp_path / "clip_full"
    shutil.copytree(dirs[1], clip_dir)
    text_cfg = json.loads((dirs[1] / "config.json").read_text())
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=8, patch_size=4)
    full = CLIPConfig(text_config=text_cfg, vision_config=vision, projection_dim=text_cfg["projection_dim"])
    CLIPModel(full).save_pretrained(clip_dir)
    enc = CLIPTextEncoder.from_pretrained(clip_dir, dtype=torch.float32, tokenizer_directory=dirs[1])
    assert enc(PROMPTS).shape == (3, text_cfg["projection_dim"])


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        T5TextEncoder.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        CLIPTextEncoder.from_pretrained(tmp_path / "does-not-exist")


@pytest.mark.parametrize(
    "which, remove, expected",
    [
        ("t5", ["config.json"], "config.json"),
        ("t5", ["model.safetensors"], "model.safetensors"),
        ("t5", ["tokenizer.json", "spiece.model"], "spiece.model"),
        ("clip", ["merges.txt", "tokenizer.json"], "merges.txt"),
        ("clip", ["model.safetensors"], "weights"),
    ],
)
def test_incomplete_directory(tmp_path, dirs, which, remove, expected):
    src = dirs[0] if which == "t5" else dirs[1]
    dst = tmp_path / which
    shutil.copytree(src, dst)
    for name in remove:
        (dst / name).unlink()
    cls = T5TextEncoder if which == "t5" else CLIPTextEncoder
    with pytest.raises(FileNotFoundError, match=expected) as err:
        cls.from_pretrained(dst)
    assert str(dst) in str(err.value)


def test_missing_weight_shard(tmp_path, dirs):
    dst = tmp_path / "t5"
    shutil.copytree(dirs[0], dst)
    (dst / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {"shared.weight": "model-00001-of-00002.safetensors"}}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        T5TextEncoder.from_pretrained(dst)


def test_bad_max_length(dirs):
    with pytest.raises(ValueError, match="max_length"):
        CLIPTextEncoder.from_pretrained(dirs[1], max_length=78)
    with pytest.raises(ValueError, match="max_length"):
        T5TextEncoder.from_pretrained(dirs[0], max_length=0)


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="corpus"):
        write_tiny_t5(tmp_path / "a", ["", "  "])
    with pytest.raises(ValueError, match="num_heads"):
        write_tiny_clip(tmp_path / "b", CORPUS, hidden=30, num_heads=4)
