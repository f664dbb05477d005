"""Answer a batch of items with the model: the official evaluation layout for benchmark rows,
``batch_chat`` for chat rows; greedy through the model package's generation loop, or beam search
through ``model.generate`` when ``num_beams > 1``.

The benchmark layout (official ``model_gen``): BOS, then the image embeddings, then the prompt
tokens without BOS; no system prompt, no ``<ImageHere>``::

    ids      [1] [-200 x P] [92543, 1008, 364, ...prompt...]     (-200: IMAGE_SLOT)
    im_mask   0   1 ... 1    0 ...

Rows are left-padded with the pad token (attention mask 0) and run as one batched forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from ..models.internlm_xcomposer2.generation import GenerationSettings, generate_tokens, seen_ids
from ..models.internlm_xcomposer2.image_processing import ImageLoadError, load_image
from ..models.internlm_xcomposer2.processor import IMAGE_SLOT, InternLMXComposer2Processor
from ..models.internlm_xcomposer2.tokenizer import IM_END_TOKEN
from .items import EvalItem, RowProblem

logger = logging.getLogger(__name__)

__all__ = ["Answerer", "DecodeOptions", "mcq_layout"]

Answer = Union[str, RowProblem]  # the raw answer, or why the row could not be asked


@dataclass(frozen=True)
class DecodeOptions:
    max_new_tokens: int
    num_beams: int = 1
    repetition_penalty: float = 1.0
    meta_instruction: str = ""  # chat rows only (benchmark rows have no system prompt, officially)


def mcq_layout(processor: InternLMXComposer2Processor, prompt: str, num_images: int) -> Tuple[List[int], List[int]]:
    """``(ids, im_mask)`` of a benchmark row: BOS, each image's slots, the prompt tokens (no BOS)."""
    tokenizer = processor.tokenizer
    text = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    slots = num_images * processor.num_image_tokens
    ids = [tokenizer.bos_token_id] + [IMAGE_SLOT] * slots + text
    return ids, [0] + [1] * slots + [0] * len(text)


