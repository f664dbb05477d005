"""Beam search (``generate(num_beams=K)``, ``chat(..., num_beams=K)``) gives exactly the ids of
transformers 4.33.2's ``beam_search`` driving this model (recorded by ``scripts/beam_reference.py``
in ``tests/data/beam_search_reference.json``): one and two rows, left padding, the text and the
image path, early end-of-sequence hypotheses, a length penalty, 2 to 5 beams."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from beam_cases import prompt_inputs
from conftest import REPO_ROOT
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.beam_search import BeamHypotheses

REFERENCE = json.loads((REPO_ROOT / "tests" / "data" / "beam_search_reference.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["name"])
def test_beam_search_equals_transformers(tiny_model, tokenizer, tiny_dir, case):
    embeds, im_mask, mask, ids = prompt_inputs(tiny_model, tokenizer, case["prompts"], str(tiny_dir))
    common = dict(num_beams=case["num_beams"], do_sample=False, max_new_tokens=case["max_new_tokens"],
                  repetition_penalty=case["repetition_penalty"], length_penalty=case["length_penalty"],
                  eos_token_id=case["eos_token_id"], pad_token_id=tokenizer.pad_token_id,
                  attention_mask=paddle.to_tensor(mask), early_stopping=case.get("early_stopping", False))
    if ids is not None:
        out = tiny_model.generate(input_ids=paddle.to_tensor(ids), **common)
    else:
        out = tiny_model.generate(inputs_embeds=paddle.to_tensor(embeds), im_mask=paddle.to_tensor(im_mask), **common)
    assert out.numpy().tolist() == case["expected"]


def test_chat_with_beams_equals_generate(tiny_model, tokenizer, tiny_dir):
    """``chat(num_beams=K)`` (how the official chat and the 4KHD README use it) answers with the
    best beam of ``generate``; beams and sampling together, or with a streamer, are refused."""
    image = str(tiny_dir / "img1.png")
    query = "<ImageHere>Describe it."
    response, _ = tiny_model.chat(tokenizer, query, image=image, do_sample=False, num_beams=3, max_new_tokens=12)
    inputs, im_mask = tiny_model.interleav_wrap_chat(tokenizer, query, image, [])
    out = tiny_model.generate(**inputs, im_mask=im_mask, num_beams=3, do_sample=False, max_new_tokens=12,
                              repetition_penalty=1.005, eos_token_id=[tokenizer.eos_token_id, tokenizer.im_end_id])
    assert response == tokenizer.decode(out[0].tolist(), skip_special_tokens=True).split("[UNUSED_TOKEN_145]")[0]
    greedy, _ = tiny_model.chat(tokenizer, query, image=image, do_sample=False, max_new_tokens=12)
    assert response != greedy  # the search found another answer on this fixture: the beams were really used
    with pytest.raises(ValueError, match="beam sampling"):
        tiny_model.chat(tokenizer, query, image=image, num_beams=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="streamer"):
        tiny_model.generate(**inputs, im_mask=im_mask, num_beams=2, max_new_tokens=2, streamer=object())


def test_hypotheses_keep_the_best_by_length_normalised_score():
    hyps = BeamHypotheses(num_beams=2, length_penalty=1.0, early_stopping=False, max_length=10)
    hyps.add([1, 5, 6], -3.0)  # -1.0
    hyps.add([1, 5], -1.0)  # -0.5
    hyps.add([1, 7, 8, 9], -8.0)  # -2.0: worse than both, not kept
    assert sorted(s for s, _ in hyps.beams) == [-1.0, -0.5] and hyps.best() == [1, 5]
    assert not hyps.is_done(best_sum_logprobs=-1.0, cur_len=4)  # a live beam could still reach -0.25
    assert hyps.is_done(best_sum_logprobs=-8.0, cur_len=4)  # -2.0 cannot beat the worst kept (-1.0)
    np.testing.assert_allclose(hyps.worst_score, -1.0)
    never = BeamHypotheses(num_beams=2, length_penalty=1.0, early_stopping="never", max_length=10)
    never.beams, never.worst_score = list(hyps.beams), hyps.worst_score
    assert not never.is_done(best_sum_logprobs=-8.0, cur_len=4)  # -8/10 could still beat -1.0
    with pytest.raises(ValueError, match="early_stopping"):
        from paddlemix.models.internlm_xcomposer2.beam_search import BeamSettings

        BeamSettings(num_beams=2, max_length=5, eos_token_ids=(2,), pad_token_id=2, early_stopping="sometimes").validate()
