"""Streamed text of the server: deltas only ever extend the text, join to exactly the content
``chat`` returns for the same ids (cut at a stop string), never split a character."""
from __future__ import annotations

import random
from typing import List

import pytest

from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer
from paddlemix.models.internlm_xcomposer2.tokenizer import IM_END_TOKEN
from paddlemix.models.internlm_xcomposer2.textstream import CLEANUP_PATTERNS, REPLACEMENT_CHAR, IncrementalText

BYTE_PIECES = range(3, 259)  # <0x00> ... <0xFF>: byte fallback, multi-byte characters span several


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


def chat_response(tokenizer, ids: List[int]) -> str:
    """The official rule (``chat``): decode the new ids, skip special tokens, cut at the end of turn."""
    return tokenizer.decode(ids, skip_special_tokens=True).split(IM_END_TOKEN)[0]


def run(tokenizer, ids: List[int], stops=()):
    text = IncrementalText(tokenizer, stops)
    deltas, released = [], []
    for token in ids:
        deltas.append(text.push(token))
        released.append(text.sent)
        if text.stopped:
            break
    rest, content = text.finish()
    return deltas + [rest], released, content, text


def utf8_ids(tokenizer, s: str) -> List[int]:
    return [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in s.encode("utf-8")]


def random_ids(rng: random.Random, tokenizer, n: int) -> List[int]:
    words = tokenizer(" do n't stop . Hello , world ! 'm 're 's ' 你好 世界", add_special_tokens=False)["input_ids"]
    pools = [lambda: rng.randrange(259, tokenizer.vocab_size - 2), lambda: rng.choice(words),
             lambda: rng.choice([0, 1, 2]), lambda: rng.choice(BYTE_PIECES)]
    ids: List[int] = []
    while len(ids) < n:
        if rng.random() < 0.1:
            ids += utf8_ids(tokenizer, rng.choice("éü中文🙂"))
        else:
            ids.append(rng.choices(pools, weights=[5, 4, 1, 1])[0]())
    return ids


@pytest.mark.parametrize("block", range(4))
def test_deltas_join_to_the_chat_response_and_only_grow(tokenizer, block):
    """Random answers dense in what makes decoding non-monotone: byte pieces of multi-byte
    characters, special ids, the clean-up's punctuation and contractions, end-of-turn ids."""
    for seed in range(block * 250, (block + 1) * 250):
        rng = random.Random(seed)
        ids = random_ids(rng, tokenizer, rng.randrange(1, 80))
        if seed % 4 == 0:
            ids.insert(rng.randrange(len(ids) + 1), tokenizer.im_end_id)
        deltas, released, content, _ = run(tokenizer, ids)
        assert "".join(deltas) == content == chat_response(tokenizer, ids[: len(released)]), seed
        assert content == chat_response(tokenizer, ids) or tokenizer.im_end_id in ids
        assert all(content.startswith(r) for r in released)
        assert all(REPLACEMENT_CHAR not in d for d in deltas[:-1] if d) or REPLACEMENT_CHAR in content


def test_multibyte_characters_are_never_split(tokenizer):
    ids = utf8_ids(tokenizer, "中🙂")
    deltas, _, content, _ = run(tokenizer, ids)
    assert content == "中🙂"
    assert [d for d in deltas if d] == ["中", "🙂"]


def test_cleanup_patterns_are_what_the_tokenizer_rewrites(tokenizer):
    for pattern in CLEANUP_PATTERNS:
        assert tokenizer.clean_up_tokenization("x" + pattern + "y") != "x" + pattern + "y"
    assert tokenizer.clean_up_tokenization("x ; y") == "x ; y"  # and nothing else is rewritten
    ids = tokenizer("I do n't know .", add_special_tokens=False)["input_ids"]
    deltas, released, content, _ = run(tokenizer, ids)
    assert "".join(deltas) == content == tokenizer.decode(ids, skip_special_tokens=True)
    assert all(content.startswith(r) for r in released)


def test_stop_strings_cut_at_the_first_and_are_held_back(tokenizer):
    ids = tokenizer("alpha beta gamma delta", add_special_tokens=False)["input_ids"]
    deltas, released, content, text = run(tokenizer, ids, stops=["delta", "gam"])
    assert content == "alpha beta " and text.stopped
    assert "".join(deltas) == content
    assert not any("ga" in r for r in released)  # the start of a stop string is never shown
    deltas, _, content, text = run(tokenizer, ids, stops=["zeta"])
    assert content == "alpha beta gamma delta" and not text.stopped


def test_end_of_turn_text_is_a_stop(tokenizer):
    ids = tokenizer("Sure", add_special_tokens=False)["input_ids"] + [tokenizer.im_end_id, 300, 301]
    deltas, _, content, text = run(tokenizer, ids)
    assert content == "Sure" == chat_response(tokenizer, ids) and text.stopped


def test_plain_decode_mode_joins_to_decode(tokenizer, caplog):
    """The composition's article stream (``skip_special_tokens=False``): its content is the plain
    ``decode`` of the ids; without special ids in mid-text every delta only extends it. A special
    id makes the official decode put a space before the text run it ends (text already shown):
    the stream then stops extending, says so, and the content is still the decode."""
    specials = set(tokenizer.all_special_ids)
    diverged = 0
    for seed in range(200):
        rng = random.Random(seed)
        ids = [i for i in random_ids(rng, tokenizer, rng.randrange(1, 60)) if i != tokenizer.im_end_id]
        plain = [i for i in ids if i not in specials]
        for sequence in (ids, plain):
            text = IncrementalText(tokenizer, skip_special_tokens=False)
            deltas = [text.push(token) for token in sequence]
            rest, content = text.finish()
            assert content == tokenizer.decode(sequence), seed
            if "".join(deltas) + rest != content:
                assert sequence is ids and "differs from the final decode" in caplog.text, seed
                diverged += 1
    assert diverged > 0  # the random ids do reach the quirk


def test_pushing_never_decodes_the_whole_answer(tokenizer, monkeypatch):
    """A long stream costs one full decode (at the end), not one per token (quadratic)."""
    calls = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    for skip in (True, False):
        text = IncrementalText(tokenizer, skip_special_tokens=skip)
        for token in random_ids(random.Random(1), tokenizer, 300):
            text.push(token)
        text.finish()
    assert len(calls) == 2
