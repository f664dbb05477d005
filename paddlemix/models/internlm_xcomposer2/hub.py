"""Turn a model id such as ``internlm/internlm-xcomposer2-7b`` into a local checkpoint directory.

Model, tokenizer and processor all go through :func:`resolve_pretrained` so that they resolve the
same id from the same source into one directory. The order is the same as PaddleNLP's: a local
directory, then PaddleNLP's cache, then the source, which is one of PaddleNLP's community store
(default, ``{PPNLP_ENDPOINT}/models/community/{repo_id}/{file}``, cached under ``PPNLP_HOME``),
AI Studio (``from_aistudio``) or the Hugging Face Hub (``from_hf_hub``). Each file goes through
``paddlenlp.utils.download.resolve_file_path``. That function returns ``None`` for a missing
file and raises a generic ``OSError`` for a network failure, so both are translated here into
errors that name the file, the source and the fix.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from typing import List, Literal, Optional, Sequence

import requests
from paddlenlp.utils.download import bos_aistudio_hf_try_to_load_from_cache, resolve_file_path

from .files import CONFIG_NAME, INDEX_SUFFIX, SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, VOCAB_FILE_NAMES, WEIGHT_FILE_NAMES

logger = logging.getLogger(__name__)

__all__ = ["ModelDownloadError", "resolve_pretrained", "is_repo_id"]

Purpose = Literal["model", "tokenizer", "processor"]
# Same preference as checkpoint.find_weight_files, so the set that gets downloaded is the set the loader would pick.
WEIGHT_CANDIDATES = [n for name in WEIGHT_FILE_NAMES for n in (name + INDEX_SUFFIX, name)]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


class ModelDownloadError(OSError):
    """A checkpoint file could not be downloaded (network down, offline mode, HTTP error). It subclasses
    OSError because callers already catch OSError for checkpoint problems."""


def is_repo_id(name: str) -> bool:
    """``name`` or ``owner/name``. Paths such as ``/no/such/dir`` or ``./ckpt`` are not ids, so a mistyped
    local path fails locally with the loader's own message instead of being requested from a server."""
    return bool(_REPO_ID.fullmatch(name)) and ".." not in name


class _Source:
    """One repo on one source: cache lookups, downloads and the error messages for both."""

    def __init__(self, repo_id: str, from_aistudio: bool, from_hf_hub: bool, cache_dir: Optional[str],
                 subfolder: Optional[str]) -> None:
        self.repo_id, self.cache_dir, self.subfolder = repo_id, cache_dir, subfolder or None
        self.kind = "aistudio" if from_aistudio else "hf" if from_hf_hub else "bos"
        self.flags = dict(from_aistudio=from_aistudio, from_hf_hub=from_hf_hub)

    def describe(self) -> str:
        # The endpoints are read from the modules: PaddleNLP and huggingface_hub read them once, at import time.
        if self.kind == "hf":
            from huggingface_hub import constants
            return f"the Hugging Face Hub ({constants.ENDPOINT})"
        if self.kind == "aistudio":
            return f"AI Studio ({sys.modules['paddlenlp.utils.download.aistudio_hub_download'].ENDPOINT})"
        return f"the PaddleNLP model store ({sys.modules['paddlenlp.utils.download.bos_download'].ENDPOINT})"

    def _sub(self, extra: Optional[str]) -> Optional[str]:
        return "/".join(p for p in (self.subfolder, extra) if p) or None

    def cached(self, names: Sequence[str], sub: Optional[str] = None) -> Optional[str]:
        """The cached copy of the first of ``names`` that is cached, without any request."""
        for name in names:
            path = bos_aistudio_hf_try_to_load_from_cache(self.repo_id, name, self.cache_dir, self._sub(sub),
                                                         from_bos=self.kind == "bos", **self.flags)
            if isinstance(path, str):
                return path
        return None

    def fetch(self, names: Sequence[str], required: bool = True, sub: Optional[str] = None) -> Optional[str]:
        """Local path of the first of ``names`` the repo has (cache first, then the source)."""
        try:
            path = resolve_file_path(self.repo_id, list(names), subfolder=self._sub(sub), cache_dir=self.cache_dir,
                                     **self.flags)
        except OSError as err:
            raise ModelDownloadError(self._download_message(names, err)) from err
        if path is None and required:
            tried = ", ".join("/".join(p for p in (self._sub(sub), n) if p) for n in names)
            raise FileNotFoundError(
                f"{self.repo_id!r} on {self.describe()} has no {tried}: check the model id and the source "
                f"(from_aistudio / from_hf_hub), or pass a local checkpoint directory."
            )
        return path

    def _download_message(self, names: Sequence[str], err: BaseException) -> str:
        what = names[0] if len(names) == 1 else "any of " + ", ".join(names)
        if list(names) == WEIGHT_CANDIDATES:
            what = f"the weights ({', '.join(WEIGHT_FILE_NAMES)} or a shard index)"
        offline_var = "HF_HUB_OFFLINE" if self.kind == "hf" else "AISTUDIO_BOS_OFFLINE"
        endpoint_var = {"hf": "HF_ENDPOINT", "aistudio": "AISTUDIO_ENDPOINT", "bos": "PPNLP_ENDPOINT"}[self.kind]
        reason = _reason(err)
        fix = f"unset {offline_var}" if reason == "offline mode is on" else f"set {endpoint_var} or check the network"
        example = f'from_pretrained("/path/to/{self.repo_id.split("/")[-1]}")'
        return (f"Could not download {what} of {self.repo_id} from {self.describe()} ({reason}): "
                f"pass a local checkpoint directory instead, e.g. {example}, or {fix}.")


