"""Pure decoder functions: RoPE (dynamic NTK as a function of length), masks, grouped attention,
and cached decoding = full recomputation."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Config
from paddlemix.models.internlm_xcomposer2.internlm2 import causal_mask, grouped_attention
from paddlemix.models.internlm_xcomposer2.rope import (
    apply_rotary,
    rope_base,
    rope_inv_freq,
    rotary_cos_sin,
    rotary_for,
)
from paddlemix.models.internlm_xcomposer2.kv_cache import KVCache


def test_inv_freq_matches_official(tiny_config, golden):
    inv = rope_inv_freq(tiny_config.head_dim, rope_base(tiny_config, 15)).numpy()
    np.testing.assert_allclose(inv, golden["text_rope_inv_freq_after"], rtol=1e-6)


def test_dynamic_ntk_base_is_a_pure_function_of_length():
    cfg = InternLMXComposer2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=100, rope_theta=10000.0,
                                   rope_scaling={"type": "dynamic", "factor": 2.0})
    assert rope_base(cfg, 100) == 10000.0
    d = cfg.head_dim
    assert rope_base(cfg, 150) == pytest.approx(10000.0 * (2.0 * 150 / 100 - 1.0) ** (d / (d - 2)))
    assert rope_base(cfg, 50) == 10000.0  # no state carried over from the long call


def test_apply_rotary_is_rotate_half():
    x = paddle.randn([1, 3, 2, 4])
    cos, sin = rotary_cos_sin(paddle.arange(3, dtype="float32"), rope_inv_freq(4, 10000.0))
    out = apply_rotary(x, cos.unsqueeze(0).unsqueeze(2), sin.unsqueeze(0).unsqueeze(2)).numpy()
    xn, c, s = x.numpy(), cos.numpy()[None, :, None], sin.numpy()[None, :, None]
    rotated = np.concatenate([-xn[..., 2:], xn[..., :2]], -1)
    np.testing.assert_allclose(out, xn * c + rotated * s, atol=1e-6)
    np.testing.assert_allclose(out[:, 0], xn[:, 0], atol=1e-6)  # position 0 is unrotated


def test_single_token_rotation_matrix_equals_rotate_half():
    cfg = InternLMXComposer2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    x = paddle.randn([2, 1, 2, 3, 16])
    by_matrix = rotary_for(cfg, 37, 1, None)(x).numpy()
    cos, sin = rotary_cos_sin(paddle.to_tensor([37.0]), rope_inv_freq(16, rope_base(cfg, 38)))
    np.testing.assert_allclose(by_matrix, apply_rotary(x, cos, sin).numpy(), atol=1e-5)


def test_decode_rotations_come_from_a_table_that_is_rebuilt_when_it_runs_out_or_the_base_changes():
    from paddlemix.models.internlm_xcomposer2.rope import ROTATION_BLOCK

    cfg = InternLMXComposer2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=40, rope_scaling={"type": "dynamic", "factor": 2.0})
    holder = KVCache(1, 1, 2, 16)
    x = paddle.randn([1, 1, 2, 3, 16])
    tables = []
    for position in range(39 - ROTATION_BLOCK, 42):  # past one block, then past the NTK limit (40)
        rotated = rotary_for(cfg, position, 1, None, scale=0.5, holder=holder)(x).numpy()
        tables.append(holder.rotations)
        cos, sin = rotary_cos_sin(paddle.to_tensor([float(position)]), rope_inv_freq(16, rope_base(cfg, position + 1)))
        np.testing.assert_allclose(rotated, 0.5 * apply_rotary(x, cos, sin).numpy(), atol=1e-5)
        standalone = rotary_for(cfg, position, 1, None, scale=0.5).matrix.numpy()
        np.testing.assert_array_equal(holder.rotations.at(position).numpy(), standalone)
    # one table for the first block; at its end, one that stops at the NTK limit (40); past the
    # limit the base changes with every length, so one matrix per step
    assert len({id(t) for t in tables[:ROTATION_BLOCK]}) == 1
    assert tables[ROTATION_BLOCK] is not tables[0]
    assert tables[-1] is not tables[-2] and tables[-2] is not tables[-3]
    assert [t.matrices.shape[0] for t in tables[ROTATION_BLOCK:]] == [1, 1, 1]


def test_causal_mask_with_padding_and_cache_tail():
    assert causal_mask(1, 5, 6) is None
    mask = causal_mask(3, 0, 3, paddle.to_tensor([[0, 1, 1]])).numpy()[0]
    allowed = mask == 0
    np.testing.assert_array_equal(allowed, [[False, False, False], [False, True, False], [False, True, True]])
    tail = causal_mask(1, 4, 8).numpy()[0, 0]  # a cache of capacity 8 holding 5 positions
    np.testing.assert_array_equal(tail == 0, [True] * 5 + [False] * 3)


def test_grouped_attention_equals_repeated_kv():
    paddle.seed(0)
    q = paddle.randn([2, 3, 4, 8])
    k, v = paddle.randn([2, 2, 5, 8]), paddle.randn([2, 2, 5, 8])
    out = grouped_attention(q.reshape([2, 3, 2, 2, 8]), k, v, None).numpy().reshape([2, 3, 4, 8])
    qn = q.numpy().transpose(0, 2, 1, 3)
    kr, vr = np.repeat(k.numpy(), 2, axis=1), np.repeat(v.numpy(), 2, axis=1)  # head h uses kv h // 2
    s = qn @ kr.transpose(0, 1, 3, 2) / np.sqrt(8)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, (p @ vr).transpose(0, 2, 1, 3), atol=1e-5)


def test_kv_cache_grows_by_blocks_and_keeps_contents():
    from paddlemix.models.internlm_xcomposer2.kv_cache import BLOCK

    cache = KVCache(1, 1, 2, 4, capacity=2)
    assert cache.capacity == BLOCK
    k = paddle.randn([1, 2, BLOCK - 1, 4])
    cache.reserve(BLOCK - 1)
    cache.update(0, k, k)
    cache.commit(BLOCK - 1)
    cache.reserve(3)
    assert cache.capacity == 2 * BLOCK
    np.testing.assert_array_equal(cache.keys[0][:, :, : BLOCK - 1].numpy(), k.numpy())
    assert not cache.keys[0][:, :, BLOCK - 1 :].numpy().any()


def test_single_row_caches_stack_left_padded():
    """Each row's prompt ends at the longest one's end; the left padding and the free tail are zeros."""
    caches, prompts = [], []
    for length in (3, 5):
        cache = KVCache(2, 1, 2, 4)
        keys = [paddle.randn([1, 2, length, 4]) for _ in range(2)]
        for layer, k in enumerate(keys):
            cache.update(layer, k, -k)
        cache.commit(length)
        caches.append(cache)
        prompts.append(keys)
    stacked = KVCache.stack_left_padded(caches)
    assert (stacked.batch_size, stacked.length) == (2, 5) and stacked.capacity > 5
    for layer in range(2):
        keys, values = stacked.keys[layer].numpy(), stacked.values[layer].numpy()
        assert keys.shape == (2, 2, stacked.capacity, 4)
        np.testing.assert_array_equal(keys[0, :, 2:5], prompts[0][layer].numpy()[0])
        np.testing.assert_array_equal(keys[1, :, :5], prompts[1][layer].numpy()[0])
        np.testing.assert_array_equal(values[1, :, :5], -prompts[1][layer].numpy()[0])
        assert not keys[0, :, :2].any() and not keys[:, :, 5:].any() and not values[:, :, 5:].any()
    assert all(k is None and v is None for c in caches for k, v in zip(c.keys, c.values))  # released
    with pytest.raises(ValueError, match="single-row"):
        KVCache.stack_left_padded([stacked])


@pytest.mark.parametrize("use_image", [False, True])
def test_cached_decoding_equals_full_recomputation(tiny_model, golden, use_image):
    """Prefill then one token at a time through the cache == one full forward, every step."""
    if use_image:
        embeds = paddle.to_tensor(golden["chat_inputs_embeds"])[None]
        im_mask = paddle.to_tensor(golden["chat_im_mask"])[None]
    else:
        ids = paddle.to_tensor(golden["text_input_ids"])[None]
        embeds, im_mask = tiny_model.model.embed(ids), None
    new_ids = [int(i) for i in golden["gen_output_ids"][1:6]]
    with paddle.no_grad():
        out = tiny_model(inputs_embeds=embeds, im_mask=im_mask, use_cache=True)
        cache, steps = out.past_key_values, [out.logits[0, -1].numpy()]
        for tok in new_ids:
            out = tiny_model(input_ids=paddle.to_tensor([[tok]]), past_key_values=cache)
            steps.append(out.logits[0, -1].numpy())
        full_embeds = paddle.concat([embeds, tiny_model.model.embed(paddle.to_tensor([new_ids]))], axis=1)
        full_mask = None if im_mask is None else paddle.concat([im_mask, paddle.zeros([1, len(new_ids)], dtype="bool")], 1)
        full = tiny_model(inputs_embeds=full_embeds, im_mask=full_mask).logits[0].numpy()
    start = embeds.shape[1] - 1
    for i, step in enumerate(steps):
        np.testing.assert_allclose(step, full[start + i], atol=1e-4, rtol=0)


def test_decode_mask_equals_the_expanded_causal_mask():
    from paddlemix.models.internlm_xcomposer2.internlm2 import decode_mask, expand_mask

    fast = decode_mask(4, 8, 2, 2, 3).numpy()
    np.testing.assert_array_equal(fast, expand_mask(causal_mask(1, 4, 8), 2, 2, 3).numpy())
    assert fast.shape == (2, 2, 3, 8)


def test_step_mask_is_updated_in_place_and_equals_a_fresh_decode_mask():
    from paddlemix.models.internlm_xcomposer2.internlm2 import decode_mask, step_mask
    from paddlemix.models.internlm_xcomposer2.kv_cache import BLOCK

    cache = KVCache(1, 2, 2, 4)
    cache.length = BLOCK - 3
    masks = []
    for _ in range(6):  # crosses a capacity block: the mask is rebuilt once, then reused again
        cache.reserve(1)
        masks.append(step_mask(cache, 2, 2, 3))
        np.testing.assert_array_equal(masks[-1].numpy(), decode_mask(cache.length, cache.capacity, 2, 2, 3).numpy())
        cache.commit(1)
    assert [m is masks[0] for m in masks] == [True, True, True, False, False, False]
    assert masks[3] is masks[5]
    cache.select_rows(paddle.to_tensor([1]))  # another batch size: a new mask
    cache.reserve(1)
    assert step_mask(cache, 1, 2, 3).shape == [1, 2, 3, cache.capacity]


def test_gradients_flow_through_a_kv_cache_as_through_one_forward(tiny_model):
    """With gradients on, cached steps write the cache out of place: backward through two decode
    steps works (an in-place write would invalidate what the first step saved) and equals the
    gradient of the same logits from one forward over the whole sequence."""
    ids = paddle.to_tensor([[1, 333, 444, 555, 666, 777]])
    embeds = tiny_model.model.embed(ids).detach()
    embeds.stop_gradient = False
    cache = tiny_model(inputs_embeds=embeds[:, :4], use_cache=True).past_key_values
    first = tiny_model(inputs_embeds=embeds[:, 4:5], past_key_values=cache).logits
    second = tiny_model(inputs_embeds=embeds[:, 5:6], past_key_values=cache).logits
    (first.sum() + second.sum()).backward()
    through_cache = embeds.grad.numpy().copy()
    embeds.clear_gradient()
    full = tiny_model(inputs_embeds=embeds).logits
    (full[:, 4].sum() + full[:, 5].sum()).backward()
    np.testing.assert_allclose(through_cache, embeds.grad.numpy(), rtol=1e-5, atol=1e-3)


def _decode(model, embeds, steps, attention_mask=None):
    """Prefill ``embeds``, then ``steps`` greedy tokens through the cache: every step's logits + the cache."""
    positions = None
    if attention_mask is not None:
        positions = paddle.clip(paddle.cumsum(attention_mask.astype("int64"), axis=-1) - 1, min=0)
    with paddle.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1].numpy()]
        for _ in range(steps):
            token = paddle.to_tensor(logits[-1].argmax(-1)[:, None])
            if attention_mask is not None:
                attention_mask = paddle.concat([attention_mask, paddle.ones_like(attention_mask[:, :1])], 1)
                positions = positions[:, -1:] + 1
            out = model(input_ids=token, attention_mask=attention_mask, position_ids=positions, past_key_values=cache)
            logits.append(out.logits[:, -1].numpy())
    return logits, cache


