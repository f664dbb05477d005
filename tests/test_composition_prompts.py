"""Composition prompts pinned to the official demo's text, their token layout, and the answer readers.

The expected strings are written out by hand from ``InternLM-XComposer-2.0/examples/gradio_demo_composition.py``
(commit 722228a): a builder that drifts by one character (a full-width colon, a space) fails here.
"""
from __future__ import annotations

import pytest

from paddlemix.composition import prompts
from paddlemix.composition.parsing import (caption_table, parse_caption, parse_locations, parse_selection,
                                           split_paragraphs, spread_places, strip_chat_markers)

U146, U145 = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"
P = ["P0", "P1", "P2"]


# --- prompts -------------------------------------------------------------------------------------
def test_text2instruction_without_and_with_meta():
    assert prompts.text2instruction("Q") == "[UNUSED_TOKEN_146]user\nQ[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    meta = ("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n- InternLM-XComposer (浦语·灵笔) "
            "is a conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is "
            "designed to be helpful, honest, and harmless.\n- InternLM-XComposer (浦语·灵笔) can understand and "
            "communicate fluently in the language chosen by the user such as English and 中文.\n")
    assert prompts.text2instruction("Q", with_meta=True) == (
        f"{U146}system\n{meta}{U145}\n{U146}user\nQ{U145}\n{U146}assistant\n")


def test_article_prompt():
    assert prompts.article_prompt("写一篇文章") == f"{U146}user\n写一篇文章{U145}\n{U146}assistant\n"
    # ('<image> ' * 2).strip() + instruction: one space between the tags, none before the text
    assert prompts.article_prompt("写一篇文章", 2) == f"{U146}user\n<image> <image>写一篇文章{U145}\n{U146}assistant\n"


def test_location_prompt():
    assert prompts.location_prompt(P, "2") == (
        f'{U146}user\n给定文章"<Seg0> P0\n<Seg1> P1\n<Seg2> P2\n" 根据上述文章，选择适合插入图像的2行{U145}\n'
        f"{U146}assistant\n适合插入图像的行是")
    assert prompts.location_prompt(P, "") == (
        f'{U146}user\n给定文章"<Seg0> P0\n<Seg1> P1\n<Seg2> P2\n" 根据上述文章，选择适合插入图像的行{U145}\n'
        f"{U146}assistant\n适合插入图像的行是")
    # the composition demo: '<image> ' * n, the trailing space kept
    assert prompts.location_prompt(P, "2", num_uploads=2) == (
        f'{U146}user\n<image> <image> 给定文章"<Seg0> P0\n<Seg1> P1\n<Seg2> P2\n" 根据上述文章，选择适合插入图像的2行'
        f"{U145}\n{U146}assistant\n适合插入图像的行是")


def test_caption_prompts_carry_the_earlier_captions():
    first = prompts.caption_prompt(P, 0)
    assert first == (f'{U146}user\n给定文章"<Seg0> P0\n<Seg1> P1\n" 给出适合在<Seg0>后插入的图像对应的标题。{U145}\n'
                     f'{U146}assistant\n标题是"')
    second = prompts.caption_prompt(P, 2, [(0, "C0")])
    assert second == (f'{U146}user\n给定文章"<Seg0> P0\n<Seg1> P1\n<Seg2> P2\n" 现在<Seg0>后插入图像对应的标题是"C0"。'
                      f'给出适合在<Seg2>后插入的图像对应的标题。{U145}\n{U146}assistant\n标题是"')
    third = prompts.caption_prompt(P, 1, [(0, "C0"), (2, "C2")])
    assert third == (f'{U146}user\n给定文章"<Seg0> P0\n<Seg1> P1\n<Seg2> P2\n" 现在<Seg0>后插入图像对应的标题是"C0"， '
                     f'<Seg2>后插入图像对应的标题是"C2"。给出适合在<Seg1>后插入的图像对应的标题。{U145}\n'
                     f'{U146}assistant\n标题是"')


def test_selection_prompts():
    first = prompts.selection_prompt(["P0\n"], 4)
    assert first == (f"{U146}user\n根据给定上下文和候选图像，选择合适的配图：P0\n候选图像包括: A.<image>\nB.<image>\n"
                     f"C.<image>\nD.<image>{U145}\n{U146}assistant\n最合适的图是")
    second = prompts.selection_prompt(["P0\n", "P1\nP2\n"], 2)
    assert second == (f"{U146}user\n根据给定上下文和候选图像，选择合适的配图：P0\n<image>P1\nP2\n候选图像包括: A.<image>\n"
                      f"B.<image>{U145}\n{U146}assistant\n最合适的图是")


