"""Reference ids for ``tests/test_beam_search.py``: transformers 4.33.2's own ``generate(num_beams=K)``
(``beam_search`` + ``BeamSearchScorer``, the code the official model runs) driving *this* model's
logits on the golden fixture.

transformers' loop runs on a torch stand-in model whose forward recomputes the whole sequence with
the Paddle model (prompt embeddings + the ids generated so far, no cache) and returns its last
logits; so the search algorithm is transformers' and the numbers are ours. Needs a separate
virtualenv with torch and transformers 4.33.2 next to this project (not in the lock)::

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.13.0 transformers==4.33.2
    /tmp/refvenv/bin/pip install -e ".[cpu]" tokenizers==0.13.3
    /tmp/refvenv/bin/python scripts/beam_reference.py ../shared/fixtures/ixc2-tiny > tests/data/beam_search_reference.json
"""
from __future__ import annotations

import json
import sys

import numpy as np
import paddle
import torch
import transformers
from transformers.modeling_outputs import CausalLMOutputWithPast

sys.path.insert(0, "tests")
from beam_cases import CASES, prompt_inputs  # noqa: E402
from conftest import tiny_overrides  # noqa: E402
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer  # noqa: E402
from paddlemix.models.internlm_xcomposer2.checkpoint import load_config  # noqa: E402
from paddlemix.models.internlm_xcomposer2.generation import real_positions  # noqa: E402

class Standin(transformers.PreTrainedModel):
    """transformers' view of the Paddle model: full recomputation every step."""

    config_class = transformers.PretrainedConfig

    def __init__(self, config, model, embeds: np.ndarray, im_mask: np.ndarray, mask: np.ndarray, text: bool):
        super().__init__(config)
        self.paddle_model, self.embeds, self.im_mask, self.mask, self.text = model, embeds, im_mask, mask, text
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, attention_mask=None, **kwargs):
        return {"input_ids": input_ids}

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        ids = input_ids.numpy()
        beams = ids.shape[0] // self.embeds.shape[0]
        rows = np.arange(ids.shape[0]) // beams  # transformers keeps each row's beams together
        with paddle.no_grad():
            if self.text:  # the prompt ids and the generated ones
                full = self.paddle_model.model.embed(paddle.to_tensor(ids))
                new = ids.shape[1] - self.mask.shape[1]
            else:  # the BOS seed, then the generated ids, after the prompt embeddings
                generated = self.paddle_model.model.embed(paddle.to_tensor(ids[:, 1:]))
                full = paddle.concat([paddle.to_tensor(self.embeds[rows]), generated], axis=1)
                new = ids.shape[1] - 1
            mask = np.concatenate([self.mask[rows], np.ones([len(rows), new], dtype=np.int64)], axis=1)
            im_mask = np.concatenate([self.im_mask[rows], np.zeros([len(rows), new], dtype=bool)], axis=1)
            mask_t = paddle.to_tensor(mask)
            logits = self.paddle_model(inputs_embeds=full, attention_mask=mask_t, im_mask=paddle.to_tensor(im_mask),
                                       position_ids=real_positions(mask_t)).logits[:, -1:]
        return CausalLMOutputWithPast(logits=torch.from_numpy(logits.numpy()))


def main(tiny_dir: str) -> None:
    config = load_config(tiny_dir, **tiny_overrides())
    model = InternLMXComposer2ForCausalLM.from_pretrained(tiny_dir, config=config)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(tiny_dir)
    hf_config = transformers.PretrainedConfig(vocab_size=config.vocab_size, bos_token_id=1, eos_token_id=2,
                                              pad_token_id=2, is_decoder=True)
    results = []
    for case in CASES:
        embeds, im_mask, mask, ids = prompt_inputs(model, tokenizer, case["prompts"], tiny_dir)
        standin = Standin(hf_config, model, embeds, im_mask, mask, text=ids is not None).eval()
        eos = [tokenizer.eos_token_id, tokenizer.im_end_id]
        if case["extra_eos"] == "frequent":  # the greedy path's third new token: beams finish early
            greedy = model.generate(input_ids=paddle.to_tensor(ids), max_new_tokens=3) if ids is not None else \
                model.generate(inputs_embeds=paddle.to_tensor(embeds[:1]), im_mask=paddle.to_tensor(im_mask[:1]),
                               attention_mask=paddle.to_tensor(mask[:1]), max_new_tokens=3)
            eos.append(int(greedy[0, -1]))
        elif case["extra_eos"] == "top3":  # the three likeliest first tokens of the first row
            with paddle.no_grad():
                logits = model(inputs_embeds=paddle.to_tensor(embeds[:1]), im_mask=paddle.to_tensor(im_mask[:1])).logits
            eos += [int(i) for i in np.argsort(-logits.numpy()[0, -1])[:3]]
        common = dict(num_beams=case["num_beams"], do_sample=False, max_new_tokens=case["max_new_tokens"],
                      repetition_penalty=case["repetition_penalty"], length_penalty=case["length_penalty"],
                      eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, attention_mask=torch.from_numpy(mask),
                      early_stopping=case.get("early_stopping", False))
        with torch.no_grad():
            if ids is not None:
                out = standin.generate(input_ids=torch.from_numpy(ids), **common)
            else:
                out = standin.generate(inputs_embeds=torch.zeros(embeds.shape[:2] + (1,)), **common)
        results.append({**case, "eos_token_id": eos, "expected": out.numpy().tolist()})
    json.dump({"generator": f"transformers {transformers.__version__} beam_search driving this model "
                            "(scripts/beam_reference.py)", "cases": results}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
