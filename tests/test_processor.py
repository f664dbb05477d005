"""Prompt building and training samples: exact golden ids, masks and labels."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import (
    DEFAULT_META_INSTRUCTION,
    IMAGE_SLOT,
    InternLMXComposer2Processor,
    build_chat_prompt,
    build_training_text,
    mask_human_targets,
)


@pytest.fixture(scope="module")
def processor(tiny_dir, tiny_config):
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    return InternLMXComposer2Processor.from_config(tokenizer, tiny_config)


def _pairs(conversations):
    values = [c["value"] for c in conversations]
    return list(zip(values[0::2], values[1::2]))


def test_chat_prompt_string_and_parts(golden_json, processor):
    chat = golden_json["chat"]
    assert DEFAULT_META_INSTRUCTION == chat["meta_instruction"]
    prompt = build_chat_prompt(chat["query"])
    assert prompt == chat["prompt_string"]
    assert prompt.split("<ImageHere>") == chat["parts"]
    assert [processor._encode(p, bos=True) for p in chat["parts"]] == chat["part_input_ids"]


def test_chat_layout_and_im_mask(golden_json, golden, processor):
    layout = processor.chat_layout(golden_json["chat"]["query"], num_images=1)
    assert layout.ids == golden["chat_layout_ids"].tolist()
    assert layout.im_mask == golden["chat_im_mask"].astype(int).tolist()
    assert layout.ids.count(IMAGE_SLOT) == 256


def test_text_only_prompt_starts_with_two_bos(golden_json, processor):
    case = golden_json["generate_text_only"]
    layout = processor.chat_layout(case["query"])
    assert layout.ids == case["prompt_input_ids"]
    assert layout.ids[:2] == [1, 1] and not any(layout.im_mask)


def test_image_without_tag_goes_after_the_prompt(processor):
    layout = processor.chat_layout("Describe it.", num_images=1)
    assert layout.im_mask[-256:] == [1] * 256 and layout.im_mask[-257] == 0


def test_multi_turn_prompt_is_the_official_template(processor):
    history = [("<ImageHere>What is it?", "A cat."), ("Colour?", "Black.")]
    prompt = build_chat_prompt("And its name?", history, meta_instruction="")
    assert prompt == (
        "[UNUSED_TOKEN_146]user\n<ImageHere>What is it?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nA cat."
        "[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nColour?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
        "Black.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\nAnd its name?[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]assistant\n"
    )
    layout = processor.chat_layout("And its name?", history, num_images=1)  # the history's tag takes the image
    assert sum(layout.im_mask) == 256


def test_multi_image_chat_layout(processor):
    layout = processor.chat_layout("<ImageHere><ImageHere>Compare.", num_images=2)
    assert sum(layout.im_mask) == 512


@pytest.mark.parametrize("query,num_images", [("<ImageHere>a", 0), ("<ImageHere>a", 2), ("a", 2),
                                              ("<ImageHere><ImageHere>a", 1)])
def test_image_count_mismatch_is_a_clear_error(processor, query, num_images):
    with pytest.raises(ValueError, match="ImageHere"):
        processor.chat_layout(query, num_images=num_images)


def test_training_sample_two_images(golden_json, golden, processor):
    train = golden_json["train"]
    conversation = _pairs(train["conversations"])
    assert build_training_text(conversation) == train["text_input"]
    layout = processor.training_layout(conversation, num_images=2)
    assert layout.labels == golden["train_labels"].tolist()
    assert layout.im_mask == golden["train_im_mask"].astype(int).tolist()
    assert not layout.truncated and layout.num_supervised > 0


def test_training_sample_text_only(golden_json, golden, processor):
    layout = processor.training_layout(_pairs(golden_json["train_text_only"]["conversations"]), num_images=0)
    assert layout.ids == golden["train_text_input_ids"].tolist()
    assert layout.labels == golden["train_text_labels"].tolist()


def test_training_embeds_match_golden(golden_json, golden, processor, tiny_model, tiny_dir):
    layout = processor.training_layout(_pairs(golden_json["train"]["conversations"]), num_images=2)
    pixels = paddle.to_tensor(processor.pixel_values([str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png")]))
    with paddle.no_grad():
        embeds = tiny_model.embed_interleaved(paddle.to_tensor([layout.ids]), paddle.to_tensor([layout.im_mask]), pixels)
    np.testing.assert_allclose(embeds[0].numpy(), golden["train_inputs_embeds"], atol=1e-4, rtol=0)


def test_chat_embeds_match_golden(golden_json, golden, tiny_model, tiny_dir):
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    inputs, im_mask = tiny_model.interleav_wrap_chat(tokenizer, golden_json["chat"]["query"],
                                                     str(tiny_dir / "img1.png"), [], DEFAULT_META_INSTRUCTION)
    np.testing.assert_allclose(inputs["inputs_embeds"][0].numpy(), golden["chat_inputs_embeds"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(im_mask[0].numpy(), golden["chat_im_mask"])


def test_label_rule_on_a_cut_conversation():
    # user(…)im_end \n im_start assistant \n answer im_end  — then cut inside the next question
    ids = [1, 5, 9, 92542, 7, 92543, 8, 7, 40, 41, 92542, 7, 92543, 50]
    labels = mask_human_targets(ids, im_end_id=92542, eos_id=2)
    assert labels[:9] == [-100] * 9
    assert labels[9:11] == [41, 92542]  # the answer's tail and its closing im_end are learned
    # official quirk: a cut sequence masks from last_eoa + 1, so the "\n" right after the
    # last answer stays learned; the unfinished question after it is not
    assert labels[11:] == [7, -100, -100]


def test_truncation_never_splits_an_image(processor):
    conversation = [("<ImageHere>" + "word " * 10, "answer " * 5)] * 1
    small = InternLMXComposer2Processor(processor.tokenizer, processor.image_processor, 256, max_length=100)
    layout = small.training_layout(conversation, num_images=1)
    assert layout.truncated and sum(layout.im_mask) in (0, 256)
    assert layout.num_images == 0 and layout.num_supervised == 0
    assert any("dropped" in note for note in layout.notes)
