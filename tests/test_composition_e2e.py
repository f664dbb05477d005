"""Composition end to end on the trained quickstart model: ranking that is right, whole articles, the CLI.

The quickstart model (12.6 M parameters, trained on coloured-shape questions) writes meaningless
articles, so these tests check structure; the ranking test asks what it did learn, the colour of a
shape, and must put each colour's images first.
"""
from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from paddlemix.composition import RankingPrompt, caption_scores, compose, illustrate, open_library, save_article
from paddlemix.composition.article import Article
from paddlemix.composition.pipeline import ComposeOptions
from paddlemix.examples.internlm_xcomposer2.shapes_data import COLOURS, GRID, Scene, Shape, render

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "paddlemix" / "examples" / "internlm_xcomposer2" / "compose.py"
STEPS = {"article", "locations", "captions", "ranking", "selection"}


@pytest.fixture(scope="module")
def trained(quickstart_run):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    out, _, _ = quickstart_run
    checkpoint = out / "checkpoint"
    return (checkpoint, InternLMXComposer2ForCausalLM.from_pretrained(str(checkpoint)),
            InternLMXComposer2Tokenizer.from_pretrained(str(checkpoint)))


@pytest.fixture()
def photos(quickstart_run, tmp_path):
    """Ten of the quickstart's held-out images, in a folder with a subfolder."""
    out, _, _ = quickstart_run
    sources = sorted((out / "data" / "images").glob("eval-*.png"))[:10]
    (tmp_path / "photos" / "more").mkdir(parents=True)
    for i, source in enumerate(sources):
        shutil.copy(source, tmp_path / "photos" / ("more" if i % 2 else "") / source.name)
    return tmp_path / "photos"


def test_ranking_puts_the_captioned_colour_first(trained, tmp_path):
    _, model, tokenizer = trained
    rng, cells = random.Random(3), [(c, r) for c in range(GRID) for r in range(GRID)]
    for colour in COLOURS:
        for k in range(2):  # a circle of this colour next to a square or triangle of another
            other = rng.choice([c for c in COLOURS if c != colour])
            where = rng.sample(cells, 2)
            shapes = (Shape("circle", colour, where[0]), Shape(rng.choice(["square", "triangle"]), other, where[1]))
            render(Scene(shapes)).save(tmp_path / f"{colour}{k}.png")
    library = open_library(model, tmp_path, progress=False)
    # the quickstart's own question and answer layout
    prompt = RankingPrompt(user_text="What colour is the circle?", answer_prefix="", answer_suffix="[UNUSED_TOKEN_145]")
    scores = caption_scores(model, tokenizer, library, [f"circle {c}" for c in COLOURS], prompt, batch_size=4)
    for row, colour in zip(scores, COLOURS):
        best = {library.paths[i].stem for i in np.argsort(-row)[:2]}
        assert best == {f"{colour}0", f"{colour}1"}, (colour, row)


def _check_article(article, library_folder):
    assert article.paragraphs and article.text.startswith(article.paragraphs[0])
    assert set(article.timings) == STEPS
    for slot in article.slots:
        assert 0 <= slot.paragraph < len(article.paragraphs) and Path(slot.path).is_file()
        assert Path(slot.path).resolve().is_relative_to(library_folder.resolve())
        scores = [c.score for c in slot.candidates]
        assert 1 <= len(scores) <= 4 and all(np.isfinite(scores)) and scores == sorted(scores, reverse=True)
        assert 0 <= slot.chosen < len(scores)
    assert len({s.path for s in article.slots}) == len(article.slots)  # an image is used once


