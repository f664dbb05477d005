"""Validating samples before training (step 2): every layout built once, every image opened once."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Sequence, Set


from ..models.internlm_xcomposer2.image_processing import ImageLoadError, load_image
from ..models.internlm_xcomposer2.processor import InternLMXComposer2Processor, Layout
from .chatml_reader import SUMMARY_MAX_PROBLEMS, DatasetError, Sample

logger = logging.getLogger(__name__)

__all__ = ["Issue", "ValidationReport", "validate", "apply_policy"]

DEFAULT_URL_TIMEOUT = 5.0  # seconds: validation only needs to know the URL answers with an image
IMAGE_CHECK_WORKERS = 8  # image checks are mostly I/O (disk, network): a few threads overlap them

# --- validation ------------------------------------------------------------------------------
class Issue(NamedTuple):
    source: str
    id: str
    message: str  # self-contained: names the file, row/line and id


@dataclass
class ValidationReport:
    """What :func:`validate` found. Problems make a sample unusable; warnings (e.g. a cut answer) do not."""

    num_samples: int = 0
    num_images: int = 0  # image references; each distinct path/URL is checked once
    problems: List[Issue] = field(default_factory=list)
    warnings: List[Issue] = field(default_factory=list)
    supervised_tokens: List[int] = field(default_factory=list)  # per valid sample
    invalid: Set[int] = field(default_factory=set)  # indices into the validated sample list
    layouts: Dict[str, Layout] = field(default_factory=dict, repr=False)  # Sample.key -> layout, for the dataset

    @property
    def num_valid(self) -> int:
        return self.num_samples - len(self.invalid)

    @property
    def total_supervised(self) -> int:
        return sum(self.supervised_tokens)

    @property
    def min_supervised(self) -> int:
        return min(self.supervised_tokens, default=0)

    @property
    def mean_supervised(self) -> float:
        return self.total_supervised / max(len(self.supervised_tokens), 1)

    def summary(self, max_problems: int = SUMMARY_MAX_PROBLEMS) -> str:
        lines = [f"{self.num_samples} sample(s): {self.num_valid} valid, {len(self.invalid)} invalid "
                 f"({len(self.problems)} problem(s)), {len(self.warnings)} warning(s), {self.num_images} image(s)",
                 f"supervised tokens of the valid samples: total {self.total_supervised}, min "
                 f"{self.min_supervised}, mean {self.mean_supervised:.1f}"]
        lines += [f"  problem: {issue.message}" for issue in self.problems[:max_problems]]
        if 0 < max_problems < len(self.problems):
            lines.append(f"  ... and {len(self.problems) - max_problems} more problem(s)")
        return "\n".join(lines)

    def raise_if_problems(self) -> None:
        if self.problems:
            raise DatasetError(self.summary())


def _check_images(samples: Sequence[Sample], timeout: float, max_pixels: int) -> Dict[str, Optional[str]]:
    """Load every distinct image once (URLs too); map it to its error message, or None if usable."""
    def check(path: str) -> Optional[str]:
        try:
            load_image(path, timeout=timeout, max_pixels=max_pixels)
            return None
        except ImageLoadError as err:
            return str(err)

    unique = list(dict.fromkeys(path for sample in samples for path in sample.images))
    with ThreadPoolExecutor(IMAGE_CHECK_WORKERS) as pool:
        return dict(zip(unique, pool.map(check, unique)))


def _layout_problem(sample: Sample, processor: InternLMXComposer2Processor, report: ValidationReport) -> Optional[str]:
    """Build and keep the sample's layout; a problem if nothing is left to learn, a warning if cut."""
    try:
        layout = processor.training_layout(sample.conversation, len(sample.images))
    except ValueError as err:
        return f"cannot build its training sequence ({err}); fix the conversation"
    report.layouts[sample.key] = layout
    notes = "; ".join(layout.notes)
    if layout.num_supervised == 0:
        return (f"no answer token is left to learn after truncation to max_length={processor.max_length} "
                f"({notes}); shorten the conversation or raise max_length")
    if layout.truncated:
        report.warnings.append(Issue(sample.source, sample.id, (
            f"{sample.where()}: cut to max_length={processor.max_length} ({notes}); the last answer is partly or "
            f"wholly lost and {layout.num_images} of {len(sample.images)} image(s) are kept")))
    return None


def validate(samples: Sequence[Sample], processor: InternLMXComposer2Processor, check_images: bool = True,
             timeout: float = DEFAULT_URL_TIMEOUT) -> ValidationReport:
    """Report every row problem found by :func:`read_chatml`, build every training layout (kept in
    ``report.layouts``) and check every distinct image (``timeout`` per URL), before training."""
    report = ValidationReport(num_samples=len(samples), num_images=sum(len(s.images) for s in samples))
    max_pixels = processor.image_processor.max_pixels
    image_errors = _check_images(samples, timeout, max_pixels) if check_images else {}
    for index, sample in enumerate(samples):
        if sample.problem:
            report.invalid.add(index)
            report.problems.append(Issue(sample.source, sample.id, sample.problem))
            continue
        found = [_layout_problem(sample, processor, report)]
        found += [f"image {k} cannot be used: {image_errors[path]}" for k, path in enumerate(sample.images)
                  if image_errors.get(path)]
        found = [f"{sample.where()}: {message}" for message in found if message]
        if found:
            report.invalid.add(index)
            report.problems += [Issue(sample.source, sample.id, message) for message in found]
        else:
            report.supervised_tokens.append(report.layouts[sample.key].num_supervised)
    logger.info("validated training data:\n%s", report.summary(max_problems=0))
    return report


def apply_policy(samples: Sequence[Sample], report: ValidationReport, skip_invalid_samples: bool) -> List[Sample]:
    """The valid samples; raise with the summary if any is invalid and skipping is off."""
    if report.num_samples != len(samples):
        raise ValueError(f"the report covers {report.num_samples} samples but {len(samples)} were given; "
                         "pass the same list to validate() and apply_policy()")
    if report.problems and not skip_invalid_samples:
        raise DatasetError(f"{report.summary()}\nfix the data, or set skip_invalid_samples to train on the "
                           "valid samples only")
    kept = [sample for index, sample in enumerate(samples) if index not in report.invalid]
    if len(kept) < len(samples):
        logger.warning("skipping %d invalid sample(s) of %d (skip_invalid_samples)", len(samples) - len(kept),
                       len(samples))
    if not kept:
        raise DatasetError(f"no valid sample is left to train on:\n{report.summary()}")
    return kept


# --- dataset ---------------------------------------------------------------------------------
