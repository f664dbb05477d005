"""Run by ``test_portability.py`` in a child process, possibly on an emulated CPU without AVX-512.

Greedy image chat (its softmax forced onto oneDNN's kernel), text chat, a batch of two chats
decoded on packed weights (oneDNN's inner product) and two training steps in training mode (with
and without the PLoRA dropout) on the golden fixture, printed as one JSON line; the test
compares them with the golden outputs and each other. Paddle's signal handler is switched off
so that an illegal instruction kills the process at once (with it, the handler hangs under
the emulator instead of exiting).
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import paddle


def main(tiny_dir: str) -> None:
    paddle.base.core.disable_signal_handler()
    from conftest import tiny_overrides
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer
    from paddlemix.models.internlm_xcomposer2.checkpoint import load_config
    from paddlemix.models.internlm_xcomposer2 import kernels
    from paddlemix.models.internlm_xcomposer2.kernels import fused_kernels_on_cpu

    config = load_config(tiny_dir, **tiny_overrides())
    model = InternLMXComposer2ForCausalLM.from_pretrained(tiny_dir, config=config)
    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(tiny_dir)
    golden = json.loads(open(f"{tiny_dir}/golden.json", encoding="utf-8").read())
    with np.load(f"{tiny_dir}/golden.npz") as z:
        train = {k: z[k] for k in ("train_inputs_embeds", "train_im_mask", "train_attention_mask", "train_labels")}
    kernels.SOFTMAX_MIN_ELEMENTS = 0  # every inference softmax on oneDNN's JIT kernel
    image_ids, _ = model.generate_ids(tokenizer, golden["chat"]["query"], image=f"{tiny_dir}/img1.png",
                                      do_sample=False, max_new_tokens=16)
    kernels.SOFTMAX_MIN_ELEMENTS = 1 << 62
    text_query = golden["generate_text_only"]["query"]
    text_ids, _ = model.generate_ids(tokenizer, text_query, do_sample=False, max_new_tokens=16)
    alone, _ = model.chat(tokenizer, text_query, do_sample=False, max_new_tokens=16)
    model.pack_for_batched_decoding(2, min_bytes=0)
    batch_answers = [answer for answer, _ in model.batch_chat(tokenizer, [text_query, "Hi"], do_sample=False,
                                                       max_new_tokens=16)]
    model.unpack_for_batched_decoding()
    # the Trainer's forward (logits of the labelled rows only), first with the PLoRA dropout as
    # configured (its kernels run too), then without it, to compare with the golden (eval-mode) loss
    model.train()
    batch = {"inputs_embeds": paddle.to_tensor(train["train_inputs_embeds"])[None],
             "im_mask": paddle.to_tensor(train["train_im_mask"])[None],
             "attention_mask": paddle.to_tensor(train["train_attention_mask"])[None],
             "labels": paddle.to_tensor(train["train_labels"])[None]}
    losses = []
    for dropout in (config.lora_dropout, 0.0):
        for layer in model.sublayers():
            if isinstance(layer, paddle.nn.Dropout):
                layer.p = dropout
        loss = model(**batch).loss
        loss.backward()
        losses.append(float(loss))
    print(json.dumps({"fused_kernels_on_cpu": fused_kernels_on_cpu(), "image_ids": image_ids, "text_ids": text_ids,
                      "text_alone": alone, "text_batched": batch_answers[0], "dropout": config.lora_dropout,
                      "loss_with_dropout": losses[0], "loss": losses[1]}))


if __name__ == "__main__":
    main(sys.argv[1])
    sys.stdout.flush()
    os._exit(0)  # skips the interpreter's teardown: ~20 s emulated, and nothing the check is about
