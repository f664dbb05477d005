"""The composed article as data, and its Markdown / HTML / JSON files with the images beside them.

An image belongs *after* a paragraph (the demo shows it below ``articles[i]``). Saving copies
each chosen image into ``images/`` next to the Markdown file and links it relatively, so the
folder can be moved or zipped as a whole::

    out/article.md        paragraphs, each chosen image below its paragraph: ![caption](images/01-x.png)
    out/article.html      the same as a standalone page (with --html)
    out/images/01-x.png   copies of the chosen images, numbered in article order
"""
from __future__ import annotations

import html
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union
from urllib.parse import quote

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "ImageSlot", "Article", "article_markdown", "article_html", "save_article"]

IMAGES_DIRNAME = "images"
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$")
_UNSAFE_NAME = re.compile(r"[^\w.-]+")


@dataclass
class Candidate:
    """One image the model was shown for a place; ``score`` is its ranking score (the mean
    log-likelihood of the caption given the image; None for the user's own images)."""

    path: str
    score: Optional[float] = None


@dataclass
class ImageSlot:
    """An image placed after paragraph ``paragraph``: its caption (empty for the user's images,
    which have none, as in the demo), the candidates shown, which one the model chose, its
    answer, and whether that answer was unreadable (then candidate A, as the demo does)."""

    paragraph: int
    caption: str
    source: str  # "library" or "upload"
    candidates: List[Candidate]
    chosen: int
    answer: str = ""
    fell_back: bool = False

    @property
    def path(self) -> str:
        return self.candidates[self.chosen].path


@dataclass
class Article:
    """Paragraphs in order, the image slots (sorted by paragraph), and how it was made: the
    location answer, what went wrong and was worked around (``notes``), seconds per step."""

    instruction: str
    text: str
    paragraphs: List[str]
    slots: List[ImageSlot] = field(default_factory=list)
    location_answer: str = ""
    notes: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    library: Optional[Dict[str, Any]] = None

    def slot_after(self, paragraph: int) -> Optional[ImageSlot]:
        return next((s for s in self.slots if s.paragraph == paragraph), None)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _markdown_image(caption: str, link: str) -> str:
    alt = re.sub(r"([\\\[\]])", r"\\\1", _one_line(caption))
    title = _one_line(caption).replace("\\", "\\\\").replace('"', '\\"')
    return f'![{alt}]({quote(link)} "{title}")' if title else f"![]({quote(link)})"


def article_markdown(article: Article, links: Dict[int, str]) -> str:
    """Paragraphs separated by blank lines; after paragraph i, the image ``links[i]`` (a relative
    path) with the caption as alt text and title."""
    blocks = []
    for i, paragraph in enumerate(article.paragraphs):
        blocks.append(paragraph)
        slot = article.slot_after(i)
        if slot is not None and i in links:
            blocks.append(_markdown_image(slot.caption, links[i]))
    return "\n\n".join(blocks) + "\n"


def _html_block(paragraph: str) -> str:
    heading = _HEADING.match(paragraph)
    if heading:
        level = len(heading.group(1))
        return f"<h{level}>{html.escape(heading.group(2))}</h{level}>"
    return f"<p>{html.escape(paragraph)}</p>"


def article_html(article: Article, links: Dict[int, str]) -> str:
    """A standalone UTF-8 page: paragraphs (Markdown headings as headings), each image in a
    ``<figure>`` with its caption."""
    title = html.escape(_HEADING.sub(r"\2", article.paragraphs[0]) if article.paragraphs else article.instruction)
    body = []
    for i, paragraph in enumerate(article.paragraphs):
        body.append(_html_block(paragraph))
        slot = article.slot_after(i)
        if slot is not None and i in links:
            caption = html.escape(slot.caption)
            figcaption = f"<figcaption>{caption}</figcaption>" if caption else ""
            body.append(f'<figure><img src="{html.escape(quote(links[i]))}" alt="{caption}">{figcaption}</figure>')
    style = ("body{max-width:46em;margin:2em auto;padding:0 1em;font-family:sans-serif;line-height:1.6}"
             "figure{text-align:center;margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:.9em}")
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{style}</style>\n</head>\n<body>\n<article>\n"
            + "\n".join(body) + "\n</article>\n</body>\n</html>\n")


def _copy_images(article: Article, folder: Path) -> Dict[int, str]:
    """Copy every chosen image to ``folder/images/NN-name`` → {paragraph: relative link}."""
    links: Dict[int, str] = {}
    if article.slots:
        (folder / IMAGES_DIRNAME).mkdir(parents=True, exist_ok=True)
    for number, slot in enumerate(article.slots, start=1):
        source = Path(slot.path)
        name = f"{number:02d}-{_UNSAFE_NAME.sub('_', source.stem)}{source.suffix.lower()}"
        shutil.copyfile(source, folder / IMAGES_DIRNAME / name)
        links[slot.paragraph] = f"{IMAGES_DIRNAME}/{name}"
    return links


def save_article(article: Article, out: Union[str, Path], html_page: bool = False,
                 json_file: bool = False) -> List[Path]:
    """Write ``out`` (Markdown), the images beside it, and optionally ``out`` with ``.html`` /
    ``.json`` suffixes (the JSON holds everything: slots, candidates and their scores, timings).
    Returns the files written."""
    out = Path(out)
    if (html_page and out.suffix == ".html") or (json_file and out.suffix == ".json"):
        raise ValueError(f"{out}: the {out.suffix} page would overwrite the Markdown; name it e.g. article.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    links = _copy_images(article, out.parent)
    written = [out]
    out.write_text(article_markdown(article, links), encoding="utf-8")
    if html_page:
        written.append(out.with_suffix(".html"))
        written[-1].write_text(article_html(article, links), encoding="utf-8")
    if json_file:
        written.append(out.with_suffix(".json"))
        data = dict(article.to_dict(), links={str(k): v for k, v in links.items()})
        written[-1].write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    written += [out.parent / link for link in links.values()]
    logger.info("wrote %s (%d images)", out, len(links))
    return written
