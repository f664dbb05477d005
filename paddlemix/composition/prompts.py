"""The official composition prompts, answer prefixes and decoding settings, as plain strings.

Everything here is what ``InternLM-XComposer-2.0/examples/gradio_demo_composition.py`` (the
official composition demo) sends to the model, reproduced character for character (full-width
punctuation included; the tests pin every string). The demo builds each prompt as a chat turn
with no system turn and then *appends a partial answer* (``适合插入图像的行是``, ``标题是"``,
``最合适的图是``) that the model must continue. ``<image>`` marks where an image's embeddings go
(not the chat's ``<ImageHere>``). The one prompt that is ours, not official, is the ranking
prompt (:data:`RANKING_USER_TEXT`): the official demo ranks candidates with a web service.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

from paddlemix.models.internlm_xcomposer2.tokenizer import IM_END_TOKEN, IM_START_TOKEN

__all__ = [
    "IMAGE_TAG", "MAX_SECTIONS", "STOP_TOKEN", "LOCATION_ANSWER_PREFIX", "CAPTION_ANSWER_PREFIX",
    "SELECTION_ANSWER_PREFIX", "COMPOSITION_META_INSTRUCTION", "EDIT_TYPES", "BUDGETS", "EDIT_MAX_LENGTH",
    "TOP_P", "TOP_K", "TEMPERATURE", "REPETITION_PENALTY", "MAX_UPLOADS", "MAX_WEB_CANDIDATES",
    "text2instruction", "article_prompt", "indexed_sections", "location_prompt", "caption_past",
    "caption_prompt", "selection_prompt", "edit_prompt", "RANKING_USER_TEXT", "ranking_prompt",
]

IMAGE_TAG = "<image>"  # the demo's own interleave marker (its ``interleav_wrap`` splits on it)
MAX_SECTIONS = 60  # ``max_section``: paragraphs the demo keeps (and shows to the location step)
STOP_TOKEN = "[UNUSED_TOKEN_0]"  # the demo's stop word (id 92397 in the 7B vocabulary)
LOCATION_ANSWER_PREFIX = "适合插入图像的行是"
CAPTION_ANSWER_PREFIX = '标题是"'
SELECTION_ANSWER_PREFIX = "最合适的图是"
MAX_UPLOADS = 10  # the demo refuses more uploaded images ('No more than 10 images !!!')
MAX_WEB_CANDIDATES = 4  # candidates per place the demo downloads (``temp_{pt}_{0..3}.png``), labelled A-D

# Decoding settings every step passes explicitly (``generate`` / ``generate_with_emb`` / selection).
TOP_P = 0.8
TOP_K = 40
TEMPERATURE = 1.0
REPETITION_PENALTY = 1.005  # fixed for locations, captions, selection and edits; the UI default for the article

# The composition demo's meta instruction (used only with its "With Meta" checkbox, off by default). It
# differs from the chat one: no "multi-modality", no image sentence, and it ends with a newline.
COMPOSITION_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.\n"
)


# max_new_tokens of each step, as the demo passes them (the article's is the UI slider's default).
BUDGETS = {"article": 4096, "locations": 200, "captions": 200, "selection": 10}
EDIT_MAX_LENGTH = 500  # the edit call's ``max_length`` (a total over [BOS] + new tokens), minus the prompt


def text2instruction(text: str, with_meta: bool = False) -> str:
    """``Demo_UI.text2instruction``: one user turn, opened assistant turn; a system turn only
    with the "With Meta" option (default off)."""
    turn = f"{IM_START_TOKEN}user\n{text}{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"
    if with_meta:
        return f"{IM_START_TOKEN}system\n{COMPOSITION_META_INSTRUCTION}{IM_END_TOKEN}\n" + turn
    return turn


def article_prompt(instruction: str, num_uploads: int = 0, with_meta: bool = False) -> str:
    """Step 1 (``generate_article``): uploaded images as ``<image>`` tags, space-separated and
    glued to the instruction (``('<image> ' * n).strip() + instruction``); no answer prefix."""
    return text2instruction((f"{IMAGE_TAG} " * num_uploads).strip() + instruction, with_meta)


def indexed_sections(paragraphs: Sequence[str]) -> List[str]:
    """``idx_text_sections``: paragraph i shown as ``<Seg{i}> {text}\\n``."""
    return [f"<Seg{i}> {text}\n" for i, text in enumerate(paragraphs)]


def location_prompt(paragraphs: Sequence[str], num_images: str, num_uploads: int = 0,
                    with_meta: bool = False) -> str:
    """Step 2 (``generate_loc``). ``num_images``: ``''`` for automatic, else the number as text.
    Uploads are ``'<image> ' * n`` before the text (a trailing space: the composition demo's
    form; ``IXC2_demo.py`` strips it)."""
    full_txt = "".join(indexed_sections(paragraphs))
    text = f"{IMAGE_TAG} " * num_uploads + f'给定文章"{full_txt}" 根据上述文章，选择适合插入图像的{num_images}行'
    return text2instruction(text, with_meta) + LOCATION_ANSWER_PREFIX


def caption_past(earlier: Sequence[Tuple[int, str]]) -> str:
    """The captions already written, as ``generate_cap`` feeds them back: the running ``pasts``
    (items ending ``"， ``) with its last two characters replaced by ``。``; empty at first."""
    if not earlier:
        return ""
    (first_place, first_caption), rest = earlier[0], earlier[1:]
    pasts = f'现在<Seg{first_place}>后插入图像对应的标题是"{first_caption}"， '
    pasts += "".join(f'<Seg{place}>后插入图像对应的标题是"{caption}"， ' for place, caption in rest)
    return pasts[:-2] + "。"


def caption_prompt(paragraphs: Sequence[str], place: int, earlier: Sequence[Tuple[int, str]] = (),
                   with_meta: bool = False) -> str:
    """Step 3 (``generate_cap``): the article up to and including the paragraph after ``place``
    (``text_sections[:po + 2]``), the captions so far, and the forced answer ``标题是"``."""
    full_txt = "".join(indexed_sections(paragraphs)[: place + 2])
    text = f'给定文章"{full_txt}" {caption_past(earlier)}给出适合在<Seg{place}>后插入的图像对应的标题。'
    return text2instruction(text, with_meta) + CAPTION_ANSWER_PREFIX


def selection_prompt(chunks: Sequence[str], num_candidates: int, with_meta: bool = False) -> str:
    """Step 5 (``model_select_image`` / ``model_select_imagebase``). ``chunks``: the text since
    the previous chosen place, each paragraph with its ``\\n``, ending with the current place's
    paragraph; every earlier chosen image sits between two chunks. Candidates are ``A.<image>``,
    ``B.<image>``, ... joined by ``\\n``."""
    labels = "\n".join(f"{chr(ord('A') + j)}.{IMAGE_TAG}" for j in range(num_candidates))
    text = "根据给定上下文和候选图像，选择合适的配图：" + IMAGE_TAG.join(chunks) + "候选图像包括: " + labels
    return text2instruction(text, with_meta) + SELECTION_ANSWER_PREFIX


EDIT_TYPES = {  # English name -> the demo's Chinese name (both accepted)
    "rewrite": "改写", "expand": "扩写", "abbreviate": "缩写",
    "insert a paragraph before": "前插入一段", "insert a paragraph after": "后插入一段",
}


def edit_prompt(edit_type: str, text: str, instruction: str = "", before: str = "", after: str = "",
                with_meta: bool = False) -> str:
    """``paragraph_edit``: ``text`` is the paragraph, ``before``/``after`` its neighbours (empty
    at the article's ends), used by the two insert types."""
    kind = EDIT_TYPES.get(edit_type, edit_type)
    if kind == "扩写":
        body = f"扩写以下段落：{text}\n基于以下素材：{instruction}"
    elif kind == "改写":
        body = f"改写以下段落：{text}\n基于以下素材：{instruction}"
    elif kind == "缩写":
        body = "缩写以下段落：" + text
    elif kind in ("前插入一段", "后插入一段"):
        if not instruction:
            raise ValueError(f"edit {edit_type!r} needs an instruction (the outline of the new paragraph)")
        first, second = (before, text) if kind == "前插入一段" else (text, after)
        body = f"在以下两段中插入一段。\n第一段：{first}\n第二段：{second}\n插入段的大纲：{instruction}"
    else:
        raise ValueError(f"unknown edit type {edit_type!r}; use one of {', '.join(EDIT_TYPES)}")
    return text2instruction(body, with_meta)


# Ours (the official demo ranks with a web service): the model is asked for the image's title in the
# caption step's words and answer form, and scored on writing the given caption.
RANKING_USER_TEXT = "给出这张图像对应的标题。"


def ranking_prompt(user_text: str = RANKING_USER_TEXT, answer_prefix: str = CAPTION_ANSWER_PREFIX,
                   with_meta: bool = False) -> str:
    """The scoring prompt up to the caption: one ``<image>`` first in the user turn, then
    ``user_text``; the caption (and the closing ``"``) follows ``answer_prefix``."""
    return text2instruction(IMAGE_TAG + user_text, with_meta) + answer_prefix
