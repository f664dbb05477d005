"""The article files: Markdown that parses (images where they belong, links that resolve), HTML, JSON."""
from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from markdown_it import MarkdownIt
from PIL import Image

from paddlemix.composition.article import Article, Candidate, ImageSlot, save_article


class Collect(HTMLParser):
    """Blocks (tag, their whole text) and images (``img``, attributes), in document order; an
    image alone in a Markdown paragraph counts as the image only."""

    BLOCKS = ("p", "h1", "h2", "figcaption", "title")

    def __init__(self):
        super().__init__()
        self.items, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.items.append(("img", dict(attrs)))
        elif tag in self.BLOCKS:
            self._open = [tag, ""]

    def handle_endtag(self, tag):
        if tag in self.BLOCKS and self._open is not None:
            if self._open[1].strip():
                self.items.append(tuple(self._open))
            self._open = None

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data


@pytest.fixture()
def article(tmp_path):
    (tmp_path / "lib" / "a").mkdir(parents=True)
    (tmp_path / "lib" / "b").mkdir()
    first, second = tmp_path / "lib" / "a" / "my photo.PNG", tmp_path / "lib" / "b" / "my photo.PNG"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(first, format="PNG")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(second, format="PNG")
    slots = [ImageSlot(0, 'a [red] "square"', "library", [Candidate(str(second), -2.0), Candidate(str(first), -1.0)], 1,
                       " B", False),
             ImageSlot(2, "", "upload", [Candidate(str(second))], 0)]
    paragraphs = ["# 标题 1", "第一段 & more", "last *para*", "after"]
    return Article("写", "\n".join(paragraphs), paragraphs, slots, timings={"article": 1.5})


def test_markdown_is_well_formed(article, tmp_path):
    out = tmp_path / "out" / "article.md"
    written = save_article(article, out)
    html = MarkdownIt().render(out.read_text(encoding="utf-8"))
    parsed = Collect()
    parsed.feed(html)
    kinds = [kind for kind, _ in parsed.items]
    assert kinds == ["h1", "img", "p", "p", "img", "p"]  # each image right after its paragraph
    texts = [value for kind, value in parsed.items if kind != "img"]
    assert texts == ["标题 1", "第一段 & more", "last para", "after"]  # in order, Markdown kept as written
    images = [attrs for kind, attrs in parsed.items if kind == "img"]
    assert images[0]["alt"] == 'a [red] "square"' and images[0]["title"] == 'a [red] "square"'
    for attrs, slot in zip(images, article.slots):
        target = out.parent / unquote(attrs["src"])
        assert target.is_file() and target.parent.name == "images"
        assert target.read_bytes() == Path(slot.path).read_bytes()  # the chosen candidate, copied
    names = sorted(p.name for p in (out.parent / "images").iterdir())
    assert names == ["01-my_photo.png", "02-my_photo.png"]  # same name in two folders: no clash
    assert set(written) == {out, *(out.parent / "images" / n for n in names)}


def test_html_and_json(article, tmp_path):
    out = tmp_path / "article.md"
    written = save_article(article, out, html_page=True, json_file=True)
    page = out.with_suffix(".html").read_text(encoding="utf-8")
    parsed = Collect()
    parsed.feed(page)
    assert parsed.items[0] == ("title", "标题 1")
    body = [(kind, value) for kind, value in parsed.items[1:]]
    assert [k for k, _ in body] == ["h1", "img", "figcaption", "p", "p", "img", "p"]
    assert body[2] == ("figcaption", 'a [red] "square"') and body[3] == ("p", "第一段 & more")
    assert body[4] == ("p", "last *para*")  # text is escaped, not interpreted, in the HTML page
    for kind, attrs in body:
        if kind == "img":
            assert (out.parent / unquote(attrs["src"])).is_file()
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert [c["score"] for c in data["slots"][0]["candidates"]] == [-2.0, -1.0]
    assert data["slots"][0]["chosen"] == 1 and data["links"] == {"0": "images/01-my_photo.png",
                                                                   "2": "images/02-my_photo.png"}
    assert data["paragraphs"] == article.paragraphs and out.with_suffix(".json") in written


def test_text_only_article_has_no_images_folder(tmp_path):
    out = tmp_path / "a.md"
    save_article(Article("x", "p1\np2", ["p1", "p2"]), out)
    assert out.read_text(encoding="utf-8") == "p1\n\np2\n" and not (tmp_path / "images").exists()


def test_an_out_name_the_html_or_json_would_overwrite_is_refused(article, tmp_path):
    with pytest.raises(ValueError, match="would overwrite the Markdown"):
        save_article(article, tmp_path / "article.html", html_page=True)
    assert not (tmp_path / "article.html").exists()
