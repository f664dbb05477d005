"""The packed oneDNN copy of a weight (onednn.py) and who takes it (row_gemm.pack_weights): the
product is right, a row gives the same bits in a batch as alone, bad shapes are refused, and
packing/unpacking moves exactly the chosen products."""
import numpy as np
import paddle
import pytest

from paddlemix.models.internlm_xcomposer2 import onednn, row_gemm
from paddlemix.models.internlm_xcomposer2.onednn import OneDNNError, PackedWeight
from paddlemix.models.internlm_xcomposer2.row_gemm import (RowOutput, host_gemm_for, host_weight, pack_weights,
                                                           packed_weight, row_matmul, takes_host_gemm, unpack_weights)


@pytest.fixture
def weight() -> paddle.Tensor:
    paddle.seed(0)
    return paddle.randn([96, 200])  # 200: not a multiple of any block width


def test_paddles_onednn_is_available_here():
    assert onednn.available()  # the CPU wheel bundles it; every test below needs it


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_the_packed_product_is_x_times_the_weight(weight, rows):
    packed = PackedWeight(weight, max_rows=8)
    x = paddle.randn([rows, 1, 96])
    y = packed.matmul(x)
    assert y.shape == [rows, 1, 200] and y.dtype == paddle.float32
    exact = x.numpy().reshape(rows, 96).astype(np.float64) @ weight.numpy().astype(np.float64)
    np.testing.assert_allclose(y.numpy().reshape(rows, 200), exact, atol=1e-4, rtol=0)
    assert packed.nbytes >= weight.shape[0] * weight.shape[1] * 4


def test_a_row_gives_the_same_bits_in_a_batch_as_alone(weight):
    packed = PackedWeight(weight, max_rows=8)
    x = paddle.randn([8, 1, 96])
    for rows in (2, 3, 5, 8):
        together = packed.matmul(x[:rows]).numpy()
        for i in range(rows):
            np.testing.assert_array_equal(together[i], packed.matmul(x[i:i + 1]).numpy()[0])


def test_the_output_is_reused_and_bad_shapes_are_refused(weight):
    packed = PackedWeight(weight, max_rows=4)
    out = paddle.empty([2, 1, 200])
    x = paddle.randn([2, 1, 96])
    assert packed.matmul(x, out) is out
    first = out.numpy().copy()
    packed.matmul(x * 2, out)  # overwritten, not accumulated
    np.testing.assert_allclose(out.numpy(), 2 * first, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1 to 4 rows, got 5"):
        packed.matmul(paddle.randn([5, 1, 96]))
    with pytest.raises(ValueError, match="does not fit 2 rows of width 200"):
        packed.matmul(x, paddle.empty([3, 1, 200]))
    with pytest.raises(OneDNNError, match="2-D float32 CPU weight"):
        PackedWeight(weight.astype("bfloat16"), max_rows=4)


def test_a_strided_input_is_made_contiguous_first(weight):
    packed = PackedWeight(weight, max_rows=4)
    wide = paddle.randn([2, 3, 96])
    view = wide[:, -1:]  # the last position of each row: not contiguous in memory
    np.testing.assert_array_equal(packed.matmul(view).numpy(), packed.matmul(view.contiguous()).numpy())


def test_packing_routes_a_few_rows_of_that_weight_to_the_copy_until_unpacked(weight):
    small = paddle.randn([16, 16])
    try:
        row_gemm.set_row_gemm("paddle")  # the packed copy takes batches on any vendor; one row keeps this
        assert pack_weights([weight, small], max_rows=4) == 0  # both under MIN_WEIGHT_BYTES by default
        assert packed_weight(weight) is None
        added = pack_weights([weight], max_rows=4, min_bytes=0)
        assert added == packed_weight(weight).nbytes > 0
        with paddle.no_grad():
            for rows, expected in ((1, False), (2, True), (4, True), (5, False)):
                assert takes_host_gemm(paddle.randn([rows, 1, 96]), weight) == expected
            assert not takes_host_gemm(paddle.randn([2, 1, 96]).astype("bfloat16"), weight)
            assert not host_gemm_for(1, paddle.float32, small)
        trainable = weight.detach()
        trainable.stop_gradient = False
        assert packed_weight(trainable) is None  # another tensor: not the packed one
        assert isinstance(host_weight(weight, 3), PackedWeight)
        assert isinstance(host_weight(weight, 1), np.ndarray)  # one row: NumPy's where that is chosen
        x = paddle.randn([3, 1, 96])
        out = RowOutput([3, 1], 200)
        with paddle.no_grad():
            y = row_gemm.matmul(x, weight)
        np.testing.assert_array_equal(y.numpy(), row_matmul(x, host_weight(weight, 3), out).numpy())
        np.testing.assert_allclose(y.numpy(), paddle.matmul(x, weight).numpy(), atol=1e-4, rtol=0)
        unpack_weights([weight])
        assert packed_weight(weight) is None and isinstance(host_weight(weight, 3), np.ndarray)
        with paddle.no_grad():
            assert not takes_host_gemm(paddle.randn([2, 1, 96]), weight)  # Paddle's again
    finally:
        row_gemm.set_row_gemm(None)
        unpack_weights()


def test_a_batch_decode_step_takes_the_packed_copies_for_every_linear_and_the_head(tiny_model, monkeypatch):
    """Two rows, weights packed: the prompt (2×4 rows: more than the copies take) stays on Paddle's
    GEMM, the decode step (2 rows) multiplies every decoder linear and the head by the copies."""
    from paddlemix.models.internlm_xcomposer2 import fast_decode, modeling
    from paddlemix.models.internlm_xcomposer2.kv_cache import KVCache

    calls = []

    def counting(x, weight, *rest):
        calls.append((x.shape[:-1], isinstance(weight, PackedWeight)))
        return row_matmul(x, weight, *rest)

    for module in (fast_decode, modeling, row_gemm):
        monkeypatch.setattr(module, "row_matmul", counting)
    cfg = tiny_model.config
    cache = KVCache(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.head_dim, 16, paddle.float32)
    try:
        row_gemm.set_row_gemm("paddle")
        tiny_model.pack_for_batched_decoding(4, min_bytes=0)
        with paddle.no_grad():
            tiny_model(input_ids=paddle.to_tensor([[1, 2, 3, 4], [4, 3, 2, 1]]), past_key_values=cache,
                       logits_to_keep=1)
            assert calls == [([2, 1], True)]  # the head's last position of each row
            calls.clear()
            tiny_model(input_ids=paddle.to_tensor([[5], [6]]), past_key_values=cache, logits_to_keep=1)
        assert calls == [([2, 1], True)] * (5 * cfg.num_hidden_layers + 1)
    finally:
        row_gemm.set_row_gemm(None)
        unpack_weights()


def test_the_model_packs_its_decode_weights_and_unpacks_them(tiny_model):
    weights = tiny_model.decode_weights()
    assert len(weights) == 5 * tiny_model.config.num_hidden_layers + 1
    assert weights[-1] is tiny_model.output.weight
    try:
        head = tiny_model.pack_for_batched_decoding(8)  # of the fixture's, only the head is not small
        assert head == packed_weight(weights[-1]).nbytes > 0
        assert all(packed_weight(w) is None for w in weights[:-1])
        added = tiny_model.pack_for_batched_decoding(8, min_bytes=0)
        assert added == sum(packed_weight(w).nbytes for w in weights)
        tiny_model.unpack_for_batched_decoding()
        assert all(packed_weight(w) is None for w in weights)
    finally:
        unpack_weights()


def test_the_onednn_softmax_equals_paddles_in_place_and_only_without_a_graph(monkeypatch):
    from paddlemix.models.internlm_xcomposer2 import kernels

    paddle.seed(1)
    scores = paddle.randn([2, 4, 70, 300]) * 4
    scores[:, :, :, 250:] = -1e30  # masked positions, as an additive causal mask leaves them
    want = paddle.nn.functional.softmax(scores, axis=-1).numpy()
    assert scores.size >= kernels.SOFTMAX_MIN_ELEMENTS
    got = kernels.softmax_last(scores)
    assert got is scores  # in place
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6, rtol=0)
    assert np.all(got.numpy()[..., 250:] == 0)
    small = paddle.randn([16, 470])
    assert kernels.softmax_last(small) is not small  # below the size floor: Paddle's
    trainable = paddle.randn([2, 4, 70, 300])
    trainable.stop_gradient = False
    out = kernels.softmax_last(trainable)
    assert out is not trainable and not out.stop_gradient  # autograd's kernel keeps the graph
    out.sum().backward()
    assert trainable.grad is not None


