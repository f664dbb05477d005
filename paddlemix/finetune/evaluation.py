"""Generation-based evaluation: answer each held-out question greedily, compare with the
reference answer (``eval_with_do_generation``)."""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = ["normalise_answer", "answer_samples", "generation_accuracy"]

# Budget beyond the reference answer's own length: room for a longer (wrong) answer
# to show, without paying for max_new_tokens=1024 on every question.
EXTRA_NEW_TOKENS = 8


def normalise_answer(text: str) -> str:
    """Case, surrounding whitespace and trailing punctuation do not make an answer wrong."""
    return re.sub(r"[\s.!。！]+$", "", text.strip().lower())


def answer_samples(model, tokenizer, samples: Sequence, meta_instruction: Optional[str] = None,
                   max_new_tokens: Optional[int] = None) -> List[Tuple[str, str, str]]:
    """``(question, model answer, reference)`` for the last turn of every sample, the earlier
    turns given as history and all the sample's images passed. ``meta_instruction``: the chat's
    system prompt (None: the official default); ``max_new_tokens`` (None: the reference's length
    plus ``EXTRA_NEW_TOKENS``)."""
    results = []
    extra: Dict[str, Any] = {} if meta_instruction is None else {"meta_instruction": meta_instruction}
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            *history, (question, reference) = sample.conversation
            budget = max_new_tokens
            if budget is None:
                budget = len(tokenizer(reference, add_special_tokens=False)["input_ids"]) + EXTRA_NEW_TOKENS
            answer, _ = model.chat(tokenizer, question, image=list(sample.images) or None, history=list(history),
                                   do_sample=False, max_new_tokens=budget, **extra)
            results.append((question, answer, reference))
    finally:
        if was_training:
            model.train()
    return results


def generation_accuracy(model, tokenizer, samples: Sequence) -> float:
    results = answer_samples(model, tokenizer, samples)
    correct = sum(normalise_answer(a) == normalise_answer(r) for _, a, r in results)
    accuracy = correct / max(len(results), 1)
    logger.info("generation accuracy %.3f (%d/%d)", accuracy, correct, len(results))
    return accuracy
