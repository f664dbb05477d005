"""``compose`` / ``illustrate`` on scripted model answers: which step runs when, with what, and what is placed.

The generation loop answers from a script chosen by the step's prompt, and the ranking scores are
constructed, so the expected placement is known exactly; the tiny fixture model embeds.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paddlemix.composition import compose, open_library, pipeline, steps
from paddlemix.composition.article import Article, Candidate, ImageSlot
from paddlemix.composition.editing import apply_edit, edit_article
from paddlemix.composition.pipeline import ComposeOptions, illustrate, load_uploads
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT

PARAGRAPHS = ["T0", "T1", "T2", "T3", "T4"]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(tiny_dir, tiny_config):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    for i, rgb in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0), (0, 250, 250), (90, 90, 90)]):
        Image.new("RGB", (32, 24), rgb).save(root / f"c{i}.png")
    return root


@pytest.fixture(scope="module")
def library(model, colours):
    return open_library(model, colours, progress=False)


class Model:
    """Answers each step from its own queue, recognising the step by the end of its prompt."""

    def __init__(self, tokenizer, answers):
        self.tokenizer, self.calls = tokenizer, defaultdict(list)
        self.answers = {k: list(v) for k, v in answers.items()}

    def step(self, text):
        for name, tail in (("selection", "最合适的图是"), ("locations", "适合插入图像的行是"), ("captions", '标题是"')):
            if text.endswith(tail):
                return name
        return "article"

    def __call__(self, model, inputs, settings):
        text = self.tokenizer.decode([t for t in inputs.layout_ids if t != IMAGE_SLOT], skip_special_tokens=True)
        name = self.step(text)
        self.calls[name].append((text, inputs))
        answer = self.answers[name].pop(0)
        if not isinstance(answer, list):
            answer = list(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        ids = answer
        yield from ids + [self.tokenizer.eos_token_id]


@pytest.fixture()
def script(monkeypatch, tokenizer):
    def install(**answers):
        fake = Model(tokenizer, answers)
        monkeypatch.setattr(steps, "generate_ids", fake)
        return fake
    return install


def letter(tokenizer, name):
    return [tokenizer.convert_tokens_to_ids(":"), tokenizer.convert_tokens_to_ids("▁" + name)]


def constructed_scores(monkeypatch, rows):
    """Replace the model's ranking with known scores: ``rows[place] -> [score per library image]``."""
    seen = []

    def fake(model, tokenizer, library, captions, prompt, batch_size, progress):
        seen.append(list(captions))
        return np.array([rows[c] for c in captions], dtype=float)

    monkeypatch.setattr(pipeline, "caption_scores", fake)
    return seen


def test_library_path_places_ranks_and_selects(model, tokenizer, library, script, monkeypatch):
    names = [p.name for p in library.paths]  # c0..c5
    fake = script(locations=["<Seg3>, <Seg1>, <Seg3>, <Seg9>"], captions=['c3a"', 'c1"', 'c3b"', 'c9"'],
                  selection=[letter(tokenizer, "B"), letter(tokenizer, "Z")])
    ranked = constructed_scores(monkeypatch, {"c1": [0.1, 0.2, 0.8, 0.0, 0.9, 0.3],
                                              "c3b": [0.5, 0.1, 0.0, 0.2, 0.95, 0.4]})
    article = Article("i", "\n".join(PARAGRAPHS), list(PARAGRAPHS))
    illustrate(model, tokenizer, article, None, library, ComposeOptions(num_images=2, do_sample=False))

    # captions in the model's order, each prompt carrying the earlier ones (repeats and 9 included)
    assert len(fake.calls["captions"]) == 4
    assert '现在<Seg3>后插入图像对应的标题是"c3a"， <Seg1>后插入图像对应的标题是"c1"。给出适合在<Seg3>后' in \
        fake.calls["captions"][2][0]
    assert ranked == [["c1", "c3b"]]  # valid places, paragraph order; a repeated place keeps its last caption
    assert any("[9]" in note for note in article.notes)

    first, second = article.slots
    assert (first.paragraph, first.caption, first.source) == (1, "c1", "library")
    assert [names.index(Path(c.path).name) for c in first.candidates] == [4, 2, 5, 1]  # top 4, best first
    assert [c.score for c in first.candidates] == [0.9, 0.8, 0.3, 0.2]
    assert (first.chosen, first.fell_back, Path(first.path).name) == (1, False, "c2.png")
    # c2 is used: the next place never sees it; 'Z' is no candidate letter -> A, as the demo
    assert "c2.png" not in [Path(c.path).name for c in second.candidates]
    assert [names.index(Path(c.path).name) for c in second.candidates] == [4, 0, 5, 3]
    assert (second.paragraph, second.chosen, second.fell_back, second.caption) == (3, 0, True, "c3b")
    # the second selection prompt: text since the last place, the chosen image, then 4 candidates
    text, inputs = fake.calls["selection"][1]
    assert "选择合适的配图：T0\nT1\nT2\nT3\n候选图像包括" in text  # chunks joined around the chosen image
    assert inputs.im_mask.astype("int64").sum().item() == 5 * model.config.num_image_tokens
    assert "选择适合插入图像的2行" in fake.calls["locations"][0][0]


