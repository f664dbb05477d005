"""Token generation: one loop (a generator) over an explicit KV cache, used by every chat path.

Score processing follows the official ``generate`` (transformers 4.33): the repetition
penalty first (a logits *processor*, applied in greedy mode too), then — only when
sampling — temperature, top-k and top-p (logits *warpers*), then argmax or a draw.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import paddle
import paddle.nn.functional as F

from .kv_cache import KVCache

__all__ = [
    "GenerationSettings",
    "HF_DEFAULT_TOP_K",
    "apply_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "choose_greedy_on_host",
    "process_scores",
    "generate_rows",
    "generate_tokens",
    "real_positions",
    "seen_ids",
    "seeded",
]

# transformers' GenerationConfig default: the official chat never sets top_k, so sampling
# there always keeps only the 50 best tokens before top-p. ``top_k=None`` means the same here.
HF_DEFAULT_TOP_K = 50


@dataclass
class GenerationSettings:
    max_new_tokens: int = 1024
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.8
    top_k: Optional[int] = None
    repetition_penalty: float = 1.005
    eos_token_ids: Tuple[int, ...] = ()
    pad_token_id: int = 0
    seed: Optional[int] = None

    def validate(self) -> None:
        """Reject values the official code would silently misuse, naming the argument."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 disables it) or None, got {self.top_k!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @property
    def effective_top_k(self) -> int:
        return HF_DEFAULT_TOP_K if self.top_k is None else self.top_k


def apply_repetition_penalty(scores: paddle.Tensor, seen: paddle.Tensor, penalty: float) -> paddle.Tensor:
    """Official semantics: for every id already present, divide a positive score by
    ``penalty`` and multiply a negative one. ``scores`` ``[b, V]``; ``seen`` ``[b, n]`` ids
    (a row may repeat ids: they get the same value). Touches only those ``n`` entries."""
    if penalty == 1.0 or seen.shape[1] == 0:
        return scores
    present = paddle.take_along_axis(scores, seen, axis=1)
    present = paddle.where(present < 0, present * penalty, present / penalty)
    return paddle.put_along_axis(scores, seen, present, axis=1)


def apply_top_k(scores: paddle.Tensor, k: int) -> paddle.Tensor:
    """Keep the ``k`` best scores per row (ties with the k-th kept), others → -inf."""
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = paddle.topk(scores, k, axis=-1)[0][:, -1:]
    return paddle.where(scores < kth, paddle.full_like(scores, float("-inf")), scores)


def apply_top_p(scores: paddle.Tensor, top_p: float) -> paddle.Tensor:
    """Nucleus filtering as transformers' ``TopPLogitsWarper``: sort ascending, drop the
    tokens whose cumulative probability is ≤ 1 - top_p, always keep the best one."""
    if top_p >= 1.0:
        return scores
    sorted_scores = paddle.sort(scores, axis=-1)
    order = paddle.argsort(scores, axis=-1)
    cumulative = paddle.cumsum(F.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cumulative <= (1 - top_p)).astype("uint8")
    remove_sorted[:, -1] = 0
    remove = paddle.put_along_axis(paddle.zeros_like(remove_sorted), order, remove_sorted, axis=-1)
    return paddle.where(remove.astype("bool"), paddle.full_like(scores, float("-inf")), scores)


def process_scores(logits: paddle.Tensor, seen: paddle.Tensor, settings: GenerationSettings) -> paddle.Tensor:
    """Logits ``[b, V]`` of the last position → the scores a token is chosen from."""
    scores = apply_repetition_penalty(logits.astype("float32"), seen, settings.repetition_penalty)
    if not settings.do_sample:
        return scores
    if settings.temperature != 1.0:
        scores = scores / settings.temperature
    scores = apply_top_k(scores, settings.effective_top_k)
    return apply_top_p(scores, settings.top_p)


def _choose(scores: paddle.Tensor, settings: GenerationSettings) -> np.ndarray:
    """The next ids ``[b]`` on the host (they are needed there anyway, to stream and stop)."""
    if settings.do_sample:
        return paddle.multinomial(F.softmax(scores, axis=-1), num_samples=1).squeeze(-1).numpy()
    if scores.place.is_cpu_place():  # numpy's argmax over 92544 scores is ~10x faster than Paddle's CPU one
        return scores.numpy().argmax(-1)
    return paddle.argmax(scores, axis=-1).numpy()


