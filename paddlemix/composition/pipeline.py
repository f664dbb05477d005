"""``compose``: an illustrated article from an instruction, with images from the user's own files.

The official demo's chain, step by step (:mod:`.steps`), with its web image search replaced by
the user's library ranked by the model (:mod:`.ranking`)::

    instruction (+ the user's images)
      └─ 1 article (streamed) ─ paragraphs ─ 2 locations ─┬─ user's images: 5 selection among the unused ones
                                                          └─ 3 captions ─ 4 library ranking ─ 5 selection, top 4

Sampling is seeded (``seed``) before the article and again before the images, as the demo does.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import paddle

from paddlemix.models.internlm_xcomposer2.image_processing import InternLMXComposer2ImageProcessor

from . import prompts
from .article import Article, Candidate, ImageSlot
from .decoding import seeded
from .library import IMAGE_EXTENSIONS, ImageLibrary, file_sha256, open_library
from .parsing import caption_table, spread_places, split_paragraphs
from .ranking import RankingPrompt, caption_scores, top_candidates
from .steps import Selection, caption_places, choose_candidate, locate_images, write_article

logger = logging.getLogger(__name__)

__all__ = ["ComposeOptions", "Uploads", "load_uploads", "compose", "illustrate"]

Event = Optional[Callable[[str], None]]


@dataclass
class ComposeOptions:
    """Settings of one article. Defaults are the demo's (sampling everywhere, 4096 article
    tokens, repetition penalty 1.005, 4 candidates per place); ``do_sample=False`` makes every
    step greedy (the demo samples the location, caption and selection steps always)."""

    num_images: Union[str, int] = "auto"
    max_new_tokens: int = prompts.BUDGETS["article"]
    do_sample: bool = True
    repetition_penalty: float = prompts.REPETITION_PENALTY
    seed: Optional[int] = None
    with_meta: bool = False
    num_candidates: int = prompts.MAX_WEB_CANDIDATES
    ranking: RankingPrompt = field(default_factory=RankingPrompt)
    batch_size: int = 8
    progress: bool = True

    def requested_images(self) -> Optional[int]:
        """None for automatic, else the number (0: text only, the demo's "LLM Only")."""
        value = self.num_images
        if value is None or value == "auto":
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"num_images must be 'auto' or a non-negative integer, got {self.num_images!r}")
        return value


@dataclass
class Uploads:
    """The user's own images (``--image``): paths, file hashes and features ``[n, P, H]``."""

    paths: List[str]
    hashes: List[str]
    embeds: paddle.Tensor


def load_uploads(model: Any, images: Optional[Sequence[Any]]) -> Optional[Uploads]:
    """Read and encode the user's images; an unreadable one is an error naming the file."""
    if not images:
        return None
    if len(images) > prompts.MAX_UPLOADS:
        raise ValueError(f"{len(images)} images given; the official demo takes at most {prompts.MAX_UPLOADS}")
    paths = []
    for image in images:
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"images must be file paths (they are copied beside the article), got {type(image)}")
        paths.append(os.fspath(image))
    processor = InternLMXComposer2ImageProcessor(img_size=model.config.img_size)
    pixels = processor(paths, return_tensors="np")["pixel_values"]
    with paddle.no_grad():
        embeds = model.encode_img(paddle.to_tensor(pixels))
    return Uploads(paths, [file_sha256(Path(p)) for p in paths], embeds)


def _emit(on_event: Event, message: str) -> None:
    logger.info(message)
    if on_event is not None:
        on_event(message)


def _note(article: Article, message: str, on_event: Event) -> None:
    """Something the pipeline worked around: recorded in the article, told to ``on_event`` if
    given (else logged as a warning)."""
    article.notes.append(message)
    if on_event is not None:
        logger.info(message)
        on_event(message)
    else:
        logger.warning(message)