@pytest.mark.parametrize("padded,packed", [(False, False), (True, False), (True, True)])
def test_fast_decode_step_is_bit_identical_to_the_layers(tiny_model, golden, monkeypatch, padded, packed, norm_kernels,
                                                         row_gemms):
    """The fused decode path (fast_decode) computes exactly what the decoder layers compute:
    one row without padding (host-built mask and rotation) and a left-padded batch, on each
    single-row GEMM kernel (row_gemm: the unpadded row takes NumPy's when chosen), the batch also
    with its weights packed (the serving engine's: both rows take the packed copies), and each
    norm kernel this CPU can run (fused: residual adds folded into the norms), over enough steps to cross rotation tables, a cache capacity block and the NTK limit (the
    state kept in the cache between steps must stay right)."""
    from paddlemix.models.internlm_xcomposer2.kv_cache import BLOCK

    steps = BLOCK
    monkeypatch.setattr(tiny_model.config, "max_position_embeddings", 60)  # past it, the base moves every step

    ids = paddle.to_tensor(golden["text_input_ids"])[None]
    embeds, attention_mask = tiny_model.model.embed(ids), None
    if padded:  # row 0 drops its first 3 tokens, left-padded
        embeds = paddle.concat([embeds, paddle.concat([embeds[:, :3] * 0, embeds[:, 3:]], 1)], 0)
        attention_mask = paddle.to_tensor([[1] * ids.shape[1], [0] * 3 + [1] * (ids.shape[1] - 3)])
    if packed:
        assert tiny_model.pack_for_batched_decoding(2, min_bytes=0) > 0
    try:
        _fast_equals_layers(tiny_model, embeds, steps, attention_mask, monkeypatch, norm_kernels,
                            expect_hosted=packed or (row_gemms == "numpy" and not padded))
    finally:
        tiny_model.unpack_for_batched_decoding()


