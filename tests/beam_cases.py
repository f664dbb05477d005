"""The beam-search cases shared by ``tests/test_beam_search.py`` and ``scripts/beam_reference.py``
(which records transformers 4.33.2's results for them in ``tests/data/beam_search_reference.json``)."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import paddle

CASES: List[Dict[str, Any]] = [
    # prompts: [query, image (fixture file) or None]; an extra eos id makes hypotheses end early
    {"name": "image-3-beams", "prompts": [["<ImageHere>Describe it.", "img1.png"]], "num_beams": 3,
     "max_new_tokens": 12, "repetition_penalty": 1.005, "length_penalty": 1.0, "extra_eos": None},
    {"name": "image-3-beams-early-eos", "prompts": [["<ImageHere>Describe it.", "img1.png"]], "num_beams": 3,
     "max_new_tokens": 12, "repetition_penalty": 1.005, "length_penalty": 1.0, "extra_eos": "frequent"},
    {"name": "batch-2-rows-padded", "prompts": [["<ImageHere>Describe it in detail please.", "img1.png"],
                                                ["<ImageHere>Hi", "img2.png"]],
     "num_beams": 2, "max_new_tokens": 10, "repetition_penalty": 1.005, "length_penalty": 1.0, "extra_eos": "frequent"},
    {"name": "text-4-beams-length-penalty", "prompts": [["Hello, who are you?", None]], "num_beams": 4,
     "max_new_tokens": 10, "repetition_penalty": 1.005, "length_penalty": 2.0, "extra_eos": "frequent"},
    # the three likeliest first tokens are EOS ids too: more than K of the best 2K candidates end a
    # hypothesis (transformers then looks at max(2, 1 + #EOS)·K candidates)
    {"name": "many-eos-2-beams", "prompts": [["<ImageHere>Describe it.", "img1.png"]], "num_beams": 2,
     "max_new_tokens": 8, "repetition_penalty": 1.005, "length_penalty": 1.0, "extra_eos": "top3"},
    {"name": "many-eos-early-stopping-never", "prompts": [["<ImageHere>Describe it.", "img1.png"]], "num_beams": 3,
     "max_new_tokens": 8, "repetition_penalty": 1.005, "length_penalty": 1.5, "extra_eos": "top3",
     "early_stopping": "never"},
    {"name": "mmbench-like-5-beams", "prompts": [["<ImageHere>Which option? A. cat B. dog", "img1.png"]],
     "num_beams": 5, "max_new_tokens": 5, "repetition_penalty": 1.0, "length_penalty": 1.0, "extra_eos": None},
]


def prompt_inputs(model, tokenizer, prompts, tiny_dir):
    """Left-padded prompt embeddings, im_mask and attention mask (numpy), as the batch example builds them."""
    rows = []
    for query, image in prompts:
        if image is None:
            ids = model.build_inputs(tokenizer, query, [], "")["input_ids"]
            rows.append((model.model.embed(ids).numpy()[0], np.zeros(ids.shape[1], bool), ids.numpy()[0]))
        else:
            inputs, im_mask = model.interleav_wrap_chat(tokenizer, query, f"{tiny_dir}/{image}", [])
            rows.append((inputs["inputs_embeds"].numpy()[0], im_mask.numpy()[0], None))
    longest = max(r[0].shape[0] for r in rows)
    pad = model.model.embed(paddle.to_tensor([[tokenizer.pad_token_id]])).numpy()[0, 0]
    embeds = np.stack([np.concatenate([np.tile(pad, (longest - len(e), 1)), e]) for e, _, _ in rows])
    im_mask = np.stack([np.concatenate([np.zeros(longest - len(m), bool), m]) for _, m, _ in rows])
    mask = np.stack([np.concatenate([np.zeros(longest - len(m), np.int64), np.ones(len(m), np.int64)])
                     for _, m, _ in rows])
    ids = None if rows[0][2] is None else np.stack([r[2] for r in rows])
    return embeds, im_mask, mask, ids
