"""The model calls of the composition pipeline, one function per official step.

Each step builds the official prompt (:mod:`.prompts`), lays it out and embeds it as the demo's
``interleav_wrap`` does (:mod:`.decoding`), decodes with the demo's settings and reads the answer
the demo's way (:mod:`.parsing`):

=========== ================================ ========== ========================= =================
step        demo function                    budget     stops on                  text read
=========== ================================ ========== ========================= =================
article     ``generate_article`` (streamed)  4096 (UI)  ``</s>``, 92397, 92542   new ids before the stop
locations   ``generate_loc``                 200        ``</s>``, 92397          all new ids, markers removed
captions    ``generate_cap``                 200        ``</s>``, 92397          all new ids, markers removed
selection   ``model_select_image(base)``     10         ``</s>``                 new ids after the first
edits       ``paragraph_edit`` (streamed)    500 - len  ``</s>``, 92397, 92542   new ids before the stop
=========== ================================ ========== ========================= =================
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import paddle

from paddlemix.models.internlm_xcomposer2.textstream import IncrementalText

from . import prompts
from .decoding import PromptInputs, generate_ids, prompt_inputs, step_settings, stop_ids
from .parsing import Locations, parse_caption, parse_locations, parse_selection, strip_chat_markers

logger = logging.getLogger(__name__)

__all__ = ["StepOutput", "Selection", "write_article", "locate_images", "caption_places", "choose_candidate",
           "edit_paragraph"]

TextCallback = Callable[[str], None]


@dataclass
class StepOutput:
    """One model call: the prompt, what the step read from the answer, sizes and time, and
    whether the prompt was cut to ``max_length`` (as the demo cuts its image prompts)."""

    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    truncated: bool = False


def _streamed(model: Any, tokenizer: Any, inputs: PromptInputs, max_new_tokens: int, do_sample: bool,
              repetition_penalty: float, on_text: Optional[TextCallback]) -> Tuple[str, int]:
    """The demo's streamed calls (article, edits): decoding stops at ``</s>``, the stop word or
    ``[UNUSED_TOKEN_145]``, none of which enters the text; ``on_text`` gets each new piece."""
    stops = stop_ids(tokenizer)
    settings = step_settings(model, tokenizer, max_new_tokens, do_sample, repetition_penalty,
                             (stops.eos, stops.stop_word, stops.im_end))
    stream, count = IncrementalText(tokenizer, skip_special_tokens=False), 0
    for token in generate_ids(model, inputs, settings):
        count += 1
        if token in settings.eos_token_ids:
            break
        piece = stream.push(token)
        if piece and on_text is not None:
            on_text(piece)
    rest, text = stream.finish()  # text: decode of the ids (the stops never enter them)
    if rest and on_text is not None:
        on_text(rest)
    return text, count


def _answer(model: Any, tokenizer: Any, inputs: PromptInputs, max_new_tokens: int, do_sample: bool) -> Tuple[str, int]:
    """The demo's ``generate`` / ``generate_with_emb``: stop at ``</s>`` or the stop word (not at
    ``[UNUSED_TOKEN_145]``), decode every new id skipping special tokens, drop the markers."""
    stops = stop_ids(tokenizer)
    settings = step_settings(model, tokenizer, max_new_tokens, do_sample, prompts.REPETITION_PENALTY,
                             (stops.eos, stops.stop_word))
    ids = list(generate_ids(model, inputs, settings))
    return strip_chat_markers(tokenizer.decode(ids, skip_special_tokens=True)), len(ids)


def write_article(model: Any, tokenizer: Any, instruction: str, upload_embeds: Optional[paddle.Tensor] = None, *,
                  max_new_tokens: int = prompts.BUDGETS["article"], do_sample: bool = True,
                  repetition_penalty: float = prompts.REPETITION_PENALTY, with_meta: bool = False,
                  on_text: Optional[TextCallback] = None) -> StepOutput:
    """Step 1: the article, streamed to ``on_text`` as it is written. ``upload_embeds``
    ``[n, P, H]``: the user's images, as ``<image>`` tags before the instruction. Always passed
    as embeddings (as the demo does), so the repetition penalty sees only the BOS."""
    if not instruction.strip():
        raise ValueError("the instruction is empty; say what to write")
    started = time.perf_counter()
    num_uploads = 0 if upload_embeds is None else int(upload_embeds.shape[0])
    prompt = prompts.article_prompt(instruction, num_uploads, with_meta)
    inputs = prompt_inputs(model, tokenizer, prompt, upload_embeds)
    text, count = _streamed(model, tokenizer, inputs, max_new_tokens, do_sample, repetition_penalty, on_text)
    return StepOutput(prompt, text, inputs.length, count, time.perf_counter() - started, inputs.truncated)


def locate_images(model: Any, tokenizer: Any, paragraphs: Sequence[str], num_images: str,
                  upload_embeds: Optional[paddle.Tensor] = None, *, do_sample: bool = True,
                  with_meta: bool = False) -> Tuple[Locations, StepOutput]:
    """Step 2: which paragraphs an image follows. ``num_images``: ``''`` (automatic) or the
    number as text. Without uploads the prompt goes in as ids (the penalty sees it all)."""
    started = time.perf_counter()
    num_uploads = 0 if upload_embeds is None else int(upload_embeds.shape[0])
    prompt = prompts.location_prompt(paragraphs, num_images, num_uploads, with_meta)
    inputs = prompt_inputs(model, tokenizer, prompt, upload_embeds, via_input_ids=num_uploads == 0)
    text, count = _answer(model, tokenizer, inputs, prompts.BUDGETS["locations"], do_sample)
    locations = parse_locations(text)
    return locations, StepOutput(prompt, locations.answer, inputs.length, count, time.perf_counter() - started,
                                 inputs.truncated)


def caption_places(model: Any, tokenizer: Any, paragraphs: Sequence[str], places: Sequence[int], *,
                   do_sample: bool = True, with_meta: bool = False,
                   on_caption: Optional[Callable[[int, str], None]] = None) -> Tuple[List[str], List[StepOutput]]:
    """Step 3: one caption per place, in the given (model's) order, each prompt carrying the
    captions written before it."""
    captions: List[str] = []
    outputs: List[StepOutput] = []
    for place in places:
        started = time.perf_counter()
        prompt = prompts.caption_prompt(paragraphs, place, list(zip(places, captions)), with_meta)
        inputs = prompt_inputs(model, tokenizer, prompt, via_input_ids=True)
        text, count = _answer(model, tokenizer, inputs, prompts.BUDGETS["captions"], do_sample)
        captions.append(parse_caption(text))
        outputs.append(StepOutput(prompt, captions[-1], inputs.length, count, time.perf_counter() - started))
        if on_caption is not None:
            on_caption(place, captions[-1])
    return captions, outputs


@dataclass
class Selection:
    """The chosen candidate (an index into the shown ones), the decoded answer, and whether
    the demo's fallback to A was taken (and why)."""

    index: int
    answer: str
    fell_back: bool
    reason: str
    output: Optional[StepOutput]


def choose_candidate(model: Any, tokenizer: Any, chunks: Sequence[str], chosen_embeds: Optional[paddle.Tensor],
                     candidate_embeds: paddle.Tensor, *, do_sample: bool = True,
                     with_meta: bool = False) -> Selection:
    """Step 5: the model picks one of ``candidate_embeds`` ``[k, P, H]`` (labels A, B, ...) for
    the place ending ``chunks``; ``chosen_embeds`` are the images already placed, one between
    each pair of chunks. The answer is read from the new ids after the first (the demo's
    ``outputs[0][2:]``); an unreadable one falls back to A, as the demo does."""
    started = time.perf_counter()
    count = int(candidate_embeds.shape[0])
    prompt = prompts.selection_prompt(chunks, count, with_meta)
    images = candidate_embeds if chosen_embeds is None else paddle.concat([chosen_embeds, candidate_embeds])
    inputs = prompt_inputs(model, tokenizer, prompt, images)
    settings = step_settings(model, tokenizer, prompts.BUDGETS["selection"], do_sample, prompts.REPETITION_PENALTY,
                             (tokenizer.eos_token_id,))
    ids = list(generate_ids(model, inputs, settings))
    answer = tokenizer.decode(ids[1:])
    index, reason = parse_selection(answer, count)
    output = StepOutput(prompt, answer, inputs.length, len(ids), time.perf_counter() - started, inputs.truncated)
    if index is None:
        logger.info("selection: %s; using candidate A, as the official demo does", reason)
        return Selection(0, answer, True, reason, output)
    return Selection(index, answer, False, "", output)


def edit_paragraph(model: Any, tokenizer: Any, edit_type: str, text: str, instruction: str = "",
                   before: str = "", after: str = "", *, do_sample: bool = True, with_meta: bool = False,
                   on_text: Optional[TextCallback] = None) -> StepOutput:
    """The demo's paragraph edits (rewrite, expand, abbreviate, insert before/after), streamed.
    The demo's budget is ``max_length = 500 - prompt tokens`` over ``[BOS] + new tokens``."""
    started = time.perf_counter()
    prompt = prompts.edit_prompt(edit_type, text, instruction, before, after, with_meta)
    inputs = prompt_inputs(model, tokenizer, prompt)
    budget = prompts.EDIT_MAX_LENGTH - inputs.length - 1
    if budget <= 0:
        raise ValueError(f"the edit prompt is {inputs.length} tokens: the official edit budget of "
                         f"{prompts.EDIT_MAX_LENGTH} tokens leaves no room for an answer; shorten the paragraph")
    new_text, count = _streamed(model, tokenizer, inputs, budget, do_sample, prompts.REPETITION_PENALTY, on_text)
    return StepOutput(prompt, new_text, inputs.length, count, time.perf_counter() - started)