def _fast_equals_layers(tiny_model, embeds, steps, attention_mask, monkeypatch, norm_kernels, expect_hosted):
    import paddlemix.models.internlm_xcomposer2.internlm2 as internlm2
    from paddlemix.models.internlm_xcomposer2.kv_cache import BLOCK
    from paddlemix.models.internlm_xcomposer2.onednn import PackedWeight

    taken = []
    monkeypatch.setattr(internlm2, "decode_layers", lambda *a: taken.append(1) or fast_decode_layers(*a))
    fast_logits, fast_cache = _decode(tiny_model, embeds, steps, attention_mask)
    assert len(taken) == steps and fast_cache.fast_decode and fast_cache.capacity > BLOCK
    assert fast_cache.fast_decode.fused_norm == (norm_kernels == "fused")
    hosts = [layer[i][2] for layer in fast_cache.fast_decode.layers for i in (1, 2, 4, 5, 6)]
    hosted = [host is not None for host in hosts]
    assert hosted and all(hosted) == expect_hosted and any(hosted) == all(hosted)
    assert all(isinstance(host[0], PackedWeight) == (embeds.shape[0] > 1) for host in hosts if host is not None)
    monkeypatch.setattr(internlm2, "can_decode_fast", lambda *a: False)
    slow_logits, slow_cache = _decode(tiny_model, embeds, steps, attention_mask)
    for fast, slow in zip(fast_logits, slow_logits):
        np.testing.assert_array_equal(fast, slow)
    for layer in range(len(fast_cache.keys)):
        np.testing.assert_array_equal(fast_cache.keys[layer].numpy(), slow_cache.keys[layer].numpy())
        np.testing.assert_array_equal(fast_cache.values[layer].numpy(), slow_cache.values[layer].numpy())