def choose_greedy_on_host(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """Greedy ids ``[b]`` from float32 ``logits`` ``[b, V]`` (modified in place) and the
    ``seen`` ids ``[b, n]``: :func:`apply_repetition_penalty` then argmax, in the same float32
    arithmetic (tested equal), but in numpy. For logits already on the host (a CPU model): the
    device version costs ~6 framework ops per token, more than the choice itself."""
    if penalty != 1.0 and seen.shape[1]:
        present = np.take_along_axis(logits, seen, axis=1)
        factor = np.float32(penalty)
        np.put_along_axis(logits, seen, np.where(present < 0, present * factor, present / factor), axis=1)
    return logits.argmax(-1)


def generate_tokens(
    model,
    inputs_embeds: paddle.Tensor,
    settings: GenerationSettings,
    seen: paddle.Tensor,
    im_mask: Optional[paddle.Tensor] = None,
    attention_mask: Optional[paddle.Tensor] = None,
    output_scores: bool = False,
) -> Iterator[Tuple[np.ndarray, Optional[paddle.Tensor]]]:
    """Yield the next token ids ``[b]`` (numpy, on the host) and, if asked, their processed
    scores ``[b, V]``, one step at a time, until every row produced an EOS or
    ``max_new_tokens`` is reached.

    ``seen`` ``[b, n]`` int64: the ids the repetition penalty starts from (a row shorter than
    others repeats one of its ids). ``attention_mask`` ``[b, T]`` marks left padding;
    finished rows keep receiving ``pad_token_id``. The prompt runs once (prefill), then one
    token per row per step through the KV cache; the only device→host transfer per step is
    the chosen ids (greedy on a CPU: the last logits, chosen in numpy). Generated tokens are
    text: no ``im_mask``, so no PLoRA.
    """
    settings.validate()
    b, t = inputs_embeds.shape[:2]
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, t + 1, inputs_embeds.dtype)
    positions = None if attention_mask is None else real_positions(attention_mask)
    with paddle.no_grad():
        logits = model(inputs_embeds=inputs_embeds, im_mask=im_mask, attention_mask=attention_mask,
                       position_ids=positions, past_key_values=cache, logits_to_keep=1).logits
    yield from _continue(model, logits, cache, attention_mask, positions, settings, seen, output_scores)


def generate_rows(
    model,
    rows: Sequence[Tuple[paddle.Tensor, Optional[paddle.Tensor]]],
    settings: GenerationSettings,
    seen: paddle.Tensor,
    output_scores: bool = False,
    on_first: Optional[Callable[[int, int], None]] = None,
) -> Iterator[Tuple[np.ndarray, Optional[paddle.Tensor]]]:
    """:func:`generate_tokens` for several prompts ``rows`` (each ``(embeds [1, T_i, H], im_mask
    [1, T_i] or None)``): each prompt prefilled on its own, then the rows decoded together as one
    left-padded batch (a per-row attention mask and positions, as a left-padded prefill would
    leave them). No padding position runs through the model, and each row's first token comes from
    exactly the forward ``chat()`` runs for that prompt alone. Each row's first token is chosen as
    soon as its prompt is prefilled, and ``on_first(row, token)``, if given, hears of it then (a
    server streams it before the next prompt's prefill); the first yield repeats them for every row.
    Sampled rows draw their first token one row at a time. One row: :func:`generate_tokens`."""
    if len(rows) == 1:  # chat()'s own path: no cache copy, no attention mask
        steps = generate_tokens(model, rows[0][0], settings, seen, im_mask=rows[0][1], output_scores=output_scores)
        try:
            for step, item in enumerate(steps):
                if step == 0 and on_first is not None:
                    on_first(0, int(item[0][0]))
                yield item
        finally:
            steps.close()
        return
    settings.validate()
    cfg = model.config
    on_host = _chooses_on_host(settings, output_scores, rows[0][0])
    seen_host = seen.numpy() if on_host else None
    caches, firsts, first_scores = [], [], []
    with paddle.no_grad():
        for i, (embeds, im_mask) in enumerate(rows):
            cache = KVCache(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, cfg.head_dim, embeds.shape[1] + 1,
                            embeds.dtype)
            logits = model(inputs_embeds=embeds, im_mask=im_mask, past_key_values=cache, logits_to_keep=1).logits
            caches.append(cache)
            chosen, scores = _pick(logits, seen[i : i + 1], None if seen_host is None else seen_host[i : i + 1],
                                   settings, on_host)
            firsts.append(chosen)
            first_scores.append(scores)
            if on_first is not None:
                on_first(i, int(chosen[0]))
        cache = KVCache.stack_left_padded(caches)
    del caches
    lengths = [int(embeds.shape[1]) for embeds, _ in rows]
    attention_mask = paddle.to_tensor([[0] * (cache.length - n) + [1] * n for n in lengths], dtype="int64")
    positions = paddle.to_tensor([[n - 1] for n in lengths], dtype="int64")  # each row's last real position
    first = (np.concatenate(firsts), paddle.concat(first_scores) if output_scores else None)
    yield from _continue(model, None, cache, attention_mask, positions, settings, seen, output_scores, first)