def test_user_images_are_placed_without_captions(model, tokenizer, colours, script):
    uploads = load_uploads(model, [str(colours / "c0.png"), str(colours / "c1.png")])
    fake = script(locations=["<Seg2><Seg0><Seg3>"], selection=[letter(tokenizer, "B")])
    article = Article("i", "", ["A", "B", "C", "D"])
    illustrate(model, tokenizer, article, uploads, None, ComposeOptions())
    text, inputs = fake.calls["locations"][0]
    assert "插入图像的2行" in text  # automatic becomes the number of the user's images, as in the demo
    assert inputs.im_mask.astype("int64").sum().item() == 2 * model.config.num_image_tokens
    assert not fake.calls["captions"] and len(fake.calls["selection"]) == 1  # one image left: no call
    assert [(s.paragraph, Path(s.path).name, s.source, s.caption) for s in article.slots] == [
        (0, "c1.png", "upload", ""), (2, "c0.png", "upload", "")]
    assert article.slots[0].candidates[0].score is None
    assert any("[3]" in note and "more places than images" in note for note in article.notes)


def test_user_images_first_then_the_library(model, tokenizer, colours, library, script, monkeypatch):
    uploads = load_uploads(model, [str(colours / "c5.png")])
    fake = script(locations=["<Seg0> <Seg2>"], captions=['c2"'], selection=[letter(tokenizer, "C")])
    constructed_scores(monkeypatch, {"c2": [0.6, 0.5, 0.4, 0.3, 0.2, 0.9]})
    article = Article("i", "", ["A", "B", "C"])
    illustrate(model, tokenizer, article, uploads, library, ComposeOptions(num_images=2))
    assert [s.source for s in article.slots] == ["upload", "library"]
    assert len(fake.calls["captions"]) == 1 and "<Seg2>后插入" in fake.calls["captions"][0][0]
    # the library's copy of the user's image (same content) is already used
    assert "c5.png" not in [Path(c.path).name for c in article.slots[1].candidates]
    assert Path(article.slots[1].path).name == "c2.png"


@pytest.mark.parametrize("num_images, expected", [(2, [0, 2]), ("auto", [])])
def test_an_answer_without_places(model, tokenizer, library, script, monkeypatch, num_images, expected):
    script(locations=["我觉得第二段"], captions=['x"', 'y"'], selection=[letter(tokenizer, "A")] * 2)
    constructed_scores(monkeypatch, {"x": [1, 0, 0, 0, 0, 0], "y": [0, 1, 0, 0, 0, 0]})
    article = Article("i", "", ["A", "B", "C", "D"])
    illustrate(model, tokenizer, article, None, library, ComposeOptions(num_images=num_images))
    assert [s.paragraph for s in article.slots] == expected
    assert any("names no paragraph" in note for note in article.notes)


def test_compose_streams_and_seeds(model, tokenizer, library, monkeypatch):
    from paddlemix.composition import prompts

    for step in ("locations", "captions"):  # a random model never stops: keep its answers short
        monkeypatch.setitem(prompts.BUDGETS, step, 16)
    pieces = []
    kwargs = dict(library=library, num_images=1, max_new_tokens=12, seed=5)
    first = compose(model, tokenizer, "写一篇短文。", on_text=pieces.append, **kwargs)
    again = compose(model, tokenizer, "写一篇短文。", **kwargs)
    other = compose(model, tokenizer, "写一篇短文。", **dict(kwargs, seed=6))
    assert "".join(pieces) == first.text and first.text  # sampled (the default), streamed whole
    assert again.text == first.text and again.slots == first.slots and first.slots
    assert other.text != first.text
    assert set(first.timings) >= {"article", "locations"}