@pytest.mark.parametrize("rows, cols", [(3, 5), (700, 1024), (1024, 2816), (1, 300)])
def test_transpose_into_gives_the_exact_transpose(rows, cols):
    source = np.random.default_rng(rows).standard_normal((rows, cols), dtype=np.float32)
    target = np.full((cols, rows), np.nan, dtype=np.float32)
    onednn.transpose_into(target, source)
    assert np.array_equal(target, source.T)


def test_transpose_into_a_column_block_of_a_larger_array_leaves_the_rest():
    """The checkpoint loader transposes a file's row blocks into column blocks of the parameter."""
    source = np.random.default_rng(0).standard_normal((300, 64), dtype=np.float32)
    whole = np.zeros((64, 1000), dtype=np.float32)
    onednn.transpose_into(whole[:, 100:400], source)
    assert np.array_equal(whole[:, 100:400], source.T)
    assert not whole[:, :100].any() and not whole[:, 400:].any()


@pytest.mark.parametrize("source, target", [
    (np.zeros((4, 6), np.float64), np.zeros((6, 4), np.float64)),  # only float32
    (np.zeros((4, 6), np.float32), np.zeros((4, 6), np.float32)),  # not the transposed shape
    (np.zeros((4, 6), np.float32), np.zeros((6, 4), np.float32)[::-1]),  # negative stride
])
def test_transpose_into_refuses_what_it_cannot_do(source, target):
    with pytest.raises(OneDNNError):
        onednn.transpose_into(target, source)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_the_loaders_transpose_is_exact_on_either_path(dtype, monkeypatch):
    """float32 goes to oneDNN, bfloat16 (its oneDNN reorder is the slow reference one) to tiles."""
    from concurrent.futures import ThreadPoolExecutor

    import ml_dtypes

    from paddlemix.models.internlm_xcomposer2.checkpoint import _transpose_into

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    source = np.random.default_rng(1).standard_normal((513, 300)).astype(np_dtype)
    target = np.zeros((300, 513), dtype=np_dtype)
    calls = []
    original = onednn.transpose_into
    monkeypatch.setattr(onednn, "transpose_into", lambda *a: calls.append(1) or original(*a))
    with ThreadPoolExecutor(2) as pool:
        _transpose_into(target, source, pool)
    assert calls == ([1] if dtype == np.float32 else [])
    assert np.array_equal(target.view(np.uint8), np.ascontiguousarray(source.T).view(np.uint8))
