"""Interleaved image-text composition with InternLM-XComposer2-7B, offline, from the user's own images.

The official composition demo's steps (article → where images go → captions → choice among
candidates), with its prompts and decoding settings, and a local image library ranked by the
model itself instead of the demo's web image search. Entry point: :func:`compose`.
"""
from .article import Article, Candidate, ImageSlot, article_html, article_markdown, save_article
from .editing import apply_edit, edit_article
from .library import ImageLibrary, LibraryStats, SkippedImage, open_library
from .pipeline import ComposeOptions, compose, illustrate, load_uploads
from .ranking import RankingPrompt, caption_scores, top_candidates
from .steps import caption_places, choose_candidate, edit_paragraph, locate_images, write_article

__all__ = [
    "Article", "Candidate", "ImageSlot", "article_html", "article_markdown", "save_article",
    "apply_edit", "edit_article",
    "ImageLibrary", "LibraryStats", "SkippedImage", "open_library",
    "ComposeOptions", "compose", "illustrate", "load_uploads",
    "RankingPrompt", "caption_scores", "top_candidates",
    "caption_places", "choose_candidate", "edit_paragraph", "locate_images", "write_article",
]