def test_whole_article_then_the_cache(trained, photos, tmp_path):
    _, model, tokenizer = trained
    streamed = []
    kwargs = dict(library=photos, num_images=1, do_sample=False, max_new_tokens=16, progress=False)
    article = compose(model, tokenizer, "What colour is the circle?", on_text=streamed.append, **kwargs)
    _check_article(article, photos)
    assert "".join(streamed) == article.text and len(article.slots) == 1
    assert (article.library["encoded"], article.library["cache_hits"], article.library["images"]) == (10, 0, 10)
    out = tmp_path / "out" / "article.md"
    save_article(article, out, html_page=True)
    markdown = out.read_text(encoding="utf-8")
    assert markdown.startswith(article.paragraphs[0] + "\n\n![")
    link = re.search(r"\]\(([^ )]+)", markdown).group(1)
    assert (out.parent / unquote(link)).read_bytes() == Path(article.slots[0].path).read_bytes()

    again = model.compose(tokenizer, "What colour is the circle?", **kwargs)  # the method, as users call it
    assert (again.library["encoded"], again.library["cache_hits"]) == (0, 10)  # nothing encoded again
    assert again.text == article.text and again.slots == article.slots  # greedy: the same article
    changed = sorted(photos.rglob("*.png"))[3]
    Image.open(changed).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    third = compose(model, tokenizer, "What colour is the circle?", **kwargs)
    assert (third.library["encoded"], third.library["cache_hits"]) == (1, 9)


def test_two_places_on_a_written_article(trained, photos):
    _, model, tokenizer = trained
    library = open_library(model, photos, progress=False)
    paragraphs = ["What colour is the circle?", "circle red", "Which shape is blue?", "blue square"]
    article = Article("x", "\n".join(paragraphs), paragraphs)
    illustrate(model, tokenizer, article, None, library, ComposeOptions(num_images=2, do_sample=False, progress=False))
    article.timings.setdefault("article", 0.0)
    _check_article(article, photos)
    assert len(article.slots) == 2
    first_choice = article.slots[0].path
    assert first_choice not in [c.path for c in article.slots[1].candidates]


def test_users_own_images(trained, photos):
    _, model, tokenizer = trained
    mine = [str(p) for p in sorted(photos.glob("*.png"))[:3]]
    article = compose(model, tokenizer, "What colour is the circle?", images=mine, do_sample=False, max_new_tokens=16)
    assert article.slots and all(s.source == "upload" and s.path in mine and s.caption == "" for s in article.slots)
    assert "captions" not in article.timings and "ranking" not in article.timings


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def test_cli_writes_markdown_and_html_and_reports_bad_files(trained, photos, tmp_path):
    checkpoint, _, _ = trained
    (photos / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "site" / "article.md"
    args = ["--from_pretrained", checkpoint, "--instruction", "What colour is the circle?", "--library", photos,
            "--num_images", "1", "--no-do_sample", "--max_new_tokens", "12", "--out", out, "--html", "--json"]
    run = _cli(*args)
    assert run.returncode == 0, run.stderr[-3000:]
    first_paragraph = out.read_text(encoding="utf-8").split("\n\n")[0]
    assert run.stdout.strip().startswith(first_paragraph)  # the article streamed to stdout
    [logged] = [line for line in run.stderr.splitlines() if "skipped library image" in line]
    assert "broken.jpg" in logged and "not an image PIL can read" in logged  # the file and the reason
    assert "1 unreadable library image(s) skipped" in run.stderr
    assert "10 encoded" in run.stderr and out.with_suffix(".html").is_file() and out.with_suffix(".json").is_file()
    assert len(list((out.parent / "images").iterdir())) == 1
    again = _cli(*args)
    assert again.returncode == 0 and "0 encoded" in again.stderr and "10 from the cache" in again.stderr


def test_cli_bad_input_is_one_error_line(tiny_model_dir, tmp_path):
    run = _cli("--from_pretrained", tiny_model_dir, "--instruction", "x", "--image", tmp_path / "missing.png",
               "--out", tmp_path / "a.md", timeout=120)
    assert run.returncode == 2 and run.stderr.strip().startswith("error:") and "missing.png" in run.stderr
    assert "Traceback" not in run.stderr
    run = _cli("--instruction", "x", "--num_images", "many", "--out", tmp_path / "a.md", timeout=120)
    assert run.returncode == 2 and "expected 'auto' or a number" in run.stderr
    run = _cli("--instruction", "x", "--library", tmp_path / "nowhere", "--out", tmp_path / "a.md", timeout=120)
    assert run.returncode == 2 and "is not a directory" in run.stderr
