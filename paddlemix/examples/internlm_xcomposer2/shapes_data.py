"""A tiny synthetic visual-question dataset: coloured shapes on a grid, questions read off the image.

Used by the quickstart so a model can be fine-tuned and checked offline, in minutes, on a CPU. Every
answer depends on the image only (never on the question alone beyond the chance level), so a held-out
accuracy far above chance shows that the whole vision → projector → language path learned.

Each scene puts shapes (circle, square, triangle) of a few colours into the cells of a ``GRID`` × ``GRID``
grid, one shape per cell, a cell being one ViT patch: shape identity and colour live in one image token.
Three question types::

    colour    What colour is the circle?                 red / green / blue
    count     How many squares are there?                1 / 2 / 3 / 4
    position  Is the triangle left or right of the square?   left / right

The files are exactly what users write for ``chatml_dataset``: ``train.json`` and ``eval.json`` (lists
of ``{"id", "conversations": [[question, answer]]}`` with ``<img>images/NAME.png</img>`` in the question,
relative to the JSON file) next to an ``images/`` folder. Everything is deterministic from the seed.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "KINDS", "QUESTION_TYPES", "Shape", "Scene", "Example", "make_examples", "write_dataset",
           "question_type", "answer_set", "chance_levels"]

COLOURS: Dict[str, Tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230)}
KINDS = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
GRID = 4  # cells per side; the image is GRID * CELL pixels square
CELL = 14  # pixels per cell = the ViT patch size, so one shape is one image token
MARGIN = 2  # pixels between a shape and its cell border
BACKGROUND = (255, 255, 255)
MAX_COUNT = 4  # counts asked about are 1..MAX_COUNT
MAX_DISTRACTORS = 2  # other shapes added to count and position scenes
MAX_TRIES = 1000  # draws allowed per example to find a scene not seen before
IMAGE_DIR = "images"
TRAIN_FILE, EVAL_FILE = "train.json", "eval.json"

TEMPLATES = {
    "colour": "What colour is the {kind}?",
    "count": "How many {plural} are there?",
    "position": "Is the {kind} left or right of the {other}?",
}
QUESTION_TYPES = tuple(TEMPLATES)
_PREFIXES = {"colour": "What colour", "count": "How many", "position": "Is the"}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cell: Tuple[int, int]  # (column, row)


@dataclass(frozen=True)
class Scene:
    shapes: Tuple[Shape, ...]


@dataclass(frozen=True)
class Example:
    scene: Scene
    qtype: str
    question: str  # without the image tag
    answer: str


def answer_set(qtype: str) -> List[str]:
    """Every answer a question of ``qtype`` can have."""
    return {"colour": list(COLOURS), "count": [str(n) for n in range(1, MAX_COUNT + 1)],
            "position": ["left", "right"]}[qtype]


def chance_levels() -> Dict[str, float]:
    """Accuracy of a uniform guess among the possible answers, per question type."""
    return {qtype: 1.0 / len(answer_set(qtype)) for qtype in QUESTION_TYPES}


def question_type(question: str) -> str:
    """The type of a question as written by :func:`make_examples` (image tags allowed anywhere)."""
    text = question.split(">")[-1].strip()
    for qtype, prefix in _PREFIXES.items():
        if text.startswith(prefix):
            return qtype
    raise ValueError(f"not a shapes question: {question!r}")


def _cells(rng: random.Random, count: int) -> List[Tuple[int, int]]:
    return rng.sample([(c, r) for c in range(GRID) for r in range(GRID)], count)


def _colour_example(rng: random.Random) -> Example:
    """2-3 shapes of different kinds: the asked kind is unique, its colour must be bound to it."""
    kinds = rng.sample(KINDS, rng.randint(2, len(KINDS)))
    shapes = tuple(Shape(k, rng.choice(list(COLOURS)), cell) for k, cell in zip(kinds, _cells(rng, len(kinds))))
    target = rng.choice(shapes)
    return Example(Scene(shapes), "colour", TEMPLATES["colour"].format(kind=target.kind), target.colour)


def _count_example(rng: random.Random) -> Example:
    """1-4 shapes of the asked kind among up to ``MAX_DISTRACTORS`` of other kinds."""
    kind, count = rng.choice(KINDS), rng.randint(1, MAX_COUNT)
    others = [rng.choice([k for k in KINDS if k != kind]) for _ in range(rng.randint(0, MAX_DISTRACTORS))]
    kinds = [kind] * count + others
    shapes = tuple(Shape(k, rng.choice(list(COLOURS)), cell) for k, cell in zip(kinds, _cells(rng, len(kinds))))
    return Example(Scene(shapes), "count", TEMPLATES["count"].format(plural=PLURALS[kind]), str(count))


def _position_example(rng: random.Random) -> Example:
    """Two shapes of different kinds in different columns, plus maybe one of the third kind."""
    kind, other = rng.sample(KINDS, 2)
    rest = [k for k in KINDS if k not in (kind, other)]
    extra = rest[:rng.randint(0, min(1, len(rest)))]
    cells = _cells(rng, 2 + len(extra))
    while cells[0][0] == cells[1][0]:  # same column: left/right would be undefined
        cells = _cells(rng, 2 + len(extra))
    shapes = tuple(Shape(k, rng.choice(list(COLOURS)), c) for k, c in zip([kind, other] + extra, cells))
    answer = "left" if cells[0][0] < cells[1][0] else "right"
    return Example(Scene(shapes), "position", TEMPLATES["position"].format(kind=kind, other=other), answer)


_MAKERS = {"colour": _colour_example, "count": _count_example, "position": _position_example}


def make_examples(seed: int, num_train: int, num_eval: int) -> Tuple[List[Example], List[Example]]:
    """Train and held-out examples, question types in turn, no (scene, question) pair in both splits
    (nor twice in one). The training examples do not depend on ``num_eval``."""
    rng, seen = random.Random(seed), set()
    splits: List[List[Example]] = [[], []]
    for split, size in enumerate((num_train, num_eval)):
        for index in range(size):
            qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
            for _ in range(MAX_TRIES):
                example = _MAKERS[qtype](rng)
                key = (frozenset(example.scene.shapes), example.question)
                if key not in seen:
                    break
            else:
                raise ValueError(f"could not find {size} distinct {qtype} scenes; ask for fewer examples")
            seen.add(key)
            splits[split].append(example)
    return splits[0], splits[1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    left, top = shape.cell[0] * CELL + MARGIN, shape.cell[1] * CELL + MARGIN
    right, bottom = (shape.cell[0] + 1) * CELL - MARGIN - 1, (shape.cell[1] + 1) * CELL - MARGIN - 1
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse([left, top, right, bottom], fill=fill)
    elif shape.kind == "square":
        draw.rectangle([left, top, right, bottom], fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``GRID * CELL`` pixels square."""
    image = Image.new("RGB", (GRID * CELL, GRID * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        _draw_shape(draw, shape)
    return image


def _rows(examples: Sequence[Example], split: str, root: Path) -> List[dict]:
    rows = []
    for index, example in enumerate(examples):
        name = f"{IMAGE_DIR}/{split}-{index:05d}.png"
        render(example.scene).save(root / name)
        rows.append({"id": f"{split}-{index:05d}",
                     "conversations": [[f"<img>{name}</img>{example.question}", example.answer]]})
    return rows


def write_dataset(root: Path, seed: int, num_train: int, num_eval: int) -> Tuple[Path, Path]:
    """Write ``images/``, ``train.json`` and ``eval.json`` under ``root``; return the two JSON paths."""
    root = Path(root)
    (root / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    train, held_out = make_examples(seed, num_train, num_eval)
    paths = root / TRAIN_FILE, root / EVAL_FILE
    for path, split, examples in zip(paths, ("train", "eval"), (train, held_out)):
        path.write_text(json.dumps(_rows(examples, split, root), indent=1), encoding="utf-8")
    return paths
