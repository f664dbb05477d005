"""Beam search exactly as transformers 4.33 runs it for the official model's ``generate(num_beams=K)``.

The official ``chat(..., num_beams=K)`` and the official benchmark scripts (MMBench: 5 beams) hand
``num_beams`` to transformers' ``generate``, whose ``beam_search`` + ``BeamSearchScorer`` this
reproduces step for step:

* every row is expanded to K beams (consecutive rows); only beam 0 starts live (the others
  at -1e9), so the first step picks K distinct continuations of one sequence;
* per step: ``log_softmax`` of the last logits, *then* the repetition penalty on those
  log-probabilities (transformers applies its logits processors to them), plus each beam's
  running score; the best ``max(2, 1 + #EOS ids)·K`` of the ``K·V`` candidates of a row (enough
  for K that are not an EOS) are visited in order:
  an end-of-sequence token among the first K closes a hypothesis scored
  ``sum_logprobs / len(hypothesis) ** length_penalty`` (its length counts the sequence before
  the EOS, the prompt or BOS seed included); other tokens extend the next K beams;
* a row is done once it holds K hypotheses none of the live beams can beat
  (``early_stopping=False``: best live score ``/ (cur_len + 1) ** length_penalty``; ``"never"``:
  divided by ``max_length ** length_penalty`` when the penalty is positive; ``True``: as soon as K
  are held), or at ``max_length``; then the live beams join the hypotheses and the best one is returned, with
  the *first* EOS id appended if it ended early and ``pad_token_id`` after it.

Unlike transformers, the prompt is prefilled once per row and its cache copied to the K beams
(the K rows are identical, so the numbers are the same), and the cache follows the beams by
gathering rows.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import numpy as np
import paddle

from .generation import apply_repetition_penalty, real_positions
from .kv_cache import KVCache

__all__ = ["BeamSettings", "BeamHypotheses", "SearchStopped", "beam_search", "log_softmax"]

DEAD_BEAM = -1e9  # starting score of beams 1..K-1: transformers' value


class SearchStopped(Exception):
    """``should_stop`` asked the search to end: nobody wants its answer any more."""


@dataclass
class BeamSettings:
    num_beams: int
    max_length: int  # total length of the returned rows (prefix included), as transformers' max_length
    eos_token_ids: Tuple[int, ...]
    pad_token_id: int
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # transformers' values: False, True or "never"

    def validate(self) -> None:
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f'early_stopping must be True, False or "never", got {self.early_stopping!r}')
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not self.eos_token_ids:
            raise ValueError("beam search needs an eos_token_id")

    @property
    def candidates(self) -> int:
        """Candidates visited per row and step: enough for K beams that are not an EOS."""
        return max(2, 1 + len(self.eos_token_ids)) * self.num_beams


@dataclass
class BeamHypotheses:
    """The best ``num_beams`` finished sequences of one row (transformers' ``BeamHypotheses``)."""

    num_beams: int
    length_penalty: float
    early_stopping: Union[bool, str]
    max_length: int
    beams: List[Tuple[float, List[int]]] = field(default_factory=list)
    worst_score: float = 1e9

    def add(self, hypothesis: List[int], sum_logprobs: float) -> None:
        score = sum_logprobs / (len(hypothesis) ** self.length_penalty)
        if len(self.beams) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hypothesis))
            if len(self.beams) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        length = self.max_length if self.early_stopping == "never" and self.length_penalty > 0 else cur_len
        return self.worst_score >= best_sum_logprobs / length ** self.length_penalty

    def best(self) -> List[int]:
        return max(self.beams, key=lambda item: item[0])[1]


def _expand(tensor: Optional[paddle.Tensor], k: int) -> Optional[paddle.Tensor]:
    return None if tensor is None else paddle.repeat_interleave(tensor, k, axis=0)


