"""Prompt files, v1.5 text templates, DP sharding and output names (mm.inference.prompts)."""

import pytest

from mm.data.captions import clean_caption
from mm.inference import prompts as P


def test_prompt_file_ignores_blank_lines_and_comments(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# header\n\n  a cat on a mat  \n   \n# another\nA Dog\n", encoding="utf-8")
    assert P.read_prompt_file(f) == ["a cat on a mat", "A Dog"]


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n   \n"])
def test_empty_prompt_file_is_an_error(tmp_path, content):
    f = tmp_path / "p.txt"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="holds no prompt"):
        P.read_prompt_file(f)


def test_missing_prompt_file_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        P.read_prompt_file(tmp_path / "nope.txt")


def test_resolve_prompts_precedence(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("from file\n", encoding="utf-8")
    assert P.resolve_prompts("literal", str(f), str(f)) == ["literal"]
    assert P.resolve_prompts(None, str(f), "json literal") == ["from file"]
    assert P.resolve_prompts(None, None, str(f)) == ["from file"]
    assert P.resolve_prompts(None, None, "a json literal prompt") == ["a json literal prompt"]
    with pytest.raises(ValueError, match="no prompt"):
        P.resolve_prompts(None, None, None)
    with pytest.raises(ValueError, match="empty"):
        P.resolve_prompts("  ", None, None)


def test_templates_are_cleaned():
    assert P.positive_text("A Red   Square") == clean_caption("high quality, A Red Square")
    assert P.positive_text("A Red   Square") == "high quality, a red square"
    neg = P.negative_text()
    assert neg.startswith("worst quality, normal quality") and neg.endswith("underexposed.")
    assert neg == clean_caption(P.DEFAULT_NEGATIVE_PROMPT)
    assert P.negative_text("Extra  Limbs").endswith("underexposed. extra limbs")


@pytest.mark.parametrize("num,batch", [(1, 1), (7, 1), (7, 2), (8, 3)])
def test_sharding_covers_every_prompt_once_with_fixed_batches(num, batch):
    global_batches = P.batches(num, batch)
    for dp in (1, 2, 3):
        shards = [P.shard(num, batch, r, dp) for r in range(dp)]
        flat = sorted(i for s in shards for b in s for i in b)
        assert flat == list(range(num))
        # a batch's composition does not depend on the DP size
        assert all(b in global_batches for s in shards for b in s)


def test_slug_and_stem():
    assert P.slugify("A red square, moving RIGHT!") == "a_red_square_moving_right"
    assert P.slugify("***") == "prompt"
    assert P.slugify("café über straße") == "cafe_uber_strae"
    long = P.slugify("word " * 40)
    assert len(long) <= P.MAX_SLUG_CHARS and long.startswith("word_word")
    assert P.output_stem(3, "a cat") == "0003_a_cat"
    assert P.output_stem(12345, "x") == "12345_x"


def test_prompt_template_and_default_negative_are_configurable():
    import pytest

    from mm.inference.prompts import negative_text, positive_text

    assert positive_text("a red square") == "high quality, a red square"
    assert positive_text("a red square", "{prompt}") == "a red square"
    assert negative_text("", default="") == ""
    assert negative_text("blurry", default="") == "blurry"
    assert negative_text().startswith("worst quality")
    with pytest.raises(ValueError, match="must contain"):
        positive_text("a red square", "high quality")


def test_tiny_preset_conditions_on_plain_captions():
    from mm.config_upstream import load_inference_json
    from mm.inference.pipeline import SamplingConfig

    cfg = SamplingConfig.from_spec(load_inference_json("examples/tiny/inference.json"))
    assert (cfg.prompt_template, cfg.default_negative_prompt) == ("{prompt}", "")
    released = SamplingConfig.from_spec(load_inference_json("examples/opensoraplan1.5/inference_t2v_model1_5.json"))
    assert released.prompt_template == "high quality, {prompt}" and released.default_negative_prompt
