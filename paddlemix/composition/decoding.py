"""Prompt layouts and the token loop of the composition steps, laid out as the official demo lays them.

The demo has its own ``interleav_wrap`` (not the chat one): the prompt is split on ``<image>``,
each non-empty part is tokenized on its own and **only the first one gets a BOS**; image ``i``'s
embeddings go right after part ``i``; the result is cut to ``max_length``::

    [BOS] part 0 ids      image 0 (P rows)    part 1 ids (no BOS)   image 1 ...
    im_mask 0 ...         1 ... 1             0 ...

Two call paths differ in what the repetition penalty sees (transformers 4.33 ``generate``):
``input_ids`` (locations and captions without images) — the whole prompt; ``inputs_embeds``
(article, selection, edits, anything with images) — only the BOS ``generate`` starts its output with.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

import paddle

from paddlemix.models.internlm_xcomposer2.generation import GenerationSettings, generate_tokens, seen_ids
from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT

from .prompts import IMAGE_TAG, STOP_TOKEN, TEMPERATURE, TOP_K, TOP_P

logger = logging.getLogger(__name__)

__all__ = ["StopIds", "stop_ids", "step_settings", "PromptInputs", "prompt_layout", "prompt_inputs",
           "generate_ids", "seeded"]

@dataclass(frozen=True)
class StopIds:
    """The ids the demo stops on: ``</s>`` (generation_config), ``[UNUSED_TOKEN_0]`` (its stop
    word) and ``[UNUSED_TOKEN_145]`` (where its stream consumer breaks)."""

    eos: int
    stop_word: int
    im_end: int


def stop_ids(tokenizer: Any) -> StopIds:
    """From the tokenizer, never literals; a vocabulary without the demo's stop word is refused."""
    stop_word = tokenizer.convert_tokens_to_ids(STOP_TOKEN)
    if tokenizer.convert_ids_to_tokens(stop_word) != STOP_TOKEN:
        raise ValueError(f"the tokenizer has no {STOP_TOKEN} piece; use the InternLM-XComposer2 tokenizer")
    return StopIds(eos=tokenizer.eos_token_id, stop_word=stop_word, im_end=tokenizer.im_end_id)


def step_settings(model: Any, tokenizer: Any, max_new_tokens: int, do_sample: bool, repetition_penalty: float,
                  eos_token_ids: Sequence[int]) -> GenerationSettings:
    """The demo's decoding settings (top-p 0.8, top-k 40, temperature 1) with a step's budget and stops."""
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size} embeddings: use the tokenizer of this checkpoint")
    settings = GenerationSettings(max_new_tokens=int(max_new_tokens), do_sample=do_sample, temperature=TEMPERATURE,
                                  top_p=TOP_P, top_k=TOP_K, repetition_penalty=float(repetition_penalty),
                                  eos_token_ids=tuple(eos_token_ids), pad_token_id=tokenizer.pad_token_id)
    settings.validate()
    return settings


@dataclass
class PromptInputs:
    """One step's model input: ``embeds`` ``[1, T, H]``, ``im_mask`` ``[1, T]`` (None without
    images), the ids the repetition penalty starts from, and the layout's ids (image rows
    ``IMAGE_SLOT``) before any cut."""

    embeds: paddle.Tensor
    im_mask: Optional[paddle.Tensor]
    penalty_prefix: List[int]
    layout_ids: List[int]
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


def prompt_layout(tokenizer: Any, prompt: str, num_images: int, image_tokens: int) -> List[int]:
    """The demo's ``interleav_wrap`` as ids: parts split on ``<image>``, BOS on the first
    non-empty part only, ``image_tokens`` ``IMAGE_SLOT`` rows after part ``i`` for image ``i``."""
    parts = prompt.split(IMAGE_TAG)
    if len(parts) - 1 != num_images:
        raise ValueError(f"the prompt has {len(parts) - 1} {IMAGE_TAG} tags but {num_images} images were given")
    ids: List[int] = []
    need_bos = True
    for index, part in enumerate(parts):
        if part:
            ids += list(tokenizer(part, add_special_tokens=need_bos)["input_ids"])
            need_bos = False
        if index < num_images:
            ids += [IMAGE_SLOT] * image_tokens
    return ids


def prompt_inputs(model: Any, tokenizer: Any, prompt: str, image_embeds: Optional[paddle.Tensor] = None,
                  via_input_ids: bool = False) -> PromptInputs:
    """Embed ``prompt`` with ``image_embeds`` ``[n, P, H]`` at its ``<image>`` tags.

    ``via_input_ids``: the demo passes ``input_ids`` to ``generate`` (only possible without
    images), so the repetition penalty sees the whole prompt; otherwise only the BOS.
    """
    num_images = 0 if image_embeds is None else int(image_embeds.shape[0])
    if via_input_ids and num_images:
        raise ValueError("a prompt with images is always passed as embeddings")
    tokens = image_embeds.shape[1] if num_images else model.config.num_image_tokens
    layout = prompt_layout(tokenizer, prompt, num_images, int(tokens))
    ids = paddle.to_tensor([layout], dtype="int64")
    limit = model.config.max_length
    with paddle.no_grad():
        if not num_images:
            embeds, im_mask = model.model.embed(ids), None
        else:
            im_mask = ids == IMAGE_SLOT
            embeds = model.embed_interleaved(ids, im_mask, image_embeds=image_embeds)
    truncated = num_images > 0 and len(layout) > limit  # the demo cuts only its image path
    if truncated:
        logger.warning("a %d-token prompt was cut to max_length %d, as the official demo cuts it", len(layout), limit)
        embeds, im_mask = embeds[:, :limit], im_mask[:, :limit]
    prefix = layout if via_input_ids else [tokenizer.bos_token_id]
    return PromptInputs(embeds, im_mask, prefix, layout, truncated)


def generate_ids(model: Any, inputs: PromptInputs, settings: GenerationSettings) -> Iterator[int]:
    """New token ids one at a time (the stop token included, as ``generate`` returns it)."""
    seen = seen_ids([inputs.penalty_prefix])
    with paddle.no_grad():
        for token, _ in generate_tokens(model, inputs.embeds, settings, seen, im_mask=inputs.im_mask):
            yield int(token[0])


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Seed Paddle's generator for a block (as the demo's ``set_random_seed`` before the article
    and again before the images) and restore the caller's state afterwards."""
    if seed is None:
        yield
        return
    state = paddle.get_rng_state()
    paddle.seed(int(seed))
    try:
        yield
    finally:
        paddle.set_rng_state(state)