def compose(model: Any, tokenizer: Any, instruction: str, images: Optional[Sequence[Any]] = None,
            library: Optional[Union[str, os.PathLike, ImageLibrary]] = None, num_images: Union[str, int] = "auto", *,
            cache_dir: Optional[Union[str, os.PathLike]] = None, on_text: Optional[Callable[[str], None]] = None,
            on_event: Event = None, **options: Any) -> Article:
    """Write an illustrated article for ``instruction``.

    ``images``: the user's own images (paths, at most 10), given to the model with the
    instruction and placed where it chooses, as in the demo. ``library``: a folder (or an
    opened :class:`ImageLibrary`) whose images are ranked for each caption; its features are
    cached in ``cache_dir`` (default ``<library>/.ixc2_cache``). ``num_images``: ``"auto"`` or a
    number (0: text only). ``on_text`` receives the article as it is written, ``on_event``
    progress messages. Other keywords: :class:`ComposeOptions`.
    """
    opts = ComposeOptions(num_images=num_images, **options)
    requested = opts.requested_images()
    uploads = load_uploads(model, images)
    library = _open(model, library, cache_dir, opts, on_event) if requested != 0 else None
    _emit(on_event, "writing the article")
    with seeded(opts.seed):
        step = write_article(model, tokenizer, instruction, uploads.embeds if uploads is not None else None,
                             max_new_tokens=opts.max_new_tokens, do_sample=opts.do_sample,
                             repetition_penalty=opts.repetition_penalty, with_meta=opts.with_meta, on_text=on_text)
    article = Article(instruction, step.text, split_paragraphs(step.text), timings={"article": step.seconds})
    if library is not None:
        article.library = _library_summary(library)
    _check_cut(article, step, "article", on_event)
    if not article.paragraphs:
        _note(article, "the model wrote an empty article; no images placed", on_event)
    elif requested != 0 and uploads is None and library is None:
        _note(article, "no images given (images= or library=): the article has no pictures", on_event)
    elif requested != 0:  # 0: text only, as asked
        with seeded(opts.seed):
            illustrate(model, tokenizer, article, uploads, library, opts, on_event)
    return article


def _open(model: Any, library: Any, cache_dir: Any, opts: ComposeOptions, on_event: Event) -> Optional[ImageLibrary]:
    """An opened library as it is, a folder opened (encoding what is not cached), or None."""
    if library is None or isinstance(library, ImageLibrary):
        return library
    folder = os.fspath(library)
    _emit(on_event, f"opening the image library {folder}")
    opened = open_library(model, folder, cache_dir, opts.batch_size, opts.progress)
    if not len(opened):
        raise ValueError(f"the image library {folder!r} has no readable image "
                         f"({', '.join(IMAGE_EXTENSIONS)}; {len(opened.stats.skipped)} unreadable)")
    return opened


def _check_cut(article: Article, output: Any, step: str, on_event: Event) -> None:
    if output is not None and output.truncated:
        _note(article, f"the {step} prompt ({output.prompt_tokens} positions kept) was cut to max_length, as the "
              "official demo cuts it: its end was lost", on_event)


def _library_summary(library: ImageLibrary) -> Dict[str, Any]:
    stats = library.stats
    return {"images": len(library), "found": stats.found, "hashed": stats.hashed, "encoded": stats.encoded,
            "cache_hits": stats.cache_hits,
            "encode_seconds": stats.encode_seconds, "cache": str(library.cache.directory),
            "skipped": [{"path": s.path, "reason": s.reason} for s in stats.skipped]}


def _count_text(requested: Optional[int], num_uploads: int, with_library: bool) -> str:
    """The number written into the location prompt: ``''`` = automatic. With the user's images
    the demo's dropdown is set to their count (automatic or more becomes that count); with a
    library as well, places past the user's images are filled from it, so nothing is capped."""
    if num_uploads and not with_library:
        return str(num_uploads if requested is None or requested > num_uploads else requested)
    return "" if requested is None else str(requested)