def test_edit_prompts():
    turn = lambda body: f"{U146}user\n{body}{U145}\n{U146}assistant\n"  # noqa: E731
    assert prompts.edit_prompt("expand", "T", "M") == turn("扩写以下段落：T\n基于以下素材：M")
    assert prompts.edit_prompt("改写", "T", "M") == turn("改写以下段落：T\n基于以下素材：M")
    assert prompts.edit_prompt("rewrite", "T") == turn("改写以下段落：T\n基于以下素材：")
    assert prompts.edit_prompt("abbreviate", "T", "ignored") == turn("缩写以下段落：T")
    assert prompts.edit_prompt("insert a paragraph before", "T", "O", before="B", after="A") == turn(
        "在以下两段中插入一段。\n第一段：B\n第二段：T\n插入段的大纲：O")
    assert prompts.edit_prompt("后插入一段", "T", "O", before="B", after="") == turn(
        "在以下两段中插入一段。\n第一段：T\n第二段：\n插入段的大纲：O")
    with pytest.raises(ValueError, match="needs an instruction"):
        prompts.edit_prompt("insert a paragraph after", "T", "")
    with pytest.raises(ValueError, match="unknown edit type"):
        prompts.edit_prompt("translate", "T", "x")


def test_official_constants():
    assert (prompts.LOCATION_ANSWER_PREFIX, prompts.CAPTION_ANSWER_PREFIX, prompts.SELECTION_ANSWER_PREFIX) == (
        "适合插入图像的行是", '标题是"', "最合适的图是")
    assert prompts.BUDGETS == {"article": 4096, "locations": 200, "captions": 200, "selection": 10}
    assert (prompts.TOP_P, prompts.TOP_K, prompts.TEMPERATURE, prompts.REPETITION_PENALTY) == (0.8, 40, 1.0, 1.005)
    assert (prompts.MAX_SECTIONS, prompts.STOP_TOKEN, prompts.MAX_UPLOADS, prompts.EDIT_MAX_LENGTH) == (
        60, "[UNUSED_TOKEN_0]", 10, 500)


# --- readers -------------------------------------------------------------------------------------
def test_split_paragraphs_is_the_demo_rule():
    text = "\n  Title\n\n\n  first line\n \t\nsecond  \n\n- item\n"
    assert split_paragraphs(text) == ["Title", "first line", "second  ", "- item"]
    assert split_paragraphs("one") == ["one"]
    assert split_paragraphs("  \n \n") == []


def test_parse_locations_well_formed():
    found = parse_locations("<Seg1>, <Seg4>, <Seg7>")
    assert found.places == [1, 4, 7] and not found.problems
    assert found.answer == "适合插入图像的行是<Seg1>, <Seg4>, <Seg7>"


def test_parse_locations_keeps_the_models_order_repeats_and_tail():
    # as the demo: model order, repeats and any index kept; tags after the end marker count too
    assert parse_locations("<Seg5><Seg2> <Seg5>\n<Seg99>").places == [5, 2, 5, 99]
    assert parse_locations("<Seg3>[UNUSED_TOKEN_0] <Seg6>").places == [3, 6]


@pytest.mark.parametrize("answer, places, problem", [
    ("第三行和第五行", [], "names no paragraph"),
    ("<Seg>, <Seg2>", [2], "without a paragraph number"),   # the demo crashes on int('')
    ("<Seg>", [], "without a paragraph number"),
    ("<seg1> Seg2 <Seg 3> <Seg4", [], "names no paragraph"),  # case and shape matter, as in the demo's regex
    ("", [], "names no paragraph"),
])
def test_parse_locations_malformed(answer, places, problem):
    found = parse_locations(answer)
    assert found.places == places
    assert any(problem in p for p in found.problems)


def test_spread_places():
    assert spread_places(5, 2) == [0, 2]
    assert spread_places(6, 3) == [0, 2, 4]
    assert spread_places(1, 3) == [0]
    assert spread_places(0, 2) == [] and spread_places(4, 0) == []


@pytest.mark.parametrize("answer, caption", [
    ('西湖的春天"[UNUSED_TOKEN_0]', "西湖的春天"),
    ('  a red "circle" ', "a red"),          # cut at the first ASCII quote, then stripped
    ("no closing quote at all\n", "no closing quote at all"),
    ('"', ""),
    ("全角引号“不算”", "全角引号“不算”"),       # only the ASCII quote closes it
])
def test_parse_caption(answer, caption):
    assert parse_caption(answer) == caption


def test_caption_table_is_the_demos_dict():
    table = caption_table([4, 1, 4], ["a", "b", "c"])
    assert table == {4: "c", 1: "b"} and list(table) == [4, 1]


@pytest.mark.parametrize("answer, count, index", [
    (" C", 4, 2), ("A.", 4, 0), ("  D</s>", 4, 3), ("B", 2, 1),
    ("C", 2, None),        # a letter past the shown candidates: the demo's IndexError -> A
    ("E", 4, None), ("c", 4, None), ("", 4, None), ("   ", 4, None), (":C", 4, None),
])
def test_parse_selection(answer, count, index):
    got, reason = parse_selection(answer, count)
    assert got == index
    assert (reason == "") == (index is not None)


def test_strip_chat_markers():
    assert strip_chat_markers(f"<Seg1>{U145}\n{U146}x") == "<Seg1>\nx"
