"""``chat``, ``stream_chat`` and ``batch_chat`` with the official names, defaults and prompts.

All three consume :func:`~.generation.generate_tokens` (``batch_chat``: ``generate_rows``): image and text-only prompts
alike run a prefill and then one cached step per token (the official text-only path
recomputes the whole sequence at every step).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import paddle

from .generation import GenerationSettings, generate_rows, generate_tokens, seeded, seen_ids
from .processor import DEFAULT_META_INSTRUCTION, Layout, InternLMXComposer2Processor
from .tokenizer import IM_END_TOKEN

logger = logging.getLogger(__name__)

__all__ = ["ChatMixin"]

History = List[Tuple[str, str]]
REPLACEMENT_CHAR = "\ufffd"  # what decoding shows for an incomplete multi-byte character


def as_image_list(image: Any) -> List[Any]:
    """``image`` as the official methods take it (None, one image, a tensor of several) → a list
    of image items; a tensor stays whole (pixels ``[n,3,S,S]``/``[3,S,S]`` or embeddings ``[n,P,H]``)."""
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


def check_history(history: Any) -> History:
    if history is None:
        return []
    if not isinstance(history, (list, tuple)) or not all(
        isinstance(turn, (list, tuple)) and len(turn) == 2 and all(isinstance(s, str) for s in turn) for turn in history
    ):
        raise ValueError("history must be a list of (user, assistant) string pairs, as returned by chat()")
    return [tuple(turn) for turn in history]


class ChatMixin:
    """Chat methods of :class:`InternLMXComposer2ForCausalLM`."""

    def _settings(self, tokenizer, **kwargs: Any) -> GenerationSettings:
        if tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{self.config.vocab_size} embeddings: use the tokenizer of this checkpoint")
        settings = GenerationSettings(eos_token_ids=(tokenizer.eos_token_id, tokenizer.im_end_id),
                                      pad_token_id=tokenizer.pad_token_id, **kwargs)
        settings.validate()
        return settings

    def _chat_inputs(self, tokenizer, query: str, images: List[Any], history: History,
                     meta_instruction: str) -> Tuple[Layout, paddle.Tensor, Optional[paddle.Tensor]]:
        """Layout, ``inputs_embeds [1, T, H]`` and ``im_mask`` of one chat prompt."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query is empty; ask something")
        processor = InternLMXComposer2Processor.from_config(tokenizer, self.config)
        with paddle.no_grad():
            image_embeds = self._image_embeds(processor, images)
        num_images = 0 if image_embeds is None else image_embeds.shape[0]
        layout = processor.chat_layout(query, history, num_images, meta_instruction)
        if len(layout) > self.config.max_length:
            raise ValueError(
                f"the prompt is {len(layout)} tokens, more than max_length {self.config.max_length}; "
                "shorten the query or start a new conversation (fewer history turns)"
            )
        ids = paddle.to_tensor([layout.ids], dtype="int64")
        if image_embeds is None:
            return layout, self.model.embed(ids), None
        im_mask = paddle.to_tensor([layout.im_mask], dtype="bool")
        with paddle.no_grad():
            embeds = self.embed_interleaved(ids, im_mask, image_embeds=image_embeds)
        return layout, embeds, im_mask

    def _image_embeds(self, processor: InternLMXComposer2Processor, images: List[Any]) -> Optional[paddle.Tensor]:
        """``[n, P, H]`` (None without images) from sources (paths, URLs, PIL, bytes) or tensors:
        pixels ``[n,3,S,S]`` / ``[3,S,S]``, or already encoded embeddings ``[n, P, H]`` (what
        ``encode_img`` returns). A tensor may hold several images."""
        if not images:
            return None
        tensors = [img for img in images if isinstance(img, paddle.Tensor)]
        if not tensors:
            return self.encode_img(paddle.to_tensor(processor.pixel_values(images)))
        if len(tensors) != len(images):
            raise ValueError("pass images either all as tensors or all as files/URLs/PIL images, not mixed")
        encoded = [self.config.num_image_tokens, self.config.hidden_size]
        return paddle.concat([t if t.ndim == 3 and list(t.shape[1:]) == encoded else self.encode_img(t)
                              for t in tensors])

    def _official_prefix(self, tokenizer, layout: Layout) -> List[int]:
        """What the official ``generate`` outputs before the new tokens: the prompt ids on the
        text path; a lone BOS on the image (inputs_embeds) path. The repetition penalty
        sees exactly these ids."""
        return list(layout.ids) if layout.num_images == 0 else [tokenizer.bos_token_id]

    def generate_ids(self, tokenizer, query: str, image: Any = None, history: Optional[History] = None,
                     meta_instruction: str = DEFAULT_META_INSTRUCTION, output_scores: bool = False,
                     **settings: Any) -> Tuple[List[int], List[paddle.Tensor]]:
        """Ids as the official ``generate`` returns them for ``chat`` (prefix + new tokens),
        and the processed scores of every step if ``output_scores``."""
        ids, scores = [], []
        gen = self._generate_one(tokenizer, query, image, history, meta_instruction, output_scores, settings)
        prefix = next(gen)
        for token, step_scores in gen:
            ids.append(token)
            if output_scores:
                scores.append(step_scores)
        return prefix + ids, scores

    def _generate_one(self, tokenizer, query, image, history, meta_instruction, output_scores, settings):
        """First yields the official prefix ids, then ``(token id, scores)`` per step."""
        settings = self._settings(tokenizer, **settings)
        history = check_history(history)
        layout, embeds, im_mask = self._chat_inputs(tokenizer, query, as_image_list(image), history, meta_instruction)
        prefix = self._official_prefix(tokenizer, layout)
        yield prefix
        seen = seen_ids([prefix])
        with seeded(settings.seed):
            for token, scores in generate_tokens(self, embeds, settings, seen, im_mask=im_mask,
                                                 output_scores=output_scores):
                yield int(token[0]), (scores[0] if scores is not None else None)

    @staticmethod
    def _response(tokenizer, new_ids: Sequence[int]) -> str:
        text = tokenizer.decode(list(new_ids), skip_special_tokens=True)
        return text.split(IM_END_TOKEN)[0]

    def chat(self, tokenizer, query: str, image: Any = None, history: Optional[History] = None, streamer: Any = None,
             max_new_tokens: int = 1024, do_sample: bool = True, temperature: float = 1.0, top_p: float = 0.8,
             repetition_penalty: float = 1.005, meta_instruction: str = DEFAULT_META_INSTRUCTION, *,
             top_k: Optional[int] = None, seed: Optional[int] = None, num_beams: int = 1,
             length_penalty: float = 1.0) -> Tuple[str, History]:
        """Answer ``query`` about ``image`` → ``(response, history + [(query, response)])``. The
        official arguments, in the official order; ``image``: None, one image or a list (paths,
        URLs, PIL images, bytes), or a tensor of pixels ``[n,3,S,S]`` or embeddings ``[n,P,H]``.

        ``streamer``: an object with ``put(ids)`` / ``end()`` (the transformers/PaddleNLP
        ``TextStreamer`` protocol): as officially, the first ``put`` gets the ids generation starts
        from (the prompt, or the BOS seed of an image prompt), then each new token.
        ``num_beams > 1`` (with ``do_sample=False``) is transformers' beam search, as the official
        ``chat`` passes it on; ``top_k`` and ``seed`` are extensions."""
        settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        if num_beams > 1:
            new_ids = self._beam_chat(tokenizer, query, image, history, meta_instruction, settings, num_beams,
                                      length_penalty, streamer)
        else:
            gen = self._generate_one(tokenizer, query, image, history, meta_instruction, False, settings)
            prefix = next(gen)
            if streamer is not None:
                streamer.put(paddle.to_tensor([prefix]))
            new_ids = []
            for token, _ in gen:
                new_ids.append(token)
                if streamer is not None:
                    streamer.put(paddle.to_tensor([token]))
            if streamer is not None:
                streamer.end()
        response = self._response(tokenizer, new_ids)
        return response, check_history(history) + [(query, response)]

    def _beam_chat(self, tokenizer, query, image, history, meta_instruction, settings, num_beams, length_penalty,
                   streamer) -> List[int]:
        """The new ids of a beam-search answer (``generate``'s beam search, see :mod:`.beam_search`)."""
        inputs = self._chat_inputs(tokenizer, query, as_image_list(image), check_history(history), meta_instruction)
        return self._beam_answer(tokenizer, inputs, settings, num_beams, length_penalty, streamer)

    def _beam_answer(self, tokenizer, inputs: Tuple[Any, paddle.Tensor, Optional[paddle.Tensor]],
                     settings: Dict[str, Any], num_beams: int, length_penalty: float, streamer: Any = None,
                     should_stop: Optional[Callable[[], bool]] = None) -> List[int]:
        """:meth:`_beam_chat` from the prompt's ``(layout, embeds, im_mask)`` of :meth:`_chat_inputs`
        (a server that already built them); ``should_stop``: see :func:`~.beam_search.beam_search`."""
        layout, embeds, im_mask = inputs
        checked = self._settings(tokenizer, **settings)
        prefix = self._official_prefix(tokenizer, layout)
        opts = dict(do_sample=checked.do_sample, num_beams=num_beams, repetition_penalty=checked.repetition_penalty,
                    length_penalty=length_penalty, early_stopping=False)
        ids = self._generate_beams(embeds, np.asarray([prefix], dtype=np.int64), opts,
                                   len(prefix) + checked.max_new_tokens, checked.eos_token_ids, checked.pad_token_id,
                                   im_mask=im_mask, streamer=streamer, should_stop=should_stop)
        return ids[0][len(prefix):].tolist()

    def stream_chat(self, tokenizer, query: str, history: Optional[History] = None, max_new_tokens: int = 1024,
                    do_sample: bool = True, temperature: float = 0.8, top_p: float = 0.8, *, image: Any = None,
                    top_k: Optional[int] = None, repetition_penalty: float = 1.005,
                    meta_instruction: str = DEFAULT_META_INSTRUCTION,
                    seed: Optional[int] = None) -> Iterator[Tuple[str, History]]:
        """The official ``stream_chat`` (its argument order and defaults: temperature 0.8; ``image``
        and the rest by keyword, as the official ``**kwargs``): first ``("", history + [(query, "")])``,
        then ``(response so far, history)`` whenever the response grows by whole characters (never
        half a multi-byte character); the last item is the final answer with the final history,
        equal to what :meth:`chat` returns for the same arguments."""
        settings = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
        history = check_history(history)
        gen = self._generate_one(tokenizer, query, image, history, meta_instruction, False, settings)
        next(gen)
        yield "", history + [(query, "")]
        new_ids: List[int] = []
        shown = ""
        for token, _ in gen:
            new_ids.append(token)
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            if text.endswith(REPLACEMENT_CHAR):
                continue  # an incomplete UTF-8 sequence: wait for its other bytes
            text = text.split(IM_END_TOKEN)[0]
            if text != shown:
                shown = text
                yield shown, history + [(query, shown)]
        final = self._response(tokenizer, new_ids)
        if final != shown:
            yield final, history + [(query, final)]

    def batch_chat(self, tokenizer, queries: Sequence[str], images: Optional[Sequence[Any]] = None,
                   histories: Optional[Sequence[Optional[History]]] = None, max_new_tokens: int = 1024,
                   do_sample: bool = True, temperature: float = 1.0, top_p: float = 0.8, top_k: Optional[int] = None,
                   repetition_penalty: float = 1.005, meta_instruction: str = DEFAULT_META_INSTRUCTION,
                   seed: Optional[int] = None) -> List[Tuple[str, History]]:
        """Several independent chats in one batched generation: each prompt prefilled alone, then
        the rows decoded together (left-padded, a per-row attention mask and positions), each row
        stopping at its own EOS. Greedy results equal calling :meth:`chat` on each prompt alone."""
        n = len(queries)
        images = list(images) if images is not None else [None] * n
        histories = [check_history(h) for h in (histories or [None] * n)]
        if not (len(images) == len(histories) == n):
            raise ValueError(f"{n} queries but {len(images)} image entries and {len(histories)} histories")
        settings = self._settings(tokenizer, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, top_k=top_k,
                                  repetition_penalty=repetition_penalty, seed=seed)
        rows = [self._chat_inputs(tokenizer, q, as_image_list(img), h, meta_instruction)
                for q, img, h in zip(queries, images, histories)]
        seen = seen_ids([self._official_prefix(tokenizer, layout) for layout, _, _ in rows])
        new_ids: List[List[int]] = [[] for _ in range(n)]
        done = [False] * n
        eos = set(settings.eos_token_ids)
        with seeded(settings.seed):
            for tokens, _ in generate_rows(self, [(embeds, im_mask) for _, embeds, im_mask in rows], settings, seen):
                for i, token in enumerate(tokens.tolist()):
                    if not done[i]:
                        new_ids[i].append(token)
                        done[i] = token in eos
        responses = [self._response(tokenizer, ids) for ids in new_ids]
        return [(r, h + [(q, r)]) for r, h, q in zip(responses, histories, queries)]
