"""Ranking library images for a caption with a score the model itself gives.

The official demo sends each caption to an image-search web service and shows the model its top 4
results. Offline, the library is ranked by the model: for caption ``c`` and image ``x`` the score is
the mean log-probability of the tokens of ``c"`` (the caption and the closing quote) after the prompt
``[user] <image x> 给出这张图像对应的标题。 [assistant] 标题是"`` — the caption step's own words and
answer form, with the image in place of the article. For a fixed caption the length and the
caption's prior are the same for every image, so ordering by it orders by how much the image
raises the caption's likelihood.

Everything before the caption is the same for every caption, so each batch of images runs that
prefix once and keeps its KV cache; every caption then costs only its own few tokens::

    [BOS] [user]\\n  image (P rows)  给出…标题。[/user]\\n[assistant]\\n标题是"  | caption tokens  "
    └──────────────── prefilled once per batch of images ───────────────┘ └ per caption, rewound ┘
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Collection, List, Sequence

import numpy as np
import paddle
from tqdm import tqdm

from paddlemix.models.internlm_xcomposer2.kv_cache import KVCache
from paddlemix.models.internlm_xcomposer2.processor import IMAGE_SLOT

from .prompts import CAPTION_ANSWER_PREFIX, IMAGE_TAG, RANKING_USER_TEXT, ranking_prompt

logger = logging.getLogger(__name__)

__all__ = ["RankingPrompt", "caption_scores", "top_candidates"]


@dataclass(frozen=True)
class RankingPrompt:
    """The scoring prompt: ``user_text`` follows the image; the caption follows ``answer_prefix``
    and is closed by ``answer_suffix`` (scored too: it says the caption is complete)."""

    user_text: str = RANKING_USER_TEXT
    answer_prefix: str = CAPTION_ANSWER_PREFIX
    answer_suffix: str = '"'
    with_meta: bool = False


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass
class _Plan:
    """Ids shared by all rows (``prefill``) and, per caption, the ids after it (``rests``) and
    how many of those are prompt rather than caption (``skips``: a token the caption's first
    characters merged into)."""

    prefill: List[int]
    rests: List[List[int]]
    skips: List[int]


def _plan(tokenizer: Any, captions: Sequence[str], prompt: RankingPrompt, image_tokens: int) -> _Plan:
    head, tail = ranking_prompt(prompt.user_text, prompt.answer_prefix, prompt.with_meta).split(IMAGE_TAG)
    head_ids = list(tokenizer(head, add_special_tokens=True)["input_ids"])  # BOS on the first part only
    base = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    fulls = [list(tokenizer(tail + c + prompt.answer_suffix, add_special_tokens=False)["input_ids"])
             for c in captions]
    starts = [min(_common_prefix(full, base), len(full) - 1) for full in fulls]  # first caption token
    shared = min(starts)
    prefill = head_ids + [IMAGE_SLOT] * image_tokens + fulls[0][:shared]
    return _Plan(prefill, [full[shared:] for full in fulls], [s - shared for s in starts])


def _batch_scores(model: Any, image_embeds: paddle.Tensor, plan: _Plan) -> np.ndarray:
    """``[C, B]`` scores of every caption for a batch of images ``[B, P, H]``."""
    cfg, b = model.config, int(image_embeds.shape[0])
    ids = paddle.to_tensor([plan.prefill] * b, dtype="int64")
    im_mask = ids == IMAGE_SLOT
    embeds = model.embed_interleaved(ids, im_mask, image_embeds=image_embeds)
    longest = max(len(r) for r in plan.rests)
    cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, len(plan.prefill) + longest,
                    embeds.dtype)
    last = model(inputs_embeds=embeds, im_mask=im_mask, past_key_values=cache, logits_to_keep=1).logits
    scores = np.zeros([len(plan.rests), b], dtype=np.float64)
    for c, (rest, skip) in enumerate(zip(plan.rests, plan.skips)):
        logits = last
        if len(rest) > 1:
            feed = paddle.to_tensor([rest[:-1]] * b, dtype="int64")
            more = model(input_ids=feed, past_key_values=cache, logits_to_keep=len(rest) - 1).logits
            cache.truncate(len(plan.prefill))
            logits = paddle.concat([last, more], axis=1)
        scores[c] = _token_logprobs(logits.astype("float32").numpy(), rest)[:, skip:].mean(axis=-1)
    return scores


def _token_logprobs(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """``log softmax(logits)[..., target]`` ``[B, n]`` from ``[B, n, V]``, in numpy (Paddle's CPU
    ``log_softmax`` over a 92544-token vocabulary takes seconds; this takes milliseconds)."""
    top = logits.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    picked = np.take_along_axis(logits, np.asarray(targets)[None, :, None], axis=-1)[..., 0]
    return picked - log_norm


def caption_scores(model: Any, tokenizer: Any, library: Any, captions: Sequence[str],
                   prompt: RankingPrompt = RankingPrompt(), batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """``[len(captions), len(library)]``: the score of every caption for every library image.

    ``library``: anything with ``len()`` and ``embeddings(indices) -> [k, P, H]`` (an
    :class:`~.library.ImageLibrary`). Images go through in batches of ``batch_size``.
    """
    if not captions or not len(library):
        return np.zeros([len(captions), len(library)])
    plan = _plan(tokenizer, captions, prompt, model.config.num_image_tokens)
    columns = []
    starts = range(0, len(library), batch_size)
    with paddle.no_grad():
        for start in tqdm(starts, desc="ranking library", unit="batch", disable=not progress):
            indices = list(range(start, min(start + batch_size, len(library))))
            columns.append(_batch_scores(model, library.embeddings(indices), plan))
    return np.concatenate(columns, axis=1)


def top_candidates(scores: np.ndarray, exclude: Collection[int], count: int) -> List[int]:
    """The ``count`` best-scored indices not in ``exclude``, best first (ties: library order)."""
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [int(i) for i in order if int(i) not in exclude][:count]
