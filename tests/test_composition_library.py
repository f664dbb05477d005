"""The image library: discovery, the content-keyed feature cache, unreadable files, and the ranking scores."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import paddle
import pytest
from PIL import Image

from paddlemix.composition import library as lib
from paddlemix.composition.library import CACHE_DIRNAME, find_images, model_fingerprint, open_library
from paddlemix.composition.prompts import ranking_prompt
from paddlemix.composition.ranking import RankingPrompt, caption_scores, top_candidates
from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return InternLMXComposer2Tokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture(scope="module")
def model(tiny_dir, tiny_config):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM

    return InternLMXComposer2ForCausalLM.from_pretrained(str(tiny_dir), config=tiny_config)


@pytest.fixture()
def folder(tmp_path, tiny_dir):
    """4 readable images (png, upper-case JPG in a subfolder, webp), one corrupt, one not an image type."""
    root = tmp_path / "photos"
    (root / "trip" / "day2").mkdir(parents=True)
    shutil.copy(tiny_dir / "img1.png", root / "a.png")
    Image.open(tiny_dir / "img2.png").convert("RGB").save(root / "trip" / "B.JPG", quality=95)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "trip" / "day2" / "red.webp")
    Image.new("RGB", (30, 40), (30, 30, 200)).save(root / "trip" / "blue.png")
    (root / "trip" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "notes.txt").write_text("not an image")
    return root


def test_find_images_recursive_and_by_extension(folder):
    names = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    assert names == ["a.png", "trip/B.JPG", "trip/blue.png", "trip/broken.jpg", "trip/day2/red.webp"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        find_images(folder / "a.png")


def test_cache_miss_then_hit_then_changed_file(model, folder, capsys):
    first = open_library(model, folder, progress=True)
    assert "encoding library" in capsys.readouterr().err  # the progress bar
    assert (first.stats.found, first.stats.encoded, first.stats.cache_hits, len(first)) == (5, 4, 0, 4)
    [bad] = first.stats.skipped
    assert bad.path.endswith("broken.jpg") and "corrupt" in bad.reason and "broken.jpg" in bad.reason
    # the cached features are the model's own encoding of each file
    direct = model.encode_img([str(p) for p in first.paths])
    np.testing.assert_allclose(first.embeddings(range(len(first))).numpy(), direct.numpy(), atol=1e-5)
    entries = sorted(p.name for p in first.cache.directory.glob("*.npy"))
    assert entries == sorted(f"{h}.npy" for h in first.hashes) and not list(first.cache.directory.glob("*.tmp"))
    assert first.cache.directory.parent == folder / CACHE_DIRNAME

    second = open_library(model, folder, progress=False)
    assert (second.stats.encoded, second.stats.cache_hits, second.stats.hashed) == (0, 4, 0)  # no file read
    np.testing.assert_array_equal(second.embeddings([0, 3]).numpy(), first.embeddings([0, 3]).numpy())

    Image.new("RGB", (30, 40), (30, 200, 30)).save(folder / "trip" / "blue.png")  # same name, new content
    third = open_library(model, folder, progress=False)
    assert (third.stats.encoded, third.stats.cache_hits, third.stats.hashed) == (1, 3, 1)
    changed = [str(p) for p in third.paths].index(str(folder / "trip" / "blue.png"))
    np.testing.assert_allclose(third.embeddings([changed]).numpy(),
                               model.encode_img(str(folder / "trip" / "blue.png")).numpy(), atol=1e-5)


def test_a_touched_file_is_hashed_again_but_not_encoded(model, folder):
    open_library(model, folder, progress=False)
    stat = (folder / "a.png").stat()
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    again = open_library(model, folder, progress=False)
    assert (again.stats.hashed, again.stats.encoded, again.stats.cache_hits) == (1, 0, 4)
    (folder / CACHE_DIRNAME / "hashes.json").write_text("{broken")
    assert open_library(model, folder, progress=False).stats.hashed == 5  # a damaged memo: everything read again


def test_the_memo_forgets_deleted_files_and_the_cache_info_is_whole(model, folder):
    first = open_library(model, folder, progress=False)
    memo = folder / CACHE_DIRNAME / "hashes.json"
    assert str((folder / "trip" / "blue.png").resolve()) in json.loads(memo.read_text())
    (folder / "trip" / "blue.png").unlink()
    again = open_library(model, folder, progress=False)
    kept = json.loads(memo.read_text())
    assert str((folder / "trip" / "blue.png").resolve()) not in kept and len(kept) == 4  # 3 images + broken.jpg
    assert (again.stats.hashed, again.stats.encoded, len(again)) == (0, 0, 3)
    info = json.loads((first.cache.directory / "info.json").read_text())
    assert info["img_size"] == model.config.img_size and info["tokens"] == model.config.num_image_tokens
    assert not list(first.cache.directory.glob("*.tmp")) and not list(memo.parent.glob("*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    written = [memo, first.cache.directory / "info.json", first.cache.path(first.hashes[0])]
    assert {path.stat().st_mode & 0o777 for path in written} == {0o666 & ~umask}  # as open() makes them


def test_copies_are_encoded_once_and_other_dirs_work(model, folder, tmp_path):
    shutil.copy(folder / "a.png", folder / "trip" / "a_copy.png")
    opened = open_library(model, folder, cache_dir=tmp_path / "elsewhere", progress=False)
    assert len(opened) == 5 and opened.stats.encoded == 4  # five readable files, four distinct contents
    assert opened.cache.directory.parent == tmp_path / "elsewhere" and not (folder / CACHE_DIRNAME).exists()


def test_another_checkpoint_never_reads_the_cache(model, folder):
    before = model_fingerprint(model)
    open_library(model, folder, progress=False)
    weight = model.vision_proj[0].weight
    saved = weight.numpy().copy()
    weight.set_value(paddle.to_tensor(saved + 1e-3))
    try:
        assert model_fingerprint(model) != before
        assert open_library(model, folder, progress=False).stats.encoded == 4
    finally:
        weight.set_value(paddle.to_tensor(saved))
    assert model_fingerprint(model) == before


def test_unwritable_cache_keeps_features_in_memory(model, folder, monkeypatch):
    def refuse(*args):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(lib.os, "replace", refuse)
    opened = open_library(model, folder, progress=False)
    assert opened.stats.encoded == 4 and not list(opened.cache.directory.glob("*.npy"))
    assert not list(opened.cache.directory.glob("*.tmp"))  # nothing half-written left behind
    np.testing.assert_allclose(opened.embeddings([0]).numpy(), model.encode_img(str(opened.paths[0])).numpy(),
                               atol=1e-5)


def test_a_corrupt_cache_entry_is_encoded_again(model, folder):
    first = open_library(model, folder, progress=False)
    first.cache.path(first.hashes[0]).write_bytes(b"garbage")
    again = open_library(model, folder, progress=False)
    assert (again.stats.encoded, again.stats.cache_hits) == (1, 3)


def test_bfloat16_storage_is_exact():
    values = paddle.to_tensor(np.random.default_rng(0).normal(size=[4, 6]).astype("float32")).astype("bfloat16")
    stored = lib._to_storage(values)
    assert stored.dtype == np.uint16
    back = lib._from_storage(stored, values.dtype)
    assert back.dtype == paddle.bfloat16
    np.testing.assert_array_equal(back.astype("float32").numpy(), values.astype("float32").numpy())


# --- ranking scores ---------------------------------------------------------------------------------
class Features:
    def __init__(self, embeds):
        self.embeds = embeds

    def __len__(self):
        return int(self.embeds.shape[0])

    def embeddings(self, indices):
        return paddle.gather(self.embeds, paddle.to_tensor(list(indices), dtype="int64"))


def _full_forward_score(model, tokenizer, image, caption, prompt):
    """The same score from one plain forward over the whole sequence, no cache."""
    from paddlemix.composition.decoding import prompt_layout

    text = ranking_prompt(prompt.user_text, prompt.answer_prefix) + caption + prompt.answer_suffix
    ids = prompt_layout(tokenizer, text, 1, int(image.shape[1]))
    base = prompt_layout(tokenizer, ranking_prompt(prompt.user_text, prompt.answer_prefix), 1, int(image.shape[1]))
    start = next(i for i, (a, b) in enumerate(zip(ids + [None], base + [None])) if a != b)
    start = min(start, len(ids) - 1)
    tensor = paddle.to_tensor([ids])
    mask = tensor == -200
    logits = model(inputs_embeds=model.embed_interleaved(tensor, mask, image_embeds=image), im_mask=mask).logits
    logits = logits.numpy()[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True)
    return float(np.mean([logp[i - 1, ids[i]] for i in range(start, len(ids))]))


def test_cached_prefix_scores_equal_full_forwards(model, tokenizer, tiny_dir):
    images = model.encode_img([str(tiny_dir / "img1.png"), str(tiny_dir / "img2.png"), str(tiny_dir / "img2.png")])
    captions = ["湖边的日落", "a red circle", "", "\"quoted\""]
    prompt = RankingPrompt()
    scores = caption_scores(model, tokenizer, Features(images), captions, prompt, batch_size=2)
    assert scores.shape == (4, 3)
    for c, caption in enumerate(captions):
        for i in range(3):
            assert scores[c, i] == pytest.approx(
                _full_forward_score(model, tokenizer, images[i:i + 1], caption, prompt), abs=2e-4)
    assert scores[0, 1] == pytest.approx(scores[0, 2], abs=1e-5)  # same image, same score across batches


def test_top_candidates():
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0, 0.3])
    assert top_candidates(scores, set(), 4) == [1, 3, 2, 5]  # ties keep library order
    assert top_candidates(scores, {1, 2}, 4) == [3, 5, 0, 4]
    assert top_candidates(scores, set(range(6)), 4) == []
