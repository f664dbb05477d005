"""InternLMXComposer2Tokenizer against the official slow tokenizer's golden outputs (golden.json -> tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import TINY, TINY_PADDLEMIX

from paddlemix.models.internlm_xcomposer2.tokenizer import InternLMXComposer2Tokenizer

N_CASES = 22
FIELDS = ("input_ids", "input_ids_no_special", "tokens_no_special", "decode", "decode_skip_special")


@pytest.fixture(scope="module")
def cases(golden_json: dict) -> list:
    assert len(golden_json["tokenizer"]) == N_CASES
    return golden_json["tokenizer"]


@pytest.fixture(scope="module")
def tok(tiny_dir: Path) -> InternLMXComposer2Tokenizer:
    return InternLMXComposer2Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def tok_paddlemix() -> InternLMXComposer2Tokenizer:
    if not TINY_PADDLEMIX.is_dir():
        pytest.fail(f"PaddleMIX-layout fixture not found at {TINY_PADDLEMIX}")
    return InternLMXComposer2Tokenizer.from_pretrained(TINY_PADDLEMIX)


def run_case(tokenizer: InternLMXComposer2Tokenizer, case: dict) -> dict:
    """Produce the five golden fields the way the reference recorded them."""
    text, ids = case["text"], case["input_ids"]
    return {
        "input_ids": tokenizer(text)["input_ids"],
        "input_ids_no_special": tokenizer(text, add_special_tokens=False)["input_ids"],
        "tokens_no_special": tokenizer.tokenize(text),
        "decode": tokenizer.decode(ids),
        "decode_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
    }


@pytest.mark.parametrize("index", range(N_CASES))
def test_golden_case(tok: InternLMXComposer2Tokenizer, cases: list, index: int) -> None:
    case = cases[index]
    got = run_case(tok, case)
    for field in FIELDS:
        assert got[field] == case[field], f"case {index} ({case['text']!r}) field {field}"


def test_named_ids(tok: InternLMXComposer2Tokenizer, golden_json: dict) -> None:
    info = golden_json["tokenizer_info"]
    assert tok.vocab_size == len(tok) == info["vocab_size"]
    assert tok.bos_token_id == info["bos_token_id"]
    assert tok.eos_token_id == info["eos_token_id"]
    assert tok.pad_token_id == info["pad_token_id"]
    assert tok.unk_token_id == info["unk_token_id"]
    assert tok.im_end_id == info["UNUSED_TOKEN_145"]
    assert tok.im_start_id == info["UNUSED_TOKEN_146"]
    assert (tok.add_bos_token, tok.add_eos_token, tok.padding_side) == (True, False, "right")


def test_layouts_agree(tok: InternLMXComposer2Tokenizer, tok_paddlemix: InternLMXComposer2Tokenizer,
                       cases: list) -> None:
    assert Path(tok.vocab_file).name == "tokenizer.model"
    assert Path(tok_paddlemix.vocab_file).name == "sentencepiece.bpe.model"
    for case in cases:
        assert run_case(tok_paddlemix, case) == run_case(tok, case)
    assert (tok_paddlemix.im_start_id, tok_paddlemix.im_end_id) == (tok.im_start_id, tok.im_end_id)


@pytest.mark.parametrize("source", ["official", "paddlemix"])
def test_save_reload_round_trip(tmp_path: Path, cases: list, source: str,
                                tok: InternLMXComposer2Tokenizer,
                                tok_paddlemix: InternLMXComposer2Tokenizer) -> None:
    original = tok if source == "official" else tok_paddlemix
    original.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (TINY / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in config and "special_tokens_map_file" not in config
    assert config["tokenizer_class"] == "InternLMXComposer2Tokenizer"
    reloaded = InternLMXComposer2Tokenizer.from_pretrained(tmp_path)
    for case in cases:
        assert run_case(reloaded, case) == run_case(original, case)
    assert reloaded.special_tokens_map == original.special_tokens_map
    assert reloaded.clean_up_tokenization_spaces is False


def test_direct_construction_splits_special_tokens() -> None:
    """Built from a vocab file (no from_pretrained), literal special tokens still split and strip spaces."""
    tokenizer = InternLMXComposer2Tokenizer(vocab_file=str(TINY / "tokenizer.model"))
    assert tokenizer.tokenize("a  <s>  b </s>") == ["a", "<s>", "b", "</s>"]
    assert tokenizer.tokenize("x [UNUSED_TOKEN_146] y") == ["x", "▁", "[UNUSED_TOKEN_146]", "▁y"]


def test_special_token_whitespace_and_decode_rules(tok: InternLMXComposer2Tokenizer) -> None:
    assert tok("hi   </s>   there")["input_ids"] == tok("hi</s>there")["input_ids"]
    assert tok.decode([9843, 262, 281]) == "Hello."  # official clean-up inside convert_tokens_to_string
    assert tok.decode(1) == " <s>"
    assert tok.batch_decode(np.array([[1, 9843], [2028, 2]]), skip_special_tokens=True) == ["Hello", " world"]


TEXTS = ["Hello world", "你好", "def f(x):\n    return x ** 2  # square\n"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(tok: InternLMXComposer2Tokenizer, side: str) -> None:
    single = [tok(t)["input_ids"] for t in TEXTS]
    longest = max(map(len, single))
    out = tok(TEXTS, padding=True, padding_side=side, return_tensors="np")
    assert set(out.keys()) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (len(TEXTS), longest)
    for row, mask, ids in zip(out["input_ids"], out["attention_mask"], single):
        n_pad = longest - len(ids)
        pad, body = (row[:n_pad], row[n_pad:]) if side == "left" else (row[len(ids):], row[:len(ids)])
        assert body.tolist() == ids and (pad == tok.pad_token_id).all()
        expect_mask = [0] * n_pad + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * n_pad
        assert mask.tolist() == expect_mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_attribute(tok_paddlemix: InternLMXComposer2Tokenizer, side: str) -> None:
    tokenizer = tok_paddlemix
    original = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        out = tokenizer(TEXTS[:2], padding="longest")
    finally:
        tokenizer.padding_side = original
    short = out["input_ids"][1]
    assert (short[0] if side == "left" else short[-1]) == tokenizer.pad_token_id
    assert (out["attention_mask"][1][0] if side == "left" else out["attention_mask"][1][-1]) == 0


def test_truncation_max_length_and_tensors(tok: InternLMXComposer2Tokenizer) -> None:
    out = tok(TEXTS, padding="max_length", truncation=True, max_length=6, return_tensors="pd")
    assert isinstance(out["input_ids"], paddle.Tensor) and out["input_ids"].shape == [len(TEXTS), 6]
    ids = out["input_ids"].numpy()
    assert ids[2].tolist() == tok(TEXTS[2])["input_ids"][:6]  # right truncation keeps BOS
    assert ids[0].tolist() == tok(TEXTS[0])["input_ids"] + [tok.pad_token_id] * 3
    assert out["attention_mask"].numpy()[0].tolist() == [1, 1, 1, 0, 0, 0]
    plain = tok(TEXTS, add_special_tokens=False, truncation=True, max_length=2)
    assert plain["input_ids"][0] == tok(TEXTS[0], add_special_tokens=False)["input_ids"][:2]


def test_missing_vocab_file(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(FileNotFoundError) as err:
        InternLMXComposer2Tokenizer.from_pretrained(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "tokenizer.model" in message and "sentencepiece.bpe.model" in message
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        InternLMXComposer2Tokenizer.from_pretrained(tmp_path / "absent")


def test_fast_decode_equals_paddlenlps(tiny_dir, golden_json):
    """The hoisted ``_decode`` gives PaddleNLP's text for every golden case and for random id
    sequences full of special ids, the chat markers and byte pieces, with every flag."""
    import random

    from paddlenlp.transformers import PretrainedTokenizer

    tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))
    rng = random.Random(0)
    pool = [0, 1, 2, tokenizer.im_start_id, tokenizer.im_end_id, *range(3, 300), *range(60000, 60100)]
    sequences = [case["input_ids"] for case in golden_json["tokenizer"]]
    sequences += [[rng.choice(pool) for _ in range(rng.randint(0, 40))] for _ in range(200)]
    for ids in sequences:
        for skip in (False, True):
            for clean in (False, True):
                assert tokenizer._decode(ids, skip, clean) == PretrainedTokenizer._decode(tokenizer, ids, skip, clean)