def test_compose_rejects_bad_input(model, tokenizer, colours, tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        compose(model, tokenizer, "x", num_images="many")
    with pytest.raises(ValueError, match="num_images"):
        compose(model, tokenizer, "x", num_images=-1)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="no readable image.*1 unreadable"):
        compose(model, tokenizer, "x", library=empty)
    with pytest.raises(ValueError, match="at most 10"):
        compose(model, tokenizer, "x", images=[str(colours / "c0.png")] * 11)
    with pytest.raises(ValueError, match="broken.png"):
        compose(model, tokenizer, "x", images=[str(empty / "broken.png")])
    with pytest.raises(ValueError, match="instruction is empty"):
        compose(model, tokenizer, "  ")


def test_text_only_when_asked_or_without_images(model, tokenizer, script, tmp_path):
    script(article=["第一段\n第二段"])
    article = compose(model, tokenizer, "x", library=tmp_path / "not opened", num_images=0)
    assert article.paragraphs == ["第一段", "第二段"] and not article.slots and not article.notes
    assert article.library is None  # text only: the library is not even opened
    script(article=["第一段"])
    article = compose(model, tokenizer, "x")
    assert not article.slots and any("no images given" in n for n in article.notes)


def _illustrated():
    slot = lambda p: ImageSlot(p, f"c{p}", "library", [Candidate(f"/x/{p}.png", 0.0)], 0)  # noqa: E731
    return Article("i", "", ["A", "B", "C"], [slot(0), slot(2)])


def test_apply_edit_moves_images_with_their_paragraphs():
    article = _illustrated()
    apply_edit(article, 1, "insert a paragraph before", "new\n\nline")
    assert article.paragraphs == ["A", "new line", "B", "C"] and [s.paragraph for s in article.slots] == [0, 3]
    apply_edit(article, 0, "后插入一段", "after A")
    assert article.paragraphs == ["A", "after A", "new line", "B", "C"]
    assert [s.paragraph for s in article.slots] == [0, 4]
    apply_edit(article, 4, "rewrite", "C2")
    assert article.paragraphs[-1] == "C2" and article.slot_after(4).caption == "c2"  # the image stays
    apply_edit(article, 0, "expand", "")  # an empty answer deletes the paragraph and its image
    assert article.paragraphs == ["after A", "new line", "B", "C2"] and [s.paragraph for s in article.slots] == [3]
    assert article.text == "after A\nnew line\nB\nC2"
    with pytest.raises(ValueError, match="does not exist"):
        apply_edit(article, 9, "rewrite", "x")
    with pytest.raises(ValueError, match="unknown edit type"):
        apply_edit(article, 0, "translate", "x")


def test_edit_article_asks_with_the_neighbours(model, tokenizer, script):
    fake = script(article=["插入的段落"])
    article = _illustrated()
    edit_article(model, tokenizer, article, 2, "insert a paragraph before", "过渡")
    assert "第一段：B\n第二段：C\n插入段的大纲：过渡" in fake.calls["article"][0][0]
    assert article.paragraphs == ["A", "B", "插入的段落", "C"] and [s.paragraph for s in article.slots] == [0, 3]


def test_a_cut_selection_prompt_is_noted(model, tokenizer, library, script, monkeypatch):
    script(locations=["<Seg0>"], captions=['x"'], selection=[letter(tokenizer, "A")])
    constructed_scores(monkeypatch, {"x": [1, 0, 0, 0, 0, 0]})
    saved = model.config.max_length
    model.config.max_length = 600  # the selection prompt holds 4 candidates: 4 x 256 image rows
    try:
        article = Article("i", "", ["A", "B"])
        illustrate(model, tokenizer, article, None, library, ComposeOptions(num_images=1))
    finally:
        model.config.max_length = saved
    assert any("selection (after paragraph 0) prompt" in n and "cut to max_length" in n for n in article.notes)