def _find_places(model: Any, tokenizer: Any, article: Article, shown: List[str], uploads: Optional[Uploads],
                 opts: ComposeOptions, count_text: str, on_event: Event) -> List[int]:
    """Step 2, and our fallback (evenly spread places) when a requested number of images got
    an answer without any valid place."""
    _emit(on_event, "choosing where images go")
    locations, output = locate_images(model, tokenizer, shown, count_text,
                                      uploads.embeds if uploads is not None else None,
                                      do_sample=opts.do_sample, with_meta=opts.with_meta)
    article.location_answer, article.timings["locations"] = locations.answer, output.seconds
    _check_cut(article, output, "location", on_event)
    for problem in locations.problems:
        _note(article, f"location answer: {problem}", on_event)
    places = locations.places
    if not any(0 <= p < len(shown) for p in places) and count_text:
        places = spread_places(len(shown), int(count_text))
        _note(article, f"no valid place in the location answer; spreading {count_text} image(s) evenly: "
              f"after paragraphs {places}", on_event)
    return places


def illustrate(model: Any, tokenizer: Any, article: Article, uploads: Optional[Uploads],
               library: Optional[ImageLibrary], opts: ComposeOptions, on_event: Event = None) -> None:
    """Steps 2-5 on ``article.paragraphs`` (filled in place: ``slots``, ``notes``, ``timings``)."""
    shown = article.paragraphs[: prompts.MAX_SECTIONS]
    if len(article.paragraphs) > len(shown):
        _note(article, f"{len(article.paragraphs)} paragraphs: images can go only after the first "
              f"{prompts.MAX_SECTIONS} (the demo's limit); the rest of the text is kept", on_event)
    num_uploads = len(uploads.paths) if uploads is not None else 0
    count_text = _count_text(opts.requested_images(), num_uploads, library is not None)
    places = _find_places(model, tokenizer, article, shown, uploads, opts, count_text, on_event)
    upload_places = sorted({p for p in places if 0 <= p < len(shown)})[:num_uploads]
    library_raw = [p for p in places if p not in upload_places]
    if library is None and library_raw:
        _note(article, f"places {sorted(set(library_raw))} get no image: more places than images given", on_event)
        library_raw = []
    captions = _library_captions(model, tokenizer, article, shown, library_raw, opts, on_event)
    scores = _rank(model, tokenizer, article, library, captions, opts, on_event)
    _select_all(model, tokenizer, article, shown, uploads, upload_places, library, captions, scores, opts, on_event)


def _library_captions(model: Any, tokenizer: Any, article: Article, shown: List[str], raw: List[int],
                      opts: ComposeOptions, on_event: Event) -> Dict[int, str]:
    """Step 3 over the places in the model's order (repeats and out-of-range ones included, as
    the demo captions them) → {valid place: caption}."""
    if not raw:
        return {}
    _emit(on_event, f"writing {len(raw)} caption(s)")
    texts, outputs = caption_places(model, tokenizer, shown, raw, do_sample=opts.do_sample,
                                    with_meta=opts.with_meta,
                                    on_caption=lambda p, c: _emit(on_event, f"caption after paragraph {p}: {c}"))
    article.timings["captions"] = sum(o.seconds for o in outputs)
    table = caption_table(raw, texts)
    dropped = sorted(p for p in table if not 0 <= p < len(shown))
    if dropped:
        _note(article, f"places {dropped} are not paragraphs of the article (it has {len(shown)}); ignored", on_event)
    return {p: c for p, c in table.items() if 0 <= p < len(shown)}


def _rank(model: Any, tokenizer: Any, article: Article, library: Optional[ImageLibrary], captions: Dict[int, str],
          opts: ComposeOptions, on_event: Event) -> Dict[int, Any]:
    """Step 4 (ours: replaces the web search): every caption against every library image."""
    if library is None or not captions:
        return {}
    _emit(on_event, f"ranking {len(library)} library image(s) for {len(captions)} caption(s)")
    started = time.perf_counter()
    places = sorted(captions)
    matrix = caption_scores(model, tokenizer, library, [captions[p] for p in places], opts.ranking,
                            opts.batch_size, opts.progress)
    article.timings["ranking"] = time.perf_counter() - started
    return {p: matrix[row] for row, p in enumerate(places)}


