"""The official model's lower-level Python API, so scripts written against the PyTorch release run
with their imports changed: ``vis_processor``, ``encode_text``, ``build_inputs``,
``interleav_wrap_chat`` and ``generate`` (transformers 4.33's arguments and results).

The official examples build prompts with ``interleav_wrap_chat`` (or ``build_inputs``) and call
``generate(**inputs, im_mask=..., attention_mask=..., eos_token_id=[...], ...)``; ``generate``
returns the ids transformers 4.33 returns: an ``input_ids`` prompt followed by the new tokens, or,
for an ``inputs_embeds`` prompt, the BOS id transformers starts from followed by the new tokens;
rows that finished early are padded with ``pad_token_id``. Greedy and sampled decoding run the one
loop of :mod:`.generation`; ``num_beams > 1`` runs :mod:`.beam_search`.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import paddle

from .beam_search import BeamSettings, beam_search
from .chat import as_image_list, check_history
from .generation import HF_DEFAULT_TOP_K, GenerationSettings, generate_tokens, seeded
from .image_processing import InternLMXComposer2ImageProcessor
from .processor import DEFAULT_META_INSTRUCTION, InternLMXComposer2Processor

logger = logging.getLogger(__name__)

__all__ = ["OfficialAPIMixin", "VisProcessor"]

History = Sequence[Tuple[str, str]]
# transformers' GenerationConfig defaults (the checkpoint's generation_config.json sets only the
# token ids and max_length, which come from the model config here)
HF_DEFAULTS = dict(do_sample=False, temperature=1.0, top_p=1.0, top_k=HF_DEFAULT_TOP_K, repetition_penalty=1.0,
                   num_beams=1, length_penalty=1.0, early_stopping=False)


class VisProcessor:
    """``model.vis_processor``: one image (PIL image, path, URL or bytes) → normalised pixels
    ``[3, S, S]`` float32, as the official torchvision pipeline (resize, to tensor, normalise)."""

    def __init__(self, image_processor: InternLMXComposer2ImageProcessor) -> None:
        self.image_processor = image_processor

    def __call__(self, image: Any) -> paddle.Tensor:
        return paddle.to_tensor(self.image_processor(image, return_tensors="np")["pixel_values"][0])


def _as_list(ids: Union[None, int, Iterable[int]]) -> List[int]:
    if ids is None:
        return []
    return [int(ids)] if isinstance(ids, (int, np.integer)) else [int(i) for i in ids]


class OfficialAPIMixin:
    """Methods of :class:`InternLMXComposer2ForCausalLM` with the official names and arguments."""

    @functools.cached_property
    def vis_processor(self) -> VisProcessor:
        return VisProcessor(InternLMXComposer2ImageProcessor.from_model_config(self.config))

    @property
    def max_length(self) -> int:
        return self.config.max_length

    def encode_text(self, text: str, add_special_tokens: bool = False) -> paddle.Tensor:
        """Token embeddings ``[1, L, H]`` of ``text`` with ``model.tokenizer`` (set it first, as the
        official demos do: ``model.tokenizer = tokenizer``)."""
        if getattr(self, "tokenizer", None) is None:
            raise ValueError("encode_text needs model.tokenizer; set model.tokenizer = tokenizer first")
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return self.model.embed(paddle.to_tensor([ids], dtype="int64"))

    def build_inputs(self, tokenizer, query: str, history: Optional[History] = None,
                     meta_instruction: str = "") -> Dict[str, paddle.Tensor]:
        """Official text-only prompt: ``{"input_ids", "attention_mask"}`` int64 ``[1, L]``."""
        processor = InternLMXComposer2Processor.from_config(tokenizer, self.config)
        ids = processor.chat_layout(query, list(history or []), 0, meta_instruction).ids
        return {"input_ids": paddle.to_tensor([ids], dtype="int64"),
                "attention_mask": paddle.ones([1, len(ids)], dtype="int64")}

    def interleav_wrap_chat(self, tokenizer, query: str, image: Any, history: Optional[History] = None,
                            meta_instruction: str = DEFAULT_META_INSTRUCTION):
        """Official: ``({"inputs_embeds": [1, T, H]}, im_mask [1, T] bool)`` of a chat prompt whose
        ``<ImageHere>`` tags take, in order, the images of ``image``: encoded embeddings
        ``[n, P, H]`` as ``encode_img`` returns them (officially the only form), or ``None``; pixel
        tensors and image files are accepted too. ``history`` and ``meta_instruction`` may be
        omitted (the official function requires them)."""
        _, embeds, im_mask = self._chat_inputs(tokenizer, query, as_image_list(image), check_history(history),
                                               meta_instruction)
        if im_mask is None:
            im_mask = paddle.zeros(embeds.shape[:2], dtype="bool")
        return {"inputs_embeds": embeds}, im_mask

    def generate(self, input_ids: Optional[paddle.Tensor] = None, inputs_embeds: Optional[paddle.Tensor] = None,
                 attention_mask: Optional[paddle.Tensor] = None, im_mask: Optional[paddle.Tensor] = None,
                 streamer: Any = None, max_new_tokens: Optional[int] = None, max_length: Optional[int] = None,
                 eos_token_id: Union[None, int, Sequence[int]] = None, pad_token_id: Optional[int] = None,
                 bos_token_id: Optional[int] = None, seed: Optional[int] = None, **options: Any) -> paddle.Tensor:
        """transformers 4.33's ``generate`` for this model → int64 ids ``[B, T]`` (see the module
        docstring). ``options``: ``do_sample``, ``temperature``, ``top_p``, ``top_k``,
        ``repetition_penalty``, ``num_beams``, ``length_penalty``, ``early_stopping`` (transformers'
        defaults); ``seed`` seeds sampling (an extension). ``im_mask`` (image rows, PLoRA) counts
        with ``inputs_embeds`` only, as officially. ``attention_mask`` marks left padding; here
        positions count real tokens, so a row's result does not depend on its batch (the official
        rotary ignores positions, and its padded rows shift)."""
        unknown = sorted(set(options) - set(HF_DEFAULTS))
        if unknown:
            raise TypeError(f"generate() got unsupported arguments {unknown}; supported besides the inputs: "
                            f"{sorted(HF_DEFAULTS)}, max_new_tokens, max_length, eos/pad/bos_token_id, streamer, seed")
        opts = {**HF_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        if "top_k" in options and options["top_k"] is None:  # as transformers: an explicit None disables top-k
            opts["top_k"] = 0
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:  # as officially, a text prompt gets no PLoRA rows
            prefix, inputs_embeds, im_mask = input_ids.numpy().astype(np.int64), self.model.embed(input_ids), None
        else:
            bos = cfg.bos_token_id if bos_token_id is None else bos_token_id
            prefix = np.full([inputs_embeds.shape[0], 1], bos, dtype=np.int64)
        eos = _as_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (cfg.pad_token_id if cfg.pad_token_id is not None
                                                              else eos[0])
        total = prefix.shape[1] + max_new_tokens if max_new_tokens is not None else (max_length or cfg.max_length)
        if total <= prefix.shape[1]:  # transformers warns and still generates one token
            logger.warning("the prompt has %d ids and max_length is %d: generating one token; pass max_new_tokens",
                           prefix.shape[1], total)
            total = prefix.shape[1] + 1
        if opts["num_beams"] > 1:
            return paddle.to_tensor(self._generate_beams(inputs_embeds, prefix, opts, total, eos, pad, im_mask,
                                                         attention_mask, streamer))
        settings = GenerationSettings(max_new_tokens=total - prefix.shape[1], do_sample=opts["do_sample"],
                                      temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"],
                                      repetition_penalty=opts["repetition_penalty"], eos_token_ids=tuple(eos),
                                      pad_token_id=pad, seed=seed)
        if streamer is not None:
            streamer.put(paddle.to_tensor(prefix))
        steps: List[np.ndarray] = []
        with seeded(seed):
            for tokens, _ in generate_tokens(self, inputs_embeds, settings, paddle.to_tensor(prefix), im_mask=im_mask,
                                             attention_mask=attention_mask):
                steps.append(tokens)
                if streamer is not None:
                    streamer.put(paddle.to_tensor(tokens))
        if streamer is not None:
            streamer.end()
        return paddle.to_tensor(np.concatenate([prefix, np.stack(steps, axis=1)], axis=1))

    def _generate_beams(self, inputs_embeds: paddle.Tensor, prefix: np.ndarray, opts: Dict[str, Any], total: int,
                        eos: Sequence[int], pad: int, im_mask: Optional[paddle.Tensor] = None,
                        attention_mask: Optional[paddle.Tensor] = None, streamer: Any = None,
                        should_stop: Optional[Callable[[], bool]] = None) -> np.ndarray:
        """Beam search's ids ``[B, T]`` (``prefix`` + new tokens); shared by ``generate`` and ``chat``
        (``should_stop``: see :func:`~.beam_search.beam_search`)."""
        if opts["do_sample"]:
            raise ValueError("num_beams > 1 with do_sample=True (beam sampling) is not supported; pass "
                             "do_sample=False for beam search, or num_beams=1 to sample")
        if streamer is not None:  # as transformers
            raise ValueError("a streamer cannot be used with beam search; set num_beams=1")
        settings = BeamSettings(num_beams=int(opts["num_beams"]), max_length=total, eos_token_ids=tuple(eos),
                                pad_token_id=pad, repetition_penalty=opts["repetition_penalty"],
                                length_penalty=opts["length_penalty"], early_stopping=opts["early_stopping"])
        return beam_search(self, inputs_embeds, prefix, settings, im_mask=im_mask, attention_mask=attention_mask,
                           should_stop=should_stop)
