"""Caption cleaning (spec §8.4)."""

from __future__ import annotations

import pytest

from mm.data.captions import clean_caption

NEGATIVE_TEMPLATE = """Worst quality, Normal quality, Low quality, Low res, Blurry, Jpeg artifacts, Grainy, watermark,
            banner, Cropped, Out of frame, Out of focus, Bad anatomy, Bad proportions, Deformed, Disconnected
            limbs, Disfigured, username, error, sketch, duplicate, ugly, monochrome, horror, geometry, mutation,
            disgusting, overexposed, underexposed."""


@pytest.mark.parametrize(
    "raw, expected",
    [
        # plain captions survive (lower-cased)
        ("a red square moving right", "a red square moving right"),
        ("High quality, A Red Square moving right.", "high quality, a red square moving right."),
        # URLs (scheme, www., bare domain), also inside HTML attributes
        ("Check https://example.com/a?b=c and www.foo.org now", "check and now"),
        ("see example.com/page for details", "see for details"),
        ("look at this:http://a.b/c", "look at this"),
        ('<p>A <b>cat</b> on a <a href="http://x.com/y">mat</a></p>', "a cat on a mat"),
        ("a < b and c > d", "a < b and c > d"),
        # handles, IPs, ids, long numbers, article ids
        ("photo by @john_doe of a dog", "photo by of a dog"),
        ("server 192.168.0.1 logs", "server logs"),
        ("tag #123 and #123456 and 1234567890", "tag and and"),
        ("the end 3:45 ", "the end"),
        ("clock at 10:30", "clock at 10:30"),
        # CJK (ideographs dropped without keep_chinese) and enclosed CJK
        ("一只猫 a cat 在 sitting", "a cat sitting"),
        ("company ㈱ logo", "company logo"),
        # dimension strings (latin x, ×, cyrillic х, with spaces / decimals)
        ("Wallpaper 1920x1080 HD", "wallpaper hd"),
        ("poster 20×30 print", "poster print"),
        ("sunset 3.5 x 4 inch", "sunset inch"),
        # repeated quotes / dots, bad punctuation
        ('""quoted"" text', '"quoted" text'),
        ("wait... so....cool", "wait so cool"),
        ("a (small) [red] {box} | here / there * star ~ tilde", "a small red box here there star tilde"),
        ("brand™ logo® © 2020 • bullet", "brand logo 2020 bullet"),
        # quotes and dashes unified
        ("\u201cSmart quotes\u201d \u2014 and \u2018single\u2019 \u2013 dashes", "\"smart quotes\" - and 'single' - dashes"),
        # snake / kebab chains with more than three separators
        ("image_of_a_very_long_snake_case", "image of a very long snake case"),
        ("my-very-long-kebab-case-name", "my very long kebab case name"),
        ("a well-known red-nosed dog", "a well-known red-nosed dog"),
        # file names, image-extension words, junk tokens, shopping boilerplate, pages
        ("photo IMG_1234.JPG of beach", "photo of beach"),
        ("item jc6640 free shipping click for more", "item more"),
        ("page 3 of the book", "of the book"),
        ("free download png clipart", "clipart"),
        # HTML entities, double-escaped; URL-quoted text; mojibake
        ("fish &amp; chips &quot;tasty&quot;", 'fish chips "tasty"'),
        ("fish &amp;amp; chips", "fish chips"),
        ("Caf%C3%A9 in Paris", "café in paris"),
        ("The Ã©tÃ© festival", "the été festival"),
        ("a+b", "a b"),
        # literal backslash-n, whitespace, spacing around punctuation, wrapping quotes, edge punctuation
        ("line\\nbreak", "line break"),
        ("  many    spaces\t\tand\ttabs ", "many spaces and tabs"),
        ("bird,flying,fast", "bird, flying, fast"),
        ("size :  big", "size: big"),
        ("value 3.5 stays", "value 3.5 stays"),
        ('"A wrapped caption"', "a wrapped caption"),
        ("- leading dash, trailing ,", "leading dash, trailing"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_clean_caption(raw, expected):
    assert clean_caption(raw) == expected


def test_keep_chinese():
    assert clean_caption("一只猫 a cat", keep_chinese=True) == "一只猫 a cat"
    # the non-ideograph CJK blocks are removed either way
    assert clean_caption("㈱ 猫", keep_chinese=True) == "猫"


def test_negative_prompt_template_is_flattened():
    out = clean_caption(NEGATIVE_TEMPLATE)
    assert "\n" not in out and "  " not in out
    assert out.startswith("worst quality, normal quality, low quality, low res, blurry,")
    assert out.endswith("disgusting, overexposed, underexposed.")


def test_idempotent_on_cleaned_text():
    for raw in ["High quality, A Red Square moving right.", NEGATIVE_TEMPLATE, "<b>x</b> 1920x1080 @me"]:
        once = clean_caption(raw)
        assert clean_caption(once) == once


def test_rejects_non_string():
    with pytest.raises(ValueError, match="str"):
        clean_caption(None)  # type: ignore[arg-type]