class _Scorer:
    """Per-row bookkeeping of one batch: hypotheses, done flags, and the choice of next beams."""

    def __init__(self, batch: int, settings: BeamSettings) -> None:
        self.settings = settings
        self.hyps = [BeamHypotheses(settings.num_beams, settings.length_penalty, settings.early_stopping,
                                    settings.max_length) for _ in range(batch)]
        self.done = [False] * batch

    def process(self, sequences: np.ndarray, scores: np.ndarray, tokens: np.ndarray,
                origins: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``scores``/``tokens``/``origins`` ``[B, candidates]`` best candidates (beam within the
        row) → next beam scores, tokens and source rows ``[B·K]``."""
        k, eos = self.settings.num_beams, set(self.settings.eos_token_ids)
        cur_len = sequences.shape[1] + 1
        batch = len(self.hyps)
        next_scores = np.zeros([batch, k], dtype=np.float32)
        next_tokens = np.full([batch, k], self.settings.pad_token_id, dtype=np.int64)
        next_rows = np.zeros([batch, k], dtype=np.int64)
        for b in range(batch):
            if self.done[b]:
                continue  # padded: score 0, pad token, row 0 (as transformers)
            filled = 0
            for rank in range(tokens.shape[1]):
                token, score, row = int(tokens[b, rank]), float(scores[b, rank]), b * k + int(origins[b, rank])
                if token in eos:
                    if rank < k:
                        self.hyps[b].add(sequences[row].tolist(), score)
                else:
                    next_scores[b, filled], next_tokens[b, filled], next_rows[b, filled] = score, token, row
                    filled += 1
                if filled == k:
                    break
            if filled < k:
                raise ValueError(f"beam search: fewer than {k} non-EOS candidates in row {b}")
            self.done[b] = self.done[b] or self.hyps[b].is_done(float(scores[b].max()), cur_len)
        return next_scores.reshape(-1), next_tokens.reshape(-1), next_rows.reshape(-1)

    def finalize(self, sequences: np.ndarray, beam_scores: np.ndarray) -> np.ndarray:
        k, s = self.settings.num_beams, self.settings
        for b, hyps in enumerate(self.hyps):
            if not self.done[b]:
                for row in range(b * k, (b + 1) * k):
                    hyps.add(sequences[row].tolist(), float(beam_scores[row]))
        best = [hyps.best() for hyps in self.hyps]
        width = min(max(len(seq) for seq in best) + 1, s.max_length)
        out = np.full([len(best), width], s.pad_token_id, dtype=np.int64)
        for b, seq in enumerate(best):
            out[b, : len(seq)] = seq
            if len(seq) < width:
                out[b, len(seq)] = s.eos_token_ids[0]  # transformers appends only the first EOS id
        return out


def beam_search(model, inputs_embeds: paddle.Tensor, prefix: np.ndarray, settings: BeamSettings,
                im_mask: Optional[paddle.Tensor] = None, attention_mask: Optional[paddle.Tensor] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> np.ndarray:
    """Best sequence per row, ``[B, T]`` int64: ``prefix`` (what transformers' ``input_ids`` hold
    at the start: the prompt ids, or the BOS seed of an ``inputs_embeds`` prompt; also what the
    repetition penalty starts from) followed by the generated tokens, as described above.

    ``inputs_embeds`` ``[B, L, H]`` is the prompt, ``attention_mask`` ``[B, L]`` its left padding
    (positions then count real tokens only, as in :func:`~.generation.generate_tokens`).
    ``should_stop`` is asked after every step; ``True`` ends the search with :class:`SearchStopped`
    (a server whose client went away: a beam answer is only known at the end)."""
    settings.validate()
    k = settings.num_beams
    b, t = inputs_embeds.shape[:2]
    cfg = model.config
    cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim, t + 1, inputs_embeds.dtype)
    scorer = _Scorer(b, settings)
    sequences = np.repeat(prefix, k, axis=0)
    beam_scores = np.zeros([b, k], dtype=np.float32)
    beam_scores[:, 1:] = DEAD_BEAM
    beam_scores = beam_scores.reshape(-1)
    positions = None if attention_mask is None else real_positions(attention_mask)
    with paddle.no_grad():
        logits = model(inputs_embeds=inputs_embeds, im_mask=im_mask, attention_mask=attention_mask,
                       position_ids=positions, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        logits = _expand(logits, k)
        cache.select_rows(paddle.to_tensor(np.repeat(np.arange(b), k)))
        attention_mask, positions = _expand(attention_mask, k), _expand(positions, k)
        while True:
            rows, tokens, beam_scores = _step(scorer, logits, sequences, beam_scores, settings)
            sequences = np.concatenate([sequences[rows], tokens[:, None]], axis=1)
            if all(scorer.done) or sequences.shape[1] >= settings.max_length:
                return scorer.finalize(sequences, beam_scores)
            if should_stop is not None and should_stop():
                raise SearchStopped(f"stopped after {sequences.shape[1] - prefix.shape[1]} steps")
            rows_tensor = paddle.to_tensor(rows)
            cache.select_rows(rows_tensor)
            if attention_mask is not None:
                attention_mask = paddle.concat([paddle.gather(attention_mask, rows_tensor),
                                                paddle.ones([b * k, 1], dtype=attention_mask.dtype)], axis=1)
                positions = paddle.gather(positions, rows_tensor)[:, -1:] + 1
            logits = model(input_ids=paddle.to_tensor(tokens[:, None]), attention_mask=attention_mask,
                           position_ids=positions, past_key_values=cache, logits_to_keep=1).logits[:, -1]


def log_softmax(logits: paddle.Tensor) -> paddle.Tensor:
    """``x - max - log(sum(exp(x - max)))`` over the last axis, as torch computes it. Paddle's own
    CPU ``log_softmax`` takes seconds on one ``[k, 92544]`` row block (measured 3.7 s for k = 3)."""
    shifted = logits - logits.max(axis=-1, keepdim=True)
    return shifted - paddle.log(paddle.exp(shifted).sum(axis=-1, keepdim=True))


def _step(scorer: _Scorer, logits: paddle.Tensor, sequences: np.ndarray, beam_scores: np.ndarray,
          settings: BeamSettings) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One step's choice: ``(source row, token, new running score)`` of each of the ``B·K`` beams."""
    k = settings.num_beams
    scores = log_softmax(logits.astype("float32"))
    scores = apply_repetition_penalty(scores, paddle.to_tensor(sequences), settings.repetition_penalty)
    scores = scores + paddle.to_tensor(beam_scores)[:, None]
    vocab = scores.shape[-1]
    top_scores, top_ids = paddle.topk(scores.reshape([-1, k * vocab]), settings.candidates, axis=1, largest=True,
                                      sorted=True)
    top_ids = top_ids.numpy()
    new_scores, new_tokens, rows = scorer.process(sequences, top_scores.numpy(), top_ids % vocab, top_ids // vocab)
    return rows, new_tokens, new_scores