class Answerer:
    """Answers batches of items; a row whose image cannot be loaded (or whose prompt is too long)
    comes back as a :class:`RowProblem` instead of failing its batch."""

    def __init__(self, model: Any, tokenizer: Any, options: DecodeOptions) -> None:
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.processor = InternLMXComposer2Processor.from_config(tokenizer, model.config)
        self.eos_ids = (tokenizer.eos_token_id, tokenizer.im_end_id)

    # --- the batch --------------------------------------------------------------------------
    def answer(self, items: Sequence[EvalItem]) -> List[Answer]:
        """One answer (or problem) per item, in order. A batch that fails as a whole (e.g. a prompt
        over ``max_length``) is retried row by row so the error lands on its row."""
        loaded: List[Union[List[Any], RowProblem]] = [self._load_images(item) for item in items]
        ready = [i for i, images in enumerate(loaded) if not isinstance(images, RowProblem)]
        answers: List[Answer] = list(loaded)  # problems stay; the rest is replaced below
        if not ready:
            return answers
        try:
            texts = self._generate([items[i] for i in ready], [loaded[i] for i in ready])
        except ValueError as err:
            if len(ready) == 1:
                answers[ready[0]] = RowProblem(str(err))
                return answers
            logger.info("batch failed (%s); answering its rows one by one", err)
            return [a if isinstance(a, RowProblem) else self.answer([item])[0] for item, a in zip(items, answers)]
        for i, text in zip(ready, texts):
            answers[i] = text
        return answers

    def _load_images(self, item: EvalItem) -> Union[List[Any], RowProblem]:
        try:
            return [load_image(ref.source()) for ref in item.images]
        except (ImageLoadError, RowProblem) as err:
            return RowProblem(f"image cannot be loaded: {err}")

    def _generate(self, items: Sequence[EvalItem], images: Sequence[List[Any]]) -> List[str]:
        if self.options.num_beams == 1 and all(item.kind == "chat" for item in items):
            return self._chat_greedy(items, images)
        rows = [self._row_inputs(item, imgs) for item, imgs in zip(items, images)]
        embeds, im_mask, attention = self._stack(rows)
        if self.options.num_beams > 1:
            # the official benchmark scripts pass no eos_token_id (generation_config: EOS only), chat passes both
            stops = self.eos_ids if any(item.kind == "chat" for item in items) else self.eos_ids[:1]
            return self._beam(embeds, im_mask, attention, stops)
        return self._greedy(embeds, im_mask, attention)

    # --- inputs -----------------------------------------------------------------------------
    def _row_inputs(self, item: EvalItem, images: List[Any]) -> Tuple[paddle.Tensor, Optional[paddle.Tensor]]:
        """``(embeds [1, T, H], im_mask [1, T] or None)`` of one row."""
        if item.kind == "chat":
            wrapped, im_mask = self.model.interleav_wrap_chat(self.tokenizer, item.prompt, images or None,
                                                              item.history, self.options.meta_instruction)
            return wrapped["inputs_embeds"], (im_mask if images else None)
        ids, mask = mcq_layout(self.processor, item.prompt, len(images))
        if len(ids) > self.model.config.max_length:
            raise ValueError(f"the prompt is {len(ids)} tokens, more than max_length {self.model.config.max_length}")
        ids_tensor = paddle.to_tensor([ids], dtype="int64")
        with paddle.no_grad():
            if not images:
                return self.model.model.embed(ids_tensor), None
            pixels = paddle.to_tensor(self.processor.pixel_values(images))
            im_mask = paddle.to_tensor([mask], dtype="bool")
            embeds = self.model.embed_interleaved(ids_tensor, im_mask, image_embeds=self.model.encode_img(pixels))
        return embeds, im_mask

    def _stack(self, rows) -> Tuple[paddle.Tensor, Optional[paddle.Tensor], paddle.Tensor]:
        """Left-pad ``[1, T_i, H]`` rows with the pad token's embedding into ``[n, T, H]``."""
        longest = max(embeds.shape[1] for embeds, _ in rows)
        pad_ids = paddle.to_tensor([[self.tokenizer.pad_token_id]], dtype="int64")
        with paddle.no_grad():
            pad = self.model.model.embed(pad_ids)
        all_embeds, masks, attention = [], [], []
        for embeds, im_mask in rows:
            missing, width = longest - embeds.shape[1], embeds.shape[1]
            all_embeds.append(paddle.concat([pad.expand([1, missing, embeds.shape[2]]), embeds], 1))
            row_mask = im_mask if im_mask is not None else paddle.zeros([1, width], dtype="bool")
            masks.append(paddle.concat([paddle.zeros([1, missing], dtype="bool"), row_mask.astype("bool")], 1))
            attention.append([0] * missing + [1] * width)
        any_image = any(im_mask is not None for _, im_mask in rows)
        return (paddle.concat(all_embeds), paddle.concat(masks) if any_image else None,
                paddle.to_tensor(attention, dtype="int64"))

    # --- decoding ---------------------------------------------------------------------------
    def _settings(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.options.max_new_tokens, do_sample=False,
                                  repetition_penalty=self.options.repetition_penalty, eos_token_ids=self.eos_ids,
                                  pad_token_id=self.tokenizer.pad_token_id)

    def _greedy(self, embeds, im_mask, attention) -> List[str]:
        """The official ``generate`` output starts with BOS, so the repetition penalty sees it."""
        n = embeds.shape[0]
        seen = seen_ids([[self.tokenizer.bos_token_id]] * n)
        new_ids: List[List[int]] = [[] for _ in range(n)]
        done = [False] * n
        for tokens, _ in generate_tokens(self.model, embeds, self._settings(), seen, im_mask=im_mask,
                                         attention_mask=attention):
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    new_ids[i].append(token)
                    done[i] = token in self.eos_ids
        return [self._decode(ids) for ids in new_ids]

    def _beam(self, embeds, im_mask, attention, stops: Tuple[int, ...]) -> List[str]:
        """``model.generate`` as the official scripts call it; output rows start with BOS (or 0). Which
        ids end a beam changes which beam wins, so ``stops`` follows the official call; the text is cut
        at ``[UNUSED_TOKEN_145]`` afterwards either way."""
        with paddle.no_grad():
            out = self.model.generate(inputs_embeds=embeds, im_mask=im_mask, attention_mask=attention,
                                      num_beams=self.options.num_beams, do_sample=False,
                                      max_new_tokens=self.options.max_new_tokens,
                                      repetition_penalty=self.options.repetition_penalty,
                                      eos_token_id=list(stops), pad_token_id=self.tokenizer.pad_token_id)
        rows = np.asarray(out.numpy() if isinstance(out, paddle.Tensor) else out).tolist()
        starts = (self.tokenizer.unk_token_id, self.tokenizer.bos_token_id)  # the official `in (0, 1)` check
        return [self._decode(row[1:] if row and row[0] in starts else row) for row in rows]

    def _decode(self, ids: List[int]) -> str:
        """New ids up to the first stop id → text cut at ``[UNUSED_TOKEN_145]``, stripped (VLMEvalKit)."""
        end = next((i + 1 for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        return self.tokenizer.decode(ids[:end], skip_special_tokens=True).split(IM_END_TOKEN)[0].strip()

    def _chat_greedy(self, items: Sequence[EvalItem], images: Sequence[List[Any]]) -> List[str]:
        results = self.model.batch_chat(
            self.tokenizer, [item.prompt for item in items], images=[imgs or None for imgs in images],
            histories=[item.history for item in items], max_new_tokens=self.options.max_new_tokens, do_sample=False,
            repetition_penalty=self.options.repetition_penalty, meta_instruction=self.options.meta_instruction)
        return [response.strip() for response, _ in results]
