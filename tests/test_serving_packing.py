"""When the serving engine packs the decode weights (serving/packing.py), and that it drops the
copy when it stops."""
import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.row_gemm import packed_weight, unpack_weights
from paddlemix.serving.engine import Engine
from paddlemix.serving.packing import available_memory, packing_decision


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


def test_auto_packs_float32_cpu_weights_for_batches_when_the_copy_fits(tiny_model):
    need = sum(w.shape[0] * w.shape[1] * 4 for w in tiny_model.decode_weights())
    assert packing_decision(tiny_model, 8, "auto", free_bytes=10 * need) == (True, "auto")
    pack, why = packing_decision(tiny_model, 8, "auto", free_bytes=need)
    assert not pack and "free" in why
    pack, why = packing_decision(tiny_model, 1, "auto", free_bytes=10 * need)
    assert not pack and "one row" in why
    assert packing_decision(tiny_model, 8, "off") == (False, "off")
    assert packing_decision(tiny_model, 1, "on", free_bytes=0) == (True, "on")
    with pytest.raises(ValueError, match="one of auto, on, off"):
        packing_decision(tiny_model, 8, "always")


def test_weights_that_are_not_float32_are_not_packed(tiny_model):
    class Half:
        def decode_weights(self):
            return [w.astype("bfloat16") for w in tiny_model.decode_weights()[:1]]

    assert packing_decision(Half(), 8, "auto") == (False, "not float32 weights on a CPU")
    with pytest.raises(ValueError, match="float32 on the CPU"):
        packing_decision(Half(), 8, "on")


def test_available_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    512 kB\n")
    assert available_memory(str(meminfo)) == 512 * 1024
    assert available_memory(str(tmp_path / "missing")) is None


def test_the_engine_packs_on_start_and_unpacks_on_stop(tiny_model, tokenizer):
    weights = tiny_model.decode_weights()
    with pytest.raises(ValueError, match="weight_packing must be one of"):
        Engine(tiny_model, tokenizer, weight_packing="yes")
    engine = Engine(tiny_model, tokenizer, weight_packing="on")
    try:
        engine.start()
        assert engine.packed_bytes > 0 and all(packed_weight(w) is not None for w in weights)
    finally:
        engine.stop()
        unpack_weights()
    assert engine.packed_bytes == 0 and all(packed_weight(w) is None for w in weights)
    auto = Engine(tiny_model, tokenizer).start()  # of the fixture's weights only the head is not small
    try:
        assert auto.packed_bytes == packed_weight(weights[-1]).nbytes
        assert all(packed_weight(w) is None for w in weights[:-1])
    finally:
        auto.stop()
    assert packed_weight(weights[-1]) is None
