"""Chat and generation against the official greedy outputs; sampling semantics; batching."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.generation import (
    GenerationSettings,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    choose_greedy_on_host,
    process_scores,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(tiny_dir, tiny_config):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)


def test_greedy_image_chat_matches_official(model, tokenizer, tiny_dir, golden, golden_json, norm_kernels, row_gemms):
    query, image = golden_json["chat"]["query"], str(tiny_dir / "img1.png")
    ids, scores = model.generate_ids(tokenizer, query, image=image, do_sample=False, max_new_tokens=16,
                                     output_scores=True)
    assert ids == golden["gen_output_ids"].tolist()  # includes the official leading BOS
    scores = np.stack([s.numpy() for s in scores])
    idx = golden["gen_step_scores_topk_indices"]
    np.testing.assert_allclose(np.take_along_axis(scores, idx, -1), golden["gen_step_scores_topk_values"],
                               atol=1e-4, rtol=0)
    np.testing.assert_array_equal(scores.argmax(-1), idx[:, 0])
    response, history = model.chat(tokenizer, query, image=image, do_sample=False, max_new_tokens=16)
    assert response == golden_json["generate"]["response"]
    assert history == [(query, response)]


def test_greedy_text_chat_matches_official(model, tokenizer, golden, golden_json, norm_kernels, row_gemms):
    case = golden_json["generate_text_only"]
    ids, _ = model.generate_ids(tokenizer, case["query"], do_sample=False, max_new_tokens=16)
    assert ids == golden["gen_text_output_ids"].tolist()
    response, _ = model.chat(tokenizer, case["query"], do_sample=False, max_new_tokens=16)
    assert response == case["response"]


def test_stream_chat_ends_with_the_chat_response(model, tokenizer, tiny_dir, golden_json):
    query, image = golden_json["chat"]["query"], str(tiny_dir / "img1.png")
    items = list(model.stream_chat(tokenizer, query, image=image, do_sample=False, max_new_tokens=16))
    texts = [t for t, _ in items]
    assert texts[-1] == golden_json["generate"]["response"]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), "the text only grows"
    assert all("\ufffd" not in t for t in texts), "never half a character"
    assert items[-1][1] == [(query, texts[-1])]


def test_streamer_protocol_receives_the_start_then_every_token(model, tokenizer, tiny_dir):
    """As transformers' generate feeds a streamer: first the ids generation starts from (the text
    prompt, or the BOS seed of an image prompt), then each new token, then ``end()``."""
    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.numpy().tolist())

        def end(self):
            self.ended = True

    for image in (None, str(tiny_dir / "img1.png")):
        query = "Hi" if image is None else "<ImageHere>Hi"
        streamer = Collect()
        _, _ = model.chat(tokenizer, query, image=image, do_sample=False, max_new_tokens=5, streamer=streamer)
        ids, _ = model.generate_ids(tokenizer, query, image=image, do_sample=False, max_new_tokens=5)
        assert streamer.ended and len(streamer.puts) == 6
        assert streamer.puts[0] == [ids[:-5]] and [p[0] for p in streamer.puts[1:]] == ids[-5:]
        assert (streamer.puts[0] == [[tokenizer.bos_token_id]]) == (image is not None)


def test_second_turn_uses_the_history(model, tokenizer, tiny_dir):
    image = str(tiny_dir / "img1.png")
    first, history = model.chat(tokenizer, "<ImageHere>What is it?", image=image, do_sample=False, max_new_tokens=4)
    second, history2 = model.chat(tokenizer, "And the colour?", image=image, history=history, do_sample=False,
                                  max_new_tokens=4)
    assert history2 == [("<ImageHere>What is it?", first), ("And the colour?", second)]
    with pytest.raises(ValueError, match="ImageHere"):  # the history's tag needs its image again
        model.chat(tokenizer, "And the colour?", history=history, max_new_tokens=4)


def test_batch_chat_equals_one_by_one(model, tokenizer, tiny_dir, golden_json):
    queries = [golden_json["chat"]["query"], "Tell me a joke about cats.", "<ImageHere>What is this?", "Hi"]
    images = [str(tiny_dir / "img1.png"), None, str(tiny_dir / "img2.png"), None]
    batched = model.batch_chat(tokenizer, queries, images, do_sample=False, max_new_tokens=12)
    for query, image, (response, history) in zip(queries, images, batched):
        single, _ = model.chat(tokenizer, query, image=image, do_sample=False, max_new_tokens=12)
        assert response == single
        assert history == [(query, single)]


def test_rows_prefilled_alone_start_exactly_as_chat(model, tokenizer, tiny_dir, golden_json):
    """``generate_rows`` (the server's and ``batch_chat``'s path): each row's first scores are
    bit-identical to its prompt generated alone, and the greedy tokens equal, for prompts of
    different lengths, with and without images."""
    from paddlemix.models.internlm_xcomposer2.generation import generate_rows, generate_tokens, seen_ids
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION

    prompts = [(golden_json["chat"]["query"], [str(tiny_dir / "img1.png")]), ("Hi", []),
               ("<ImageHere>What is this?", [str(tiny_dir / "img2.png")])]
    rows = [model._chat_inputs(tokenizer, q, images, [], DEFAULT_META_INSTRUCTION) for q, images in prompts]
    assert len({embeds.shape[1] for _, embeds, _ in rows}) == 3
    prefixes = [model._official_prefix(tokenizer, layout) for layout, _, _ in rows]
    settings = model._settings(tokenizer, max_new_tokens=8, do_sample=False)
    together = list(generate_rows(model, [(e, m) for _, e, m in rows], settings, seen_ids(prefixes),
                                  output_scores=True))
    eos = set(settings.eos_token_ids)
    for i, ((_, embeds, im_mask), prefix) in enumerate(zip(rows, prefixes)):
        alone = list(generate_tokens(model, embeds, settings, seen_ids([prefix]), im_mask=im_mask,
                                     output_scores=True))
        np.testing.assert_array_equal(together[0][1].numpy()[i], alone[0][1].numpy()[0])
        ids = [int(step[0][0]) for step in alone]
        assert [int(step[0][i]) for step in together][: len(ids)] == ids
        assert ids[-1] in eos or len(ids) == settings.max_new_tokens


def test_packed_weights_decode_each_row_of_a_batch_as_alone(model, tokenizer, tiny_dir, golden_json):
    """With the decode weights packed (the serving engine's CPU batches: every product of a step
    reads each weight once for all rows), each row of ``generate_rows`` gets the greedy tokens of
    its prompt alone, every step's scores within float32 noise, and the first step's exactly."""
    from paddlemix.models.internlm_xcomposer2.generation import generate_rows, generate_tokens, seen_ids
    from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION
    from paddlemix.models.internlm_xcomposer2.row_gemm import unpack_weights

    prompts = [(golden_json["chat"]["query"], [str(tiny_dir / "img1.png")]), ("Hi", []), ("Tell me a story", [])]
    rows = [model._chat_inputs(tokenizer, q, images, [], DEFAULT_META_INSTRUCTION) for q, images in prompts]
    prefixes = [model._official_prefix(tokenizer, layout) for layout, _, _ in rows]
    settings = model._settings(tokenizer, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    try:
        assert model.pack_for_batched_decoding(4, min_bytes=0) > 0
        together = list(generate_rows(model, [(e, m) for _, e, m in rows], settings, seen_ids(prefixes),
                                      output_scores=True))
        for i, ((_, embeds, im_mask), prefix) in enumerate(zip(rows, prefixes)):
            alone = list(generate_tokens(model, embeds, settings, seen_ids([prefix]), im_mask=im_mask,
                                         output_scores=True))
            ids = [int(step[0][0]) for step in alone]
            assert [int(step[0][i]) for step in together][: len(ids)] == ids
            np.testing.assert_array_equal(together[0][1].numpy()[i], alone[0][1].numpy()[0])
            for (_, batch_scores), (_, own) in zip(together, alone):
                np.testing.assert_allclose(batch_scores.numpy()[i], own.numpy()[0], atol=1e-5, rtol=0)
    finally:
        unpack_weights()


def test_multi_image_chat(model, tokenizer, tiny_dir):
    images = [str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png")]
    a, _ = model.chat(tokenizer, "<ImageHere><ImageHere>Compare.", image=images, do_sample=False, max_new_tokens=4)
    b, _ = model.chat(tokenizer, "<ImageHere><ImageHere>Compare.", image=images[::-1], do_sample=False,
                      max_new_tokens=4)
    assert isinstance(a, str) and a != b  # the order of the images matters


def test_seeded_sampling_is_reproducible(model, tokenizer):
    runs = [model.chat(tokenizer, "Hi", seed=7, max_new_tokens=8)[0] for _ in range(2)]
    assert runs[0] == runs[1]
    others = {model.chat(tokenizer, "Hi", seed=s, max_new_tokens=8)[0] for s in range(8, 12)}
    assert len(others | {runs[0]}) > 1


def test_repetition_penalty_divides_positive_multiplies_negative():
    scores = paddle.to_tensor([[2.0, -2.0, 3.0]])
    seen = paddle.to_tensor([[0, 1, 0]], dtype="int64")  # a repeated id is penalised once
    np.testing.assert_allclose(apply_repetition_penalty(scores, seen, 2.0).numpy(), [[1.0, -4.0, 3.0]])


@pytest.mark.parametrize("penalty", [1.005, 1.3, 1.0])
def test_host_greedy_choice_equals_the_device_penalty_bit_for_bit(penalty):
    """CPU greedy generation penalises in numpy: same float32 values, same choice."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, [3, 1000]).astype(np.float32)
    seen = rng.integers(0, 1000, [3, 40])
    seen[:, 1] = seen[:, 0]  # repeated ids
    seen[:, 2] = logits.argmax(-1)  # the best score is penalised: the choice may move
    device = apply_repetition_penalty(paddle.to_tensor(logits), paddle.to_tensor(seen), penalty).numpy()
    host = logits.copy()
    chosen = choose_greedy_on_host(host, seen, penalty)
    np.testing.assert_array_equal(host, device)
    np.testing.assert_array_equal(chosen, device.argmax(-1))
    if penalty == 1.3:
        assert (chosen != logits.argmax(-1)).any()  # the case above really exercised the penalty


