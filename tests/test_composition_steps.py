"""Each composition step's model call: token layout, decoding settings, stops, and how the answer is read.

The generation loop is replaced by a script (``scripted``) that records what a step passed to it and
returns chosen ids, so every setting is checked exactly; real greedy decoding runs in the e2e tests.
"""
from __future__ import annotations

from typing import List

import numpy as np
import paddle
import pytest

from paddlemix.composition import decoding, steps
from paddlemix.composition.decoding import prompt_inputs, prompt_layout, stop_ids
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT

U146, U145 = "[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(tiny_dir, tiny_config):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)


@pytest.fixture(scope="module")
def feats(model, tiny_dir):
    return model.encode_img([str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png"), str(tiny_dir / "img1.png")])


def ids_of(tokenizer, text: str, bos: bool = False) -> List[int]:
    return list(tokenizer(text, add_special_tokens=bos)["input_ids"])


class Script:
    """Stands in for ``generate_ids``: records each call and yields the next scripted ids, stopping
    at a stop id or the budget as the real loop does."""

    def __init__(self, *answers: List[int]) -> None:
        self.answers, self.calls = list(answers), []

    def __call__(self, model, inputs, settings):
        self.calls.append((inputs, settings))
        for n, token in enumerate(self.answers.pop(0)):
            if n == settings.max_new_tokens:
                return
            yield token
            if token in settings.eos_token_ids:
                return


@pytest.fixture()
def scripted(monkeypatch):
    def install(*answers):
        script = Script(*answers)
        monkeypatch.setattr(steps, "generate_ids", script)
        return script
    return install


def test_stop_ids_come_from_the_tokenizer(tokenizer):
    stops = stop_ids(tokenizer)
    assert stops.stop_word == tokenizer.convert_tokens_to_ids("[UNUSED_TOKEN_0]")
    assert tokenizer.convert_ids_to_tokens(stops.stop_word) == "[UNUSED_TOKEN_0]"
    assert (stops.eos, stops.im_end) == (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(U145))


# --- layout ----------------------------------------------------------------------------------------
def test_selection_layout_bos_on_first_part_only(tokenizer):
    from paddlemix.composition.prompts import selection_prompt

    n = 5
    got = prompt_layout(tokenizer, selection_prompt(["P0\n", "P1\nP2\n"], 2), 3, n)
    expected = (ids_of(tokenizer, f"{U146}user\n根据给定上下文和候选图像，选择合适的配图：P0\n", bos=True)
                + [IMAGE_SLOT] * n + ids_of(tokenizer, "P1\nP2\n候选图像包括: A.") + [IMAGE_SLOT] * n
                + ids_of(tokenizer, "\nB.") + [IMAGE_SLOT] * n
                + ids_of(tokenizer, f"{U145}\n{U146}assistant\n最合适的图是"))
    assert got == expected
    assert got.count(tokenizer.bos_token_id) == 1 and got[0] == tokenizer.bos_token_id


def test_article_layout_with_uploads(tokenizer):
    from paddlemix.composition.prompts import article_prompt

    got = prompt_layout(tokenizer, article_prompt("Write.", 2), 2, 3)
    assert got == (ids_of(tokenizer, f"{U146}user\n", bos=True) + [IMAGE_SLOT] * 3 + ids_of(tokenizer, " ")
                   + [IMAGE_SLOT] * 3 + ids_of(tokenizer, f"Write.{U145}\n{U146}assistant\n"))


def test_layout_refuses_a_tag_count_mismatch(tokenizer):
    with pytest.raises(ValueError, match="2 <image> tags but 1 images"):
        prompt_layout(tokenizer, "a<image>b<image>c", 1, 4)


def test_prompt_inputs_fill_the_image_rows(model, tokenizer, feats):
    inputs = prompt_inputs(model, tokenizer, "x<image>y<image>z", feats[:2])
    p = feats.shape[1]
    assert inputs.im_mask.astype("int64").sum().item() == 2 * p
    rows = np.nonzero(inputs.im_mask.numpy()[0])[0]
    np.testing.assert_allclose(inputs.embeds.numpy()[0, rows], feats[:2].numpy().reshape(2 * p, -1), atol=0)
    assert inputs.penalty_prefix == [tokenizer.bos_token_id]  # inputs_embeds path: generate starts with BOS
    text = prompt_inputs(model, tokenizer, "just text", via_input_ids=True)
    assert text.im_mask is None and text.penalty_prefix == ids_of(tokenizer, "just text", bos=True)
    np.testing.assert_array_equal(text.embeds.numpy(), model.model.embed(paddle.to_tensor([text.layout_ids])).numpy())


def test_image_prompts_are_cut_to_max_length_as_officially(model, tokenizer, feats):
    saved = model.config.max_length
    model.config.max_length = 300
    try:
        inputs = prompt_inputs(model, tokenizer, "a<image>b<image>c", feats[:2])
    finally:
        model.config.max_length = saved
    assert inputs.truncated and inputs.length == 300 and len(inputs.layout_ids) > 300


# --- steps -----------------------------------------------------------------------------------------
def test_article_step_settings_stops_and_stream(model, tokenizer, scripted):
    stops = stop_ids(tokenizer)
    body = ids_of(tokenizer, "Title\n\n第一段 𠀀 end")
    script = scripted(body + [stops.im_end] + ids_of(tokenizer, "after the end"))
    pieces = []
    out = steps.write_article(model, tokenizer, "Write.", on_text=pieces.append)
    inputs, settings = script.calls[0]
    assert out.text == "Title\n\n第一段 𠀀 end" == "".join(pieces)
    assert all("\ufffd" not in piece for piece in pieces)  # the 4-byte character arrives whole
    assert (settings.max_new_tokens, settings.do_sample, settings.top_p, settings.top_k, settings.temperature,
            settings.repetition_penalty) == (4096, True, 0.8, 40, 1.0, 1.005)
    assert set(settings.eos_token_ids) == {stops.eos, stops.stop_word, stops.im_end}
    assert inputs.penalty_prefix == [tokenizer.bos_token_id] and inputs.im_mask is None
    assert out.new_tokens == len(body) + 1


@pytest.mark.parametrize("stop", ["eos", "stop_word"])
def test_article_ends_before_either_stop(model, tokenizer, scripted, stop):
    scripted(ids_of(tokenizer, "abc") + [getattr(stop_ids(tokenizer), stop)])
    assert steps.write_article(model, tokenizer, "Write.").text == "abc"


def test_location_step_text_path(model, tokenizer, scripted):
    stops = stop_ids(tokenizer)
    # no stop at [UNUSED_TOKEN_145] here: the demo's non-streamed calls run on to </s>
    script = scripted(ids_of(tokenizer, f"<Seg1>, <Seg3>{U145}\n<Seg5>") + [stops.eos])
    found, out = steps.locate_images(model, tokenizer, ["a", "b", "c", "d", "e", "f"], "2")
    inputs, settings = script.calls[0]
    assert found.places == [1, 3, 5]
    assert found.answer == "适合插入图像的行是<Seg1>, <Seg3>\n<Seg5>"  # markers removed, </s> skipped
    assert settings.max_new_tokens == 200 and settings.do_sample and settings.top_k == 40
    assert set(settings.eos_token_ids) == {stops.eos, stops.stop_word}
    assert inputs.penalty_prefix == inputs.layout_ids  # input_ids path: the penalty sees the prompt
    assert inputs.layout_ids[0] == tokenizer.bos_token_id and out.prompt.endswith("适合插入图像的行是")


def test_location_step_with_uploads(model, tokenizer, scripted, feats):
    script = scripted(ids_of(tokenizer, "<Seg0>") + [tokenizer.eos_token_id])
    found, out = steps.locate_images(model, tokenizer, ["a", "b"], "2", feats[:2])
    inputs, _ = script.calls[0]
    assert found.places == [0] and out.prompt.startswith(f"{U146}user\n<image> <image> 给定文章")
    assert inputs.penalty_prefix == [tokenizer.bos_token_id]
    assert inputs.im_mask.astype("int64").sum().item() == 2 * feats.shape[1]


def test_caption_step_feeds_back_earlier_captions(model, tokenizer, scripted):
    stops = stop_ids(tokenizer)
    script = scripted(ids_of(tokenizer, '湖边的日落" 以及') + [stops.stop_word], ids_of(tokenizer, "山") + [stops.eos])
    captions, outs = steps.caption_places(model, tokenizer, ["p0", "p1", "p2"], [2, 0])
    assert captions == ["湖边的日落", "山"]
    assert '现在<Seg2>后插入图像对应的标题是"湖边的日落"。给出适合在<Seg0>后插入' in outs[1].prompt
    for inputs, settings in script.calls:
        assert inputs.penalty_prefix == inputs.layout_ids and settings.max_new_tokens == 200
        assert set(settings.eos_token_ids) == {stops.eos, stops.stop_word}


def test_selection_reads_past_the_first_new_token(model, tokenizer, scripted, feats):
    colon, letter_c = tokenizer.convert_tokens_to_ids(":"), tokenizer.convert_tokens_to_ids("▁C")
    script = scripted([colon, letter_c, tokenizer.eos_token_id])
    picked = steps.choose_candidate(model, tokenizer, ["P0\n", "P1\n"], feats[:1], feats)
    inputs, settings = script.calls[0]
    assert (picked.index, picked.fell_back) == (2, False)
    assert settings.max_new_tokens == 10 and settings.eos_token_ids == (tokenizer.eos_token_id,)
    assert inputs.penalty_prefix == [tokenizer.bos_token_id]
    assert inputs.im_mask.astype("int64").sum().item() == 4 * feats.shape[1]  # 1 chosen + 3 candidates


@pytest.mark.parametrize("answer", [["▁C"], ["▁E", ":"], []])
def test_selection_falls_back_to_a(model, tokenizer, scripted, feats, answer):
    # ['▁C']: the letter came first, so [2:] drops it (the demo's quirk) and reads '</s>'
    scripted([tokenizer.convert_tokens_to_ids(t) for t in answer] + [tokenizer.eos_token_id])
    picked = steps.choose_candidate(model, tokenizer, ["P0\n"], None, feats)
    assert (picked.index, picked.fell_back) == (0, True) and picked.reason


def test_edit_step_budget(model, tokenizer, scripted):
    script = scripted(ids_of(tokenizer, "新段落") + [tokenizer.eos_token_id])
    out = steps.edit_paragraph(model, tokenizer, "rewrite", "旧段落", "素材")
    assert out.text == "新段落"
    assert script.calls[0][1].max_new_tokens == 500 - out.prompt_tokens - 1
    with pytest.raises(ValueError, match="edit budget"):
        steps.edit_paragraph(model, tokenizer, "abbreviate", "很长的段落 " * 300)


def test_seeded_restores_the_callers_random_state():
    paddle.seed(7)
    expected = paddle.rand([3]).numpy()
    paddle.seed(7)
    with decoding.seeded(123):
        inner = paddle.rand([3]).numpy()
    with decoding.seeded(123):
        assert np.array_equal(paddle.rand([3]).numpy(), inner)
    assert np.array_equal(paddle.rand([3]).numpy(), expected)