def _reason(err: BaseException) -> str:
    """A few words on why a download failed, from the exception PaddleNLP wrapped (its own message is generic)."""
    chain: List[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    for e in chain:
        if "offline mode is enabled" in str(e):
            return "offline mode is on"
        if isinstance(e, requests.HTTPError) and e.response is not None:
            return f"HTTP {e.response.status_code}"
        if isinstance(e, requests.exceptions.ChunkedEncodingError):
            return "the download was interrupted"
        if isinstance(e, requests.Timeout):
            return "the connection timed out"
        if isinstance(e, requests.ConnectionError):
            return "the server is unreachable"
    strerror = next((e.strerror for e in reversed(chain) if isinstance(e, OSError) and e.strerror), None)
    return strerror or type(chain[-1]).__name__


def _vision_tower_subdir(config_path: str) -> Optional[str]:
    """The sub-directory a PaddleMIX ``config.vision_tower`` names, if it can be one (not absolute, no URL)."""
    with open(config_path, encoding="utf-8") as f:
        values = json.load(f)
    tower = values.get("vision_tower")
    if "vision_config" in values or not isinstance(tower, str) or not tower or os.path.isabs(tower):
        return None
    if "://" in tower or ".." in tower.split("/") or "\\" in tower:
        return None
    return tower.strip("/")


def resolve_pretrained(name_or_path: "str | os.PathLike[str]", *, purpose: Purpose, from_aistudio: bool = False,
                       from_hf_hub: bool = False, cache_dir: Optional[str] = None,
                       subfolder: Optional[str] = None) -> str:
    """Return a local directory holding what ``purpose`` needs from ``name_or_path``.

    ``"model"``: ``config.json``, the weights (all shards of an index) and, for PaddleMIX configs, the
    optional ``<vision_tower>/config.json`` (never the tower's weights: the model file has them).
    ``"tokenizer"``: ``tokenizer_config.json``, the vocabulary, the optional ``special_tokens_map.json``.
    ``"processor"``: the tokenizer files plus ``config.json`` (for ``img_size``), never the weights.
    A local directory (or a path that is not a repo id) is returned without any request, so the
    caller's local loader reports it. Raises ``FileNotFoundError`` when the repo lacks a required file
    and :class:`ModelDownloadError` when a download fails.
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name) or not is_repo_id(name):
        return os.path.join(name, subfolder) if subfolder else name
    if from_aistudio and from_hf_hub:
        raise ValueError("from_aistudio and from_hf_hub are exclusive: choose one source")
    source = _Source(name, from_aistudio, from_hf_hub, cache_dir, subfolder)
    wants_config, wants_tokenizer = purpose in ("model", "processor"), purpose in ("tokenizer", "processor")
    if not (wants_config or wants_tokenizer):
        raise ValueError(f"purpose must be 'model', 'tokenizer' or 'processor', got {purpose!r}")
    required = ([[CONFIG_NAME]] if wants_config else []) + ([WEIGHT_CANDIDATES] if purpose == "model" else []) + (
        [[TOKENIZER_CONFIG], list(VOCAB_FILE_NAMES)] if wants_tokenizer else [])
    # Optional files are asked from the source only while a required file is still missing from the cache:
    # a 404 is not cached, so otherwise every later (possibly offline) load would make a request for them.
    fresh = not all(source.cached(names) for names in required)

    def optional(names: Sequence[str], sub: Optional[str] = None) -> Optional[str]:
        return source.fetch(names, required=False, sub=sub) if fresh else source.cached(names, sub=sub)

    paths: List[str] = []
    if wants_config:
        paths.append(source.fetch([CONFIG_NAME]))
        tower = _vision_tower_subdir(paths[0])
        if tower and optional([CONFIG_NAME], sub=tower) is None:
            logger.info("%s has no %s/%s: the ViT uses the CLIP ViT-L/14-336 defaults", name, tower, CONFIG_NAME)
    if wants_tokenizer:
        paths.append(source.fetch([TOKENIZER_CONFIG]))
        optional([SPECIAL_TOKENS_MAP])
        paths.append(source.fetch(VOCAB_FILE_NAMES))
    if purpose == "model":
        weights = source.fetch(WEIGHT_CANDIDATES)
        paths.append(weights)
        if weights.endswith(INDEX_SUFFIX):
            with open(weights, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            paths.extend(source.fetch([shard]) for shard in shards)
    root = os.path.dirname(paths[0])
    stray = [p for p in paths if os.path.dirname(p) != root]
    if stray:  # PaddleNLP and huggingface_hub keep one repo (revision) in one directory; guard the assumption
        raise RuntimeError(f"files of {name} were cached in different directories: {root} and {stray}")
    logger.info("%s (%s) resolved to %s", name, purpose, root)
    return root
