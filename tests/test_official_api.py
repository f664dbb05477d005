"""The official PyTorch examples, adapted with only the substitutions the README's migration table
lists (imports, ``torch.*`` → ``paddle.*``, no ``.cuda()``/``.half()``/autocast on this CPU), give
exactly what our own ``chat`` / ``batch_chat`` give on the fixture (greedy ids identical).

Each ``official_*`` function below follows one official script or snippet step by step (written
from reading them: ``InternLM-XComposer-2.0/examples/example_chat.py``, ``examples/batch_chat.py``,
the finetune README's several-images recipe, the README quickstart and 4KHD snippets)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest
from PIL import Image

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.processor import DEFAULT_META_INSTRUCTION

MAX_NEW_TOKENS = 24  # the examples use 1024; the tiny model never stops, so the budget decides the length
# examples/batch_chat.py's module-level meta instruction: the default one with a trailing newline
BATCH_META_INSTRUCTION = DEFAULT_META_INSTRUCTION + "\n"


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    # AutoModel.from_pretrained('internlm/...', trust_remote_code=True).eval(); model.half().cuda()
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    # AutoTokenizer.from_pretrained('internlm/...', trust_remote_code=True)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_model_dir))
    return model, tokenizer


@pytest.fixture(scope="module")
def images(tiny_dir):
    return [str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png")]


# --- examples/example_chat.py ------------------------------------------------------------------
def official_example_chat(model, tokenizer, text, image_path, max_new_tokens):
    image = image_path
    with paddle.no_grad():  # with torch.cuda.amp.autocast(): with torch.no_grad():
        response, _ = model.chat(tokenizer, query=text, image=image, history=[], do_sample=False,
                                 max_new_tokens=max_new_tokens)
    return response


def test_example_chat_gives_the_official_golden_answer(loaded, tiny_dir, golden_json):
    """The example's one call, on the query and image the official implementation answered in
    the fixture (its text is that of the golden run: 16 new tokens)."""
    model, tokenizer = loaded
    case = golden_json["chat"]
    answer = official_example_chat(model, tokenizer, case["query"], str(tiny_dir / "img1.png"), 16)
    assert answer == golden_json["generate"]["response"] and answer


# --- examples/batch_chat.py --------------------------------------------------------------------
def official_batch_chat(model, tokenizer, img_paths, questions):
    meta_instruction = BATCH_META_INSTRUCTION
    assert len(img_paths) == len(questions)
    images = []
    for p in img_paths:
        image = Image.open(p).convert('RGB')
        image = model.vis_processor(image).unsqueeze(0)  # .half().cuda()
        images.append(image)
    images = paddle.concat(images, axis=0)  # torch.cat(images, dim=0)
    with paddle.no_grad():
        images = model.encode_img(images)
        inputs_list, masks_list, max_len = [], [], 0
        for image, question in zip(images, questions):
            inputs, im_mask = model.interleav_wrap_chat(tokenizer, "<ImageHere>" + question, image.unsqueeze(0), [],
                                                        meta_instruction)
            inputs_list.append(inputs)
            masks_list.append(im_mask)
            max_len = max(max_len, im_mask.shape[1])
        pad_embed = model.model.tok_embeddings(paddle.to_tensor(tokenizer.pad_token_id)).unsqueeze(0).unsqueeze(0)
        batch_inputs, batch_masks, batch_atten_masks = [], [], []
        for inputs, im_mask in zip(inputs_list, masks_list):
            if im_mask.shape[1] < max_len:
                pad_length = max_len - im_mask.shape[1]
                pad_embeds = pad_embed.tile([1, pad_length, 1])  # pad_embed.repeat(1, pad_length, 1)
                pad_masks = paddle.to_tensor([0] * pad_length).unsqueeze(0)
                inputs = paddle.concat([pad_embeds, inputs['inputs_embeds']], axis=1)
                atten_masks = paddle.concat([pad_masks, paddle.ones_like(im_mask).astype('int64')], axis=1)
                im_mask = paddle.concat([pad_masks.astype('bool'), im_mask], axis=1)
            else:
                inputs = inputs['inputs_embeds']
                atten_masks = paddle.ones_like(im_mask)
            batch_inputs.append(inputs)
            batch_masks.append(im_mask)
            batch_atten_masks.append(atten_masks)
        batch_inputs = {'inputs_embeds': paddle.concat(batch_inputs, axis=0)}
        batch_masks = paddle.concat(batch_masks, axis=0).astype('bool')
        batch_atten_masks = paddle.concat([m.astype('int64') for m in batch_atten_masks], axis=0).astype('bool')
        eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(['[UNUSED_TOKEN_145]'])[0]]
        outputs = model.generate(**batch_inputs, streamer=None, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 temperature=1.0, top_p=0.8, eos_token_id=eos_token_id, repetition_penalty=1.005,
                                 im_mask=batch_masks, attention_mask=batch_atten_masks)
    answers = []
    for i in range(len(outputs)):
        output_token = outputs[i]
        output_text = tokenizer.decode(output_token.cpu().tolist(), skip_special_tokens=True)
        answers.append(output_text.split('[UNUSED_TOKEN_145]')[0])
    return answers, outputs


def test_batch_chat_example_equals_our_batch_chat_and_chat(loaded, images):
    """Two rows of different lengths (left padding with the pad embedding, im_mask, attention
    mask): the same answers as our ``batch_chat`` and as ``chat`` row by row."""
    model, tokenizer = loaded
    questions = ["Please describe this image in detail.", "What is the text in this images? Answer briefly."]
    lengths = {model.interleav_wrap_chat(tokenizer, "<ImageHere>" + q, image, [])[1].shape[1]
               for q, image in zip(questions, images)}
    assert len(lengths) == 2  # rows of different lengths: the left padding is exercised
    answers, outputs = official_batch_chat(model, tokenizer, images, questions)
    ours = model.batch_chat(tokenizer, ["<ImageHere>" + q for q in questions], images=images, do_sample=False,
                            max_new_tokens=MAX_NEW_TOKENS, meta_instruction=BATCH_META_INSTRUCTION)
    assert answers == [response for response, _ in ours]
    for row, (image, question) in enumerate(zip(images, questions)):
        ids, _ = model.generate_ids(tokenizer, "<ImageHere>" + question, image=image, do_sample=False,
                                    max_new_tokens=MAX_NEW_TOKENS, meta_instruction=BATCH_META_INSTRUCTION)
        assert outputs[row].numpy().tolist()[: len(ids)] == ids  # the official BOS first, then the greedy ids


# --- finetune/README.md: several images ------------------------------------------------------------
def official_two_images(model, tokenizer, image_paths):
    image1 = model.encode_img(image_paths[0])
    image2 = model.encode_img(image_paths[1])
    image = paddle.concat((image1, image2), axis=0)  # torch.cat(..., dim=0)
    query = "First picture:<ImageHere>, second picture:<ImageHere>. Describe the subject of these two pictures?"
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, query, image, history=[])
    eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(['[UNUSED_TOKEN_145]'])[0]]
    outputs = model.generate(**inputs, im_mask=im_mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=eos_token_id, repetition_penalty=1.005)
    return tokenizer.decode(outputs[0].tolist(), skip_special_tokens=True).split('[UNUSED_TOKEN_145]')[0]


def test_several_images_recipe_equals_chat_with_two_images(loaded, images):
    model, tokenizer = loaded
    query = "First picture:<ImageHere>, second picture:<ImageHere>. Describe the subject of these two pictures?"
    ours, _ = model.chat(tokenizer, query, image=images, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert official_two_images(model, tokenizer, images) == ours


def test_interleav_wrap_chat_takes_encoded_embeddings_as_officially(loaded, tiny_dir, golden, golden_json):
    """A bare ``[n, P, H]`` tensor, as ``encode_img`` returns it, is the official argument (it was
    taken for one pixel image): the embeddings and im_mask of the official golden chat prompt."""
    model, tokenizer = loaded
    embeds = model.encode_img(str(tiny_dir / "img1.png"))
    assert embeds.shape == [1, model.config.num_image_tokens, model.config.hidden_size]
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, golden_json["chat"]["query"], embeds, [],
                                                DEFAULT_META_INSTRUCTION)
    np.testing.assert_allclose(inputs["inputs_embeds"][0].numpy(), golden["chat_inputs_embeds"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(im_mask[0].numpy(), golden["chat_im_mask"])
    assert im_mask.dtype == paddle.bool


# --- README: quickstart snippets --------------------------------------------------------------------
def test_readme_snippets_multi_turn_and_stream(loaded, images):
    model, tokenizer = loaded
    query = '<ImageHere>Please describe this image in detail.'
    response, his = model.chat(tokenizer, query=query, image=images[0], history=[], do_sample=False,
                               max_new_tokens=MAX_NEW_TOKENS)
    follow, his2 = model.chat(tokenizer, query="And the colours?", image=images[0], history=his, do_sample=False,
                              max_new_tokens=MAX_NEW_TOKENS)
    assert his2 == [(query, response), ("And the colours?", follow)]
    # the official stream_chat: (tokenizer, query, history, max_new_tokens, do_sample, temperature, top_p, **kw)
    items = list(model.stream_chat(tokenizer, query, [], MAX_NEW_TOKENS, False, image=images[0]))
    assert items[0] == ("", [(query, "")]) and items[-1] == (response, [(query, response)])


def test_text_only_generate_from_build_inputs_equals_chat(loaded):
    model, tokenizer = loaded
    query = "Hello, who are you?"
    inputs = model.build_inputs(tokenizer, query, [], DEFAULT_META_INSTRUCTION)
    eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(['[UNUSED_TOKEN_145]'])[0]]
    outputs = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos_token_id,
                             repetition_penalty=1.005)
    new = outputs[0].tolist()[len(inputs["input_ids"][0]):]
    response = tokenizer.decode(new, skip_special_tokens=True).split('[UNUSED_TOKEN_145]')[0]
    ours, _ = model.chat(tokenizer, query, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert response == ours
    ids, _ = model.generate_ids(tokenizer, query, do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    assert outputs[0].tolist() == ids


def test_generate_pads_finished_rows_and_streams(loaded, images):
    model, tokenizer = loaded
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, "<ImageHere>Hi", model.encode_img(images[0]), [])

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.numpy().tolist())

        def end(self):
            self.ended = True

    streamer = Collect()
    greedy = model.generate(**inputs, im_mask=im_mask, max_new_tokens=6, do_sample=False, streamer=streamer)
    assert greedy.dtype == paddle.int64 and greedy.shape == [1, 7]
    assert streamer.puts[0] == [[tokenizer.bos_token_id]] and streamer.ended
    assert [p[0] for p in streamer.puts[1:]] == greedy[0, 1:].tolist()
    first = int(greedy[0, 1])  # make that first token the end of sequence: the row stops there
    stopped = model.generate(**inputs, im_mask=im_mask, max_new_tokens=6, do_sample=False, eos_token_id=first)
    assert stopped.tolist() == [[tokenizer.bos_token_id, first]]
    with pytest.raises(TypeError, match="unsupported arguments"):
        model.generate(**inputs, im_mask=im_mask, max_new_tokens=2, stopping_criteria=[])
    # as transformers: a max_length the prompt already reaches still gives one token (with a warning)
    assert model.generate(**inputs, im_mask=im_mask, max_length=1).tolist() == greedy[:, :2].tolist()
    assert model.generate(**inputs, im_mask=im_mask, max_new_tokens=0).tolist() == greedy[:, :2].tolist()


def test_sampling_with_a_seed_is_reproducible_and_matches_chat(loaded, images):
    model, tokenizer = loaded
    inputs, im_mask = model.interleav_wrap_chat(tokenizer, "<ImageHere>Hi", images[0], [])
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.8, repetition_penalty=1.005,
                  eos_token_id=[tokenizer.eos_token_id, tokenizer.im_end_id])
    a = model.generate(**inputs, im_mask=im_mask, seed=3, **kwargs)
    b = model.generate(**inputs, im_mask=im_mask, seed=3, **kwargs)
    assert a.tolist() == b.tolist()
    ids, _ = model.generate_ids(tokenizer, "<ImageHere>Hi", image=images[0], seed=3, max_new_tokens=8)
    assert a[0].tolist()[: len(ids)] == ids


def test_official_names_exist(loaded, images):
    model, tokenizer = loaded
    assert model.max_length == model.config.max_length and model.tokenizer is None
    pixels = model.vis_processor(Image.open(images[0]).convert("RGB"))
    assert pixels.shape == [3, model.config.img_size, model.config.img_size] and pixels.dtype == paddle.float32
    embeds, atts, targets = model.img2emb(pixels.unsqueeze(0))
    assert atts.tolist() == [[1] * embeds.shape[1]] and targets.tolist() == [[-100] * embeds.shape[1]]
    assert model.encode_img(None) is None
    model.vit.resize_pos()  # the composition demo calls it; nothing to do
    with pytest.raises(ValueError, match="model.tokenizer"):
        model.encode_text("hi")
    model.tokenizer = tokenizer
    try:
        text = model.encode_text("hi", add_special_tokens=True)
        ids = tokenizer("hi")["input_ids"]
        np.testing.assert_array_equal(text.numpy(), model.model.embed(paddle.to_tensor([ids])).numpy())
    finally:
        model.tokenizer = None
