"""Golden parity of the model core against the official implementation (fixture ixc2-tiny)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM
from paddlemix.models.internlm_xcomposer2.vision import resize_position_table

ATOL = 1e-4


def logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    top = x.max(axis, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(axis, keepdims=True))).squeeze(axis)


def _check_logits(logits: np.ndarray, golden: dict, prefix: str) -> None:
    """Every position: argmax exact; top-10 values (at the golden ids), logsumexp, mean, last row."""
    np.testing.assert_array_equal(logits.argmax(-1), golden[f"{prefix}_logits_argmax"])
    idx = golden[f"{prefix}_logits_topk_indices"]
    np.testing.assert_allclose(np.take_along_axis(logits, idx, -1), golden[f"{prefix}_logits_topk_values"], atol=ATOL, rtol=0)
    ours_top = np.sort(np.argsort(-logits, -1)[:, :10], -1)
    assert (ours_top == np.sort(idx, -1)).mean() > 0.99  # ties at the 10th value may swap ids
    np.testing.assert_allclose(logsumexp(logits, -1), golden[f"{prefix}_logits_logsumexp"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits.mean(-1), golden[f"{prefix}_logits_mean"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logits[-1], golden[f"{prefix}_logits_last"], atol=ATOL, rtol=0)


def test_position_table_resize(golden):
    out = resize_position_table(paddle.to_tensor(golden["posemb_interp_in"]), 16).numpy()
    assert out.shape == golden["posemb_interp_out"].shape
    np.testing.assert_allclose(out, golden["posemb_interp_out"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("img", ["img1", "img2"])
def test_vit_and_encode_img(tiny_model, golden, img, softmax_kernels):
    pixels = paddle.to_tensor(golden[f"{img}_pixel_values"])[None]
    with paddle.no_grad():
        feats = tiny_model.vit(pixels)[0].numpy()
        embeds = tiny_model.encode_img(pixels)[0].numpy()
    np.testing.assert_allclose(feats, golden[f"{img}_vit_features"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(embeds, golden[f"{img}_encode_img"], atol=ATOL, rtol=0)


def test_encode_img_from_file_matches_pixels(tiny_model, tiny_dir, golden):
    with paddle.no_grad():
        embeds = tiny_model.encode_img(str(tiny_dir / "img1.png"))[0].numpy()
    np.testing.assert_allclose(embeds, golden["img1_encode_img"], atol=ATOL, rtol=0)


def test_text_forward(tiny_model, golden, norm_kernels, softmax_kernels):
    ids = paddle.to_tensor(golden["text_input_ids"])[None]
    with paddle.no_grad():
        out = tiny_model(input_ids=ids, output_hidden_states=True)
    hidden = np.stack([h[0].numpy() for h in out.hidden_states])
    np.testing.assert_allclose(hidden, golden["text_hidden_states"], atol=ATOL, rtol=0)
    _check_logits(out.logits[0].numpy(), golden, "text")


def test_chat_forward_with_plora(tiny_model, golden, norm_kernels, softmax_kernels):
    embeds = paddle.to_tensor(golden["chat_inputs_embeds"])[None]
    im_mask = paddle.to_tensor(golden["chat_im_mask"])[None]
    with paddle.no_grad():
        out = tiny_model(inputs_embeds=embeds, im_mask=im_mask, output_hidden_states=True)
        no_lora = tiny_model(inputs_embeds=embeds, output_hidden_states=True)
    hidden = np.stack([h[0].numpy() for h in out.hidden_states])
    np.testing.assert_allclose(hidden, golden["chat_hidden_states"], atol=ATOL, rtol=0)
    _check_logits(out.logits[0].numpy(), golden, "chat")
    # the PLoRA branch matters on this fixture: without im_mask the numbers differ
    assert np.abs(no_lora.hidden_states[-1][0].numpy() - golden["chat_hidden_states"][-1]).max() > 1e-3


def test_training_loss_and_plora_gradients(tiny_model, golden):
    tiny_model.eval()  # as the golden run: dropout off
    out = tiny_model(
        inputs_embeds=paddle.to_tensor(golden["train_inputs_embeds"])[None],
        im_mask=paddle.to_tensor(golden["train_im_mask"])[None],
        attention_mask=paddle.to_tensor(golden["train_attention_mask"])[None],
        labels=paddle.to_tensor(golden["train_labels"])[None],
    )
    np.testing.assert_allclose(float(out.loss), float(golden["train_loss"]), atol=ATOL, rtol=0)
    out.loss.backward()
    params = dict(tiny_model.named_parameters())
    names = [k[len("grad__"):] for k in golden if k.startswith("grad__")]
    assert len(names) == 20
    for name in names:
        grad = params[name].grad
        assert grad is not None, name
        # Paddle stores Linear weights [in, out]: the transpose of torch's gradient
        np.testing.assert_allclose(grad.numpy().T, golden["grad__" + name], atol=ATOL, rtol=0, err_msg=name)
    assert all(p.grad is None for n, p in params.items() if n.startswith("vit.")), "the ViT is frozen"


def test_text_only_training_loss(tiny_model, golden):
    out = tiny_model(
        input_ids=paddle.to_tensor(golden["train_text_input_ids"])[None],
        labels=paddle.to_tensor(golden["train_text_labels"])[None],
    )
    np.testing.assert_allclose(float(out.loss), float(golden["train_text_loss"]), atol=ATOL, rtol=0)


def test_save_and_reload_identical(tiny_model, golden, tmp_path):
    tiny_model.save_pretrained(str(tmp_path))
    assert (tmp_path / "model_state.pdparams").is_file() and (tmp_path / "config.json").is_file()
    reloaded = InternLMXComposer2ForCausalLM.from_pretrained(str(tmp_path))
    original = tiny_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), original[name].numpy(), err_msg=name)
    embeds = paddle.to_tensor(golden["chat_inputs_embeds"])[None]
    im_mask = paddle.to_tensor(golden["chat_im_mask"])[None]
    with paddle.no_grad():
        a = tiny_model(inputs_embeds=embeds, im_mask=im_mask).logits.numpy()
        b = reloaded(inputs_embeds=embeds, im_mask=im_mask).logits.numpy()
    np.testing.assert_array_equal(a, b)


def test_bfloat16_load_is_dtype_plumbing(tiny_dir, tiny_config):
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config, dtype="bfloat16")
    dtypes = {str(p.dtype) for p in model.parameters()}
    assert dtypes == {"paddle.bfloat16"}
    ref = InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)
    w16 = model.model.tok_embeddings.weight.astype("float32").numpy()
    w32 = ref.model.tok_embeddings.weight.numpy()
    np.testing.assert_allclose(w16, w32, rtol=2**-8, atol=0)  # bf16 rounding only


def test_random_init_from_config(tiny_config):
    paddle.seed(0)
    model = InternLMXComposer2ForCausalLM(tiny_config)
    for name, param in model.named_parameters():
        if name.endswith("Plora_B.weight"):
            assert not param.numpy().any(), f"{name} must start at exactly zero"
    assert model.model.layers[0].attention.wqkv.weight.numpy().std() > 0
    ids = paddle.to_tensor([[1, 2, 3, 4]])
    with paddle.no_grad():
        assert model(input_ids=ids).logits.shape == [1, 4, tiny_config.vocab_size]


def test_training_mode_loss_uses_only_labelled_rows(tiny_model, golden):
    """Train mode computes logits only where labels are: same loss and gradients as the golden
    (eval-mode, full-logits) run, with dropout switched off to compare."""
    tiny_model.train()
    for layer in tiny_model.sublayers():
        if isinstance(layer, paddle.nn.Dropout):
            layer.p = 0.0
    out = tiny_model(
        inputs_embeds=paddle.to_tensor(golden["train_inputs_embeds"])[None],
        im_mask=paddle.to_tensor(golden["train_im_mask"])[None],
        labels=paddle.to_tensor(golden["train_labels"])[None],
    )
    assert out.logits is None
    np.testing.assert_allclose(float(out.loss), float(golden["train_loss"]), atol=ATOL, rtol=0)
    out.loss.backward()
    params = dict(tiny_model.named_parameters())
    for key in [k for k in golden if k.startswith("grad__")]:
        np.testing.assert_allclose(params[key[6:]].grad.numpy().T, golden[key], atol=ATOL, rtol=0, err_msg=key)