def test_top_k_and_top_p_filtering():
    scores = paddle.to_tensor([[4.0, 3.0, 2.0, 1.0]])
    assert np.isinf(apply_top_k(scores, 2).numpy()[0, 2:]).all() and np.isfinite(apply_top_k(scores, 2).numpy()[0, :2]).all()
    probs = np.exp([4.0, 3.0, 2.0, 1.0]) / np.exp([4.0, 3.0, 2.0, 1.0]).sum()  # 0.64, 0.24, 0.09, 0.03
    kept = np.isfinite(apply_top_p(scores, 0.8).numpy()[0])
    assert kept.tolist() == [True, True, False, False] and probs[0] < 0.8 <= probs[:2].sum()
    assert np.isfinite(apply_top_p(scores, 0.5).numpy()[0]).tolist() == [True, False, False, False]


def test_processed_scores_follow_temperature_then_top_k_then_top_p():
    logits = paddle.to_tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    seen = paddle.zeros([1, 0], dtype="int64")
    hot = process_scores(logits, seen, GenerationSettings(temperature=2.0, top_k=0, top_p=1.0)).numpy()
    np.testing.assert_allclose(hot, logits.numpy() / 2.0)
    default = process_scores(logits, seen, GenerationSettings()).numpy()  # top_k None = official 50, top_p 0.8
    assert np.isfinite(default).sum() == 2
    greedy = process_scores(logits, seen, GenerationSettings(do_sample=False, repetition_penalty=1.0)).numpy()
    np.testing.assert_array_equal(greedy, logits.numpy())  # greedy: no warpers


@pytest.mark.parametrize("kwargs,match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_generation_arguments(model, tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.chat(tokenizer, "Hi", **kwargs)


def test_bad_chat_inputs(model, tokenizer, tiny_dir):
    with pytest.raises(ValueError, match="empty"):
        model.chat(tokenizer, "  ")
    with pytest.raises(ValueError, match="history"):
        model.chat(tokenizer, "Hi", history=["not a pair"])
    with pytest.raises(ValueError, match="ImageHere"):
        model.chat(tokenizer, "<ImageHere><ImageHere>Hi", image=str(tiny_dir / "img1.png"))
