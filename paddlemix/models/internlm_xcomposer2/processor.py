"""From text and images to the token layout the model embeds: chat prompts and training samples.

A *layout* is a list of token ids in which every image occupies ``num_image_tokens``
consecutive slots holding ``IMAGE_SLOT``; ``im_mask`` is 1 exactly there. The model
fills the slots with the image embeddings (:meth:`embed_interleaved`)::

    part 0 tokens (with BOS)   image 0 slots            part 1 tokens (with BOS) ...
    [1, 92543, 9081, ...]      [-200] * 256             [1, 5658, ...]
    im_mask 0 ...              1 ... 1                  0 ...

Chat prompts follow the official ``interleav_wrap_chat`` / ``build_inputs``; training
samples the official ``interleav_wrap`` + ``mask_human_targets``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .checkpoint import load_config
from .hub import resolve_pretrained
from .image_processing import InternLMXComposer2ImageProcessor
from .tokenizer import IM_END_TOKEN, IM_START_TOKEN, InternLMXComposer2Tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "IMAGE_SLOT",
    "DEFAULT_META_INSTRUCTION",
    "Layout",
    "build_chat_prompt",
    "build_training_text",
    "InternLMXComposer2Processor",
]

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_SLOT = -200  # layout id of an image slot (never a vocabulary id); labels there are IGNORE_INDEX
IGNORE_INDEX = -100
# How many tokens after a user turn's closing [UNUSED_TOKEN_145] the official rule still masks
# ("\n[UNUSED_TOKEN_146]assistant\n"): it writes ``targets[last_eoa : i + 6] = -100``.
_USER_TAIL = 6
DEFAULT_META_INSTRUCTION = (
    "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n"
    "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed by "
    "Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by the user "
    "such as English and 中文.\n"
    "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively based on "
    "the provided image."
)

History = Sequence[Tuple[str, str]]


@dataclass
class Layout:
    """Token ids with ``IMAGE_SLOT`` at image rows, the matching ``im_mask``, and labels if any."""

    ids: List[int]
    im_mask: List[int]
    num_images: int
    labels: Optional[List[int]] = None
    truncated: bool = False
    notes: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_supervised(self) -> int:
        """Labelled tokens the loss uses (position 0 never is: labels are shifted by one)."""
        return sum(1 for t in (self.labels or [])[1:] if t != IGNORE_INDEX)


def _turn(user: str, assistant: Optional[str]) -> str:
    text = f"{IM_START_TOKEN}user\n{user}{IM_END_TOKEN}\n{IM_START_TOKEN}assistant\n"
    return text if assistant is None else f"{text}{assistant}{IM_END_TOKEN}\n"


def build_chat_prompt(query: str, history: History = (), meta_instruction: str = DEFAULT_META_INSTRUCTION,
                      text_only: bool = False) -> str:
    """The official chat prompt. ``text_only`` adds the literal ``<s>`` of ``build_inputs``
    (the tokenizer adds BOS too, so text-only ids start ``[1, 1, ...]``, as officially)."""
    prompt = "<s>" if text_only else ""
    if meta_instruction:
        prompt += f"{IM_START_TOKEN}system\n{meta_instruction}{IM_END_TOKEN}\n"
    for user, assistant in history:
        prompt += _turn(user, assistant)
    return prompt + _turn(query, None)


def build_training_text(conversation: History) -> str:
    """Official fine-tuning text: every (question, answer) turn, stripped, then ``</s>``."""
    return "".join(_turn(q.strip(), a.strip()) for q, a in conversation) + "</s>"


def mask_human_targets(ids: Sequence[int], im_end_id: int, eos_id: int) -> List[int]:
    """The official label rule: learn assistant answers (with their closing im_end) and the
    final ``</s>``; everything else is ``IGNORE_INDEX``.

    Counting the im_end tokens k = 0, 1, ...: an even k closes a user turn, so everything
    from the previous answer's end through ``_USER_TAIL`` tokens past it is masked; an odd
    k closes an answer. After the first EOS everything is masked; a sequence cut before
    its EOS keeps no label past its last complete answer.
    """
    targets = list(ids)
    end_count, last_eoa, tok = 0, 0, None
    for i, tok in enumerate(ids):
        if tok == im_end_id:
            if end_count % 2 == 0:
                targets[last_eoa : i + _USER_TAIL] = [IGNORE_INDEX] * len(targets[last_eoa : i + _USER_TAIL])
            else:
                last_eoa = i + 1
            end_count += 1
        elif tok == eos_id:
            targets[i + 1 :] = [IGNORE_INDEX] * len(targets[i + 1 :])
            break
    if tok != eos_id and end_count % 2 == 0:
        targets[last_eoa + 1 :] = [IGNORE_INDEX] * len(targets[last_eoa + 1 :])
    return [IGNORE_INDEX if t == IMAGE_SLOT else t for t in targets]


class InternLMXComposer2Processor:
    """Tokenizer + image processor + the official prompt/sample layout rules."""

    def __init__(self, tokenizer: InternLMXComposer2Tokenizer, image_processor: InternLMXComposer2ImageProcessor,
                 num_image_tokens: int, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length

    @classmethod
    def from_config(cls, tokenizer: InternLMXComposer2Tokenizer, config: Any) -> "InternLMXComposer2Processor":
        image_processor = InternLMXComposer2ImageProcessor(img_size=config.img_size)
        return cls(tokenizer, image_processor, config.num_image_tokens, config.max_length)

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: Any = None, *, from_aistudio: bool = False,
                        from_hf_hub: bool = False, cache_dir: Optional[str] = None,
                        subfolder: Optional[str] = None) -> "InternLMXComposer2Processor":
        """Tokenizer + image processor from a local directory or a model id (same resolution as the model).

        The image size and token count come from the model config (``config``, else the checkpoint's
        ``config.json``); only that and the tokenizer files are fetched, never the weights.
        """
        directory = resolve_pretrained(name_or_path, purpose="tokenizer" if config is not None else "processor",
                                       from_aistudio=from_aistudio, from_hf_hub=from_hf_hub, cache_dir=cache_dir,
                                       subfolder=subfolder)
        config = config if config is not None else load_config(directory)
        return cls.from_config(InternLMXComposer2Tokenizer.from_pretrained(directory), config)

    # --- tokens ------------------------------------------------------------------------------
    def _encode(self, text: str, bos: bool) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=bos)["input_ids"])

    def _interleave(self, parts: List[str], num_images: int, bos_every_part: bool,
                    stop_after: Optional[int] = None) -> Tuple[List[int], List[int]]:
        """Tokens of ``parts`` with ``num_images`` image slot runs between them. With
        ``stop_after``, stop (as the official loop does) once the length exceeds it."""
        ids: List[int] = []
        mask: List[int] = []
        for i, part in enumerate(parts):
            if part:
                tokens = self._encode(part, bos=bos_every_part or not ids)
                ids += tokens
                mask += [0] * len(tokens)
            if i < num_images:
                ids += [IMAGE_SLOT] * self.num_image_tokens
                mask += [1] * self.num_image_tokens
            if stop_after is not None and len(ids) > stop_after:
                break
        return ids, mask

    # --- chat --------------------------------------------------------------------------------
    def chat_layout(self, query: str, history: History = (), num_images: int = 0,
                    meta_instruction: str = DEFAULT_META_INSTRUCTION) -> Layout:
        """Layout of a chat prompt. Images fill the ``<ImageHere>`` tags of the whole prompt
        (history included) in order; one image and no tag puts the image after the prompt."""
        if not num_images:
            prompt = build_chat_prompt(query, history, meta_instruction, text_only=True)
            if IMAGE_PLACEHOLDER in prompt:
                raise ValueError(
                    f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} tag(s) but no image was "
                    "given; pass the image(s) again or remove the tags"
                )
            ids = self._encode(prompt, bos=True)
            return Layout(ids=ids, im_mask=[0] * len(ids), num_images=0)
        prompt = build_chat_prompt(query, history, meta_instruction)
        tags = prompt.count(IMAGE_PLACEHOLDER)
        if tags != num_images and not (tags == 0 and num_images == 1):
            raise ValueError(
                f"{num_images} image(s) given but the prompt (history included) has {tags} {IMAGE_PLACEHOLDER} "
                f"tag(s); put one {IMAGE_PLACEHOLDER} where each image goes"
            )
        ids, mask = self._interleave(prompt.split(IMAGE_PLACEHOLDER), num_images, bos_every_part=True)
        return Layout(ids=ids, im_mask=mask, num_images=num_images)

    # --- training ----------------------------------------------------------------------------
    def training_layout(self, conversation: History, num_images: int) -> Layout:
        """Layout + labels of one training conversation (``<ImageHere>`` tags in questions).

        Truncation to ``max_length`` never cuts through an image's slots: the cut moves to
        just before that image (the official code would keep part of it). ``notes`` say what
        was cut; ``num_supervised`` tells whether any answer token survived.
        """
        text = build_training_text(conversation)
        tags = text.count(IMAGE_PLACEHOLDER)
        if tags != num_images:
            raise ValueError(f"{tags} {IMAGE_PLACEHOLDER} tag(s) but {num_images} image(s)")
        tok = self.tokenizer
        if not num_images:  # official text path: tokenize (truncating), then mask
            ids = self._encode(text, bos=True)
            notes = [f"cut from {len(ids)} to {self.max_length} tokens"] if len(ids) > self.max_length else []
            ids = ids[: self.max_length]
            labels = mask_human_targets(ids, tok.im_end_id, tok.eos_token_id)
            return Layout(ids, [0] * len(ids), 0, labels, truncated=bool(notes), notes=notes)
        # The official loop stops adding parts once the length passes max_length, labels what
        # it has, then slices; the labels of kept tokens therefore match the official ones.
        ids, mask = self._interleave(text.split(IMAGE_PLACEHOLDER), num_images, bos_every_part=False,
                                     stop_after=self.max_length)
        layout = Layout(ids, mask, num_images, mask_human_targets(ids, tok.im_end_id, tok.eos_token_id))
        if len(layout) > self.max_length:
            self._cut(layout, self.max_length)
            layout.notes.append(f"cut to {len(layout)} tokens (max_length {self.max_length})")
        return layout

    def _cut(self, layout: Layout, limit: int) -> None:
        """Truncate to ``limit`` tokens, moving the cut before an image it would split."""
        end = min(limit, len(layout))
        if end < len(layout) and layout.im_mask[end - 1] and layout.im_mask[end]:
            while end > 0 and layout.im_mask[end - 1]:
                end -= 1
            layout.notes.append("an image that did not fit whole was dropped")
        layout.ids, layout.im_mask = layout.ids[:end], layout.im_mask[:end]
        layout.labels = layout.labels[:end] if layout.labels is not None else None
        layout.num_images = sum(layout.im_mask) // self.num_image_tokens
        layout.truncated = True

    # --- images ------------------------------------------------------------------------------
    def pixel_values(self, images: Any) -> np.ndarray:
        """``[n, 3, S, S]`` float32 from any image source(s) the image processor accepts."""
        return self.image_processor(images, return_tensors="np")["pixel_values"]