@dataclass
class _Offer:
    """The candidates shown for one place: where they come from, their indices in that source,
    paths, features ``[k, P, H]`` and ranking scores (library only)."""

    source: str
    indices: List[int]
    paths: List[str]
    embeds: paddle.Tensor
    scores: Optional[List[float]]


def _offer(place: int, uploads: Optional[Uploads], upload_places: List[int], library: Optional[ImageLibrary],
           scores: Dict[int, Any], used: Dict[str, set], count: int) -> Optional[_Offer]:
    """The user's images not used yet, or the ``count`` best library images not used yet
    (by content: a copy of a used file is used too); None when nothing is left."""
    if place in upload_places:
        indices = [j for j in range(len(uploads.paths)) if j not in used["upload"]]
        embeds = paddle.gather(uploads.embeds, paddle.to_tensor(indices, dtype="int64"))
        return _Offer("upload", indices, [uploads.paths[j] for j in indices], embeds, None)
    exclude = {j for j, sha in enumerate(library.hashes) if sha in used["library"]}
    indices = top_candidates(scores[place], exclude, count)
    if not indices:
        return None
    return _Offer("library", indices, [str(library.paths[j]) for j in indices], library.embeddings(indices),
                  [float(scores[place][j]) for j in indices])


def _select_all(model: Any, tokenizer: Any, article: Article, shown: List[str], uploads: Optional[Uploads],
                upload_places: List[int], library: Optional[ImageLibrary], captions: Dict[int, str],
                scores: Dict[int, Any], opts: ComposeOptions, on_event: Event) -> None:
    """Step 5, walking the paragraphs in order as the demo does: each place's prompt holds the
    text since the previous place and every image already chosen. An image is used once."""
    text, chunks, chosen = "", [], []
    used: Dict[str, set] = {"upload": set(), "library": set()}
    article.timings.setdefault("selection", 0.0)
    for i, paragraph in enumerate(shown):
        text += paragraph + "\n"
        if i not in upload_places and i not in scores:
            continue
        offer = _offer(i, uploads, upload_places, library, scores, used, opts.num_candidates)
        if offer is None:
            _note(article, f"no unused library image left for paragraph {i}; no image there", on_event)
            continue  # as a place whose download failed in the demo: its text joins the next chunk
        chunks.append(text)
        text = ""
        selection = _choose(model, tokenizer, i, chunks, chosen, offer, opts, article, on_event)
        chosen.append(offer.embeds[selection.index:selection.index + 1])
        picked = offer.indices[selection.index]
        if offer.source == "upload":
            used["upload"].add(picked)
            used["library"].add(uploads.hashes[picked])  # a library copy of it is used too
        else:
            used["library"].add(library.hashes[picked])
        candidates = [Candidate(p, s) for p, s in zip(offer.paths, offer.scores or [None] * len(offer.paths))]
        article.slots.append(ImageSlot(i, captions.get(i, ""), offer.source, candidates, selection.index,
                                       selection.answer, selection.fell_back))
        _emit(on_event, f"image after paragraph {i}: {offer.paths[selection.index]}")


def _choose(model: Any, tokenizer: Any, place: int, chunks: List[str], chosen: List[paddle.Tensor], offer: _Offer,
            opts: ComposeOptions, article: Article, on_event: Event) -> Selection:
    """Step 5 for one place; as the demo, no model call when a single one of the user's images is left."""
    if offer.source == "upload" and len(offer.indices) == 1:
        return Selection(0, "", False, "", None)
    selection = choose_candidate(model, tokenizer, chunks, paddle.concat(chosen) if chosen else None, offer.embeds,
                                 do_sample=opts.do_sample, with_meta=opts.with_meta)
    article.timings["selection"] += selection.output.seconds
    _check_cut(article, selection.output, f"selection (after paragraph {place})", on_event)
    if selection.fell_back:
        _note(article, f"selection after paragraph {place}: {selection.reason}; candidate A used, as the demo does",
              on_event)
    return selection