def fast_decode_layers(*args):
    from paddlemix.models.internlm_xcomposer2.fast_decode import decode_layers

    return decode_layers(*args)


def test_fast_decode_is_not_taken_when_a_layer_is_hooked_or_wrapped(tiny_model, golden):
    from paddlemix.models.internlm_xcomposer2.fast_decode import can_decode_fast
    from paddlemix.models.internlm_xcomposer2.plora import PLoRALinear

    layers, norm, rotation = tiny_model.model.layers, tiny_model.model.norm, paddle.eye(4)
    cache = KVCache(len(layers), 1, 2, 4)
    cache.length = 3
    assert not can_decode_fast(layers, norm, 1, cache, None, rotation)  # gradients wanted
    with paddle.no_grad():
        assert can_decode_fast(layers, norm, 1, cache, None, rotation)
        assert not can_decode_fast(layers, norm, 2, KVCache(len(layers), 1, 2, 4), None, None)  # prefill
    calls = []
    hook = layers[1].feed_forward.w2.register_forward_post_hook(lambda *a: calls.append(1))
    try:
        ids = paddle.to_tensor(golden["text_input_ids"])[None]
        _decode(tiny_model, tiny_model.model.embed(ids), 2)
    finally:
        hook.remove()
    assert len(calls) == 3  # prefill + both decode steps ran the hooked layer

    class Wrapped(PLoRALinear):  # e.g. a LoRA wrapper: its forward must run
        pass

    original = layers[0].attention.wo
    wrapped = Wrapped(original.in_features, original.out_features)
    layers[0].attention.wo = wrapped
    try:
        fresh = KVCache(len(layers), 1, 2, 4)
        fresh.length = 3
        with paddle.no_grad():
            assert not can_decode_fast(layers, norm, 1, fresh, None, rotation)
    finally:
        layers[0].attention.wo = original