def _chooses_on_host(settings: GenerationSettings, output_scores: bool, like: paddle.Tensor) -> bool:
    """A greedy CPU generation penalises and chooses in numpy (the logits go to the host anyway)."""
    return not settings.do_sample and not output_scores and like.place.is_cpu_place()


def _pick(logits: paddle.Tensor, seen: paddle.Tensor, seen_host: Optional[np.ndarray], settings: GenerationSettings,
          on_host: bool) -> Tuple[np.ndarray, Optional[paddle.Tensor]]:
    """The next ids ``[b]`` from the last logits ``[b, 1, V]`` and, off the host path, their scores."""
    if on_host:
        return choose_greedy_on_host(logits.numpy()[:, -1], seen_host, settings.repetition_penalty), None
    scores = process_scores(logits[:, -1], seen, settings)
    return _choose(scores, settings), scores


def _continue(model, logits: Optional[paddle.Tensor], cache: KVCache, attention_mask: Optional[paddle.Tensor],
              positions: Optional[paddle.Tensor], settings: GenerationSettings, seen: paddle.Tensor,
              output_scores: bool, first: Optional[Tuple[np.ndarray, Optional[paddle.Tensor]]] = None,
              ) -> Iterator[Tuple[np.ndarray, Optional[paddle.Tensor]]]:
    """The decode loop after a prefill: ``logits`` ``[b, 1, V]`` of each row's last prompt position
    (or ``first``: the first ids and scores, already chosen from them), ``cache`` holding the
    prompts, ``attention_mask`` ``[b, T]`` (left padding) and ``positions`` (whose last column is
    each row's last position) or both ``None``."""
    b = cache.batch_size
    eos = np.asarray(list(settings.eos_token_ids), dtype=np.int64)
    finished = np.zeros([b], dtype=bool)
    on_host = _chooses_on_host(settings, output_scores, cache.keys[0])
    seen_host = seen.numpy() if on_host else None
    with paddle.no_grad():
        for step in range(settings.max_new_tokens):
            if step == 0 and first is not None:
                chosen, scores = first
            else:
                chosen, scores = _pick(logits, seen, seen_host, settings, on_host)
            token = np.where(finished, settings.pad_token_id, chosen).astype(np.int64)
            yield token, (scores if output_scores else None)
            finished |= (token[:, None] == eos[None, :]).any(-1)  # np.isin costs ~10x more on a few ids
            if finished.all() or step == settings.max_new_tokens - 1:
                return
            token_tensor = paddle.to_tensor(token[:, None])
            if on_host:
                seen_host = np.concatenate([seen_host, token[:, None]], axis=1)
            else:
                seen = paddle.concat([seen, token_tensor], axis=1)
            if attention_mask is not None:
                attention_mask = paddle.concat([attention_mask, paddle.ones([b, 1], dtype=attention_mask.dtype)], 1)
                positions = positions[:, -1:] + 1
            logits = model(input_ids=token_tensor, attention_mask=attention_mask, position_ids=positions,
                           past_key_values=cache, logits_to_keep=1).logits


def real_positions(attention_mask: paddle.Tensor) -> paddle.Tensor:
    """Position ids ``[b, T]`` of left-padded rows: real tokens count from 0, pads sit at 0. (The
    official rotary ignores position ids, so its padded rows are shifted by their padding; here a
    row's answer does not depend on what it was batched with.)"""
    return paddle.clip(paddle.cumsum(attention_mask.astype("int64"), axis=-1) - 1, min=0)


def seen_ids(rows: Sequence[Sequence[int]]) -> paddle.Tensor:
    """``[b, n]`` int64 ids the repetition penalty starts from; shorter rows repeat their
    first id (a repeated id changes nothing)."""
    width = max(1, max(len(r) for r in rows))
    table = np.zeros([len(rows), width], dtype=np.int64)
    for i, ids in enumerate(rows):
        ids = [int(x) for x in ids] or [0]
        table[i, : len(ids)] = ids
        table[i, len(ids):] = ids[0]
    return paddle.to_tensor(table)


@contextlib.contextmanager
def seeded(seed: Optional[int]) -> Iterator[None]:
    """Seed Paddle's generator for one generation and restore its state afterwards."""
    if seed is None:
        yield
        return
    state = paddle.get_rng_state()
    paddle.seed(seed)
    try:
        yield
    finally:
        paddle.set_rng_state(state)
