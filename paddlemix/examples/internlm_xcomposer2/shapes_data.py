"""A tiny synthetic visual-question dataset: coloured shapes on a grid, questions read off the image.

Used by the quickstart so that a model can be fine-tuned and checked offline, in minutes, on a CPU. No
answer can be told from the question alone better than chance, so a held-out accuracy far above chance
shows that the whole vision → projector → language path learned.

A scene puts 1-6 shapes (circle, square, triangle; red, green, blue) into the cells of a ``GRID`` × ``GRID``
grid, one shape per cell, one cell per ViT patch. Three question types, each about a named shape among
others, so the model must bind the name to the right shape::

    colour   What colour is the circle?     circle red        (the colour of the one circle)
    shape    Which shape is blue?           blue square       (the kind of the one blue shape)
    count    How many squares are there?    square three      (1-4 squares among other shapes)

Answers name the object, then the value: the value is then predicted right after a token that says what
to look for, a lookup a small model learns within ~100 steps. A bare "red", predicted where the prompt
ends, first needs the question's object carried there: measured, the same model stays at chance on that
for 1000+ steps. Left/right questions were dropped for the same reason: with a randomly initialised ViT,
position is learned far more slowly than colour and kind (~65 % after 200 steps).

The files are exactly what users write for ``chatml_dataset``: ``train.json`` and ``eval.json`` (lists
of ``{"id", "conversations": [[question, answer]]}`` with ``<img>images/NAME.png</img>`` in the question,
relative to the JSON file) next to an ``images/`` folder. Everything is deterministic from the seed.
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

__all__ = ["COLOURS", "KINDS", "QUESTION_TYPES", "Shape", "Scene", "Example", "make_examples", "render",
           "write_dataset", "question_type", "value_set", "chance_levels"]

COLOURS: Dict[str, Tuple[int, int, int]] = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230)}
KINDS = ("circle", "square", "triangle")
DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL = 3000, 300  # the quickstart's dataset
NUMBERS = ("one", "two", "three", "four")  # counts, as words: one token each (a digit after a space is two)
GRID = 4  # cells per side; the image is GRID * CELL pixels square
CELL = 14  # pixels per cell = the ViT patch size, so one shape is one image token
MARGIN = 2  # pixels between a shape and its cell border
# The CLIP normalisation mean: an empty patch is ~0 once normalised, so even a randomly initialised ViT
# sets shapes apart (on white, the background dominates every patch and nothing is learned for minutes).
BACKGROUND = (123, 117, 104)
OUTLINE = (0, 0, 0)  # the same for every fill colour: the kind shows in pixels that do not depend on colour
MAX_DISTRACTORS = 2  # shapes of other kinds added to a count scene
MAX_TRIES = 1000  # draws allowed per example to find a (scene, question) not used before
IMAGE_DIR = "images"
TRAIN_FILE, EVAL_FILE = "train.json", "eval.json"

TEMPLATES = {  # question, answer; {key} is named in the question, {value} read off the image
    "colour": ("What colour is the {key}?", "{key} {value}"),
    "shape": ("Which shape is {key}?", "{key} {value}"),
    "count": ("How many {key}s are there?", "{key} {value}"),
}
QUESTION_TYPES = tuple(TEMPLATES)


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


def value_set(qtype: str) -> List[str]:
    """Every value an answer of ``qtype`` can end with (its first word is copied from the question)."""
    return {"colour": list(COLOURS), "shape": list(KINDS), "count": list(NUMBERS)}[qtype]


def chance_levels() -> Dict[str, float]:
    """Accuracy of a uniform guess among the possible values, per question type."""
    return {qtype: 1.0 / len(value_set(qtype)) for qtype in QUESTION_TYPES}


def question_type(question: str) -> str:
    """The type of a question written by :func:`make_examples` (image tags or ``<ImageHere>`` allowed)."""
    text = question.split(">")[-1].strip()
    for qtype, (template, _) in TEMPLATES.items():
        if text.startswith(template.split("{")[0]):
            return qtype
    raise ValueError(f"not a shapes question: {question!r}")


def _cells(rng: random.Random, count: int) -> List[Tuple[int, int]]:
    return rng.sample([(c, r) for c in range(GRID) for r in range(GRID)], count)


def _example(qtype: str, shapes: Sequence[Shape], key: str, value: str) -> Example:
    question, answer = TEMPLATES[qtype]
    return Example(Scene(tuple(shapes)), qtype, question.format(key=key), answer.format(key=key, value=value))


def _distinct_shapes(rng: random.Random) -> List[Shape]:
    """2-3 shapes, no two of the same kind or colour: a colour names one shape and a kind names one."""
    count = rng.randint(2, len(KINDS))
    kinds, colours = rng.sample(KINDS, count), rng.sample(list(COLOURS), count)
    return [Shape(k, c, cell) for k, c, cell in zip(kinds, colours, _cells(rng, count))]


def _colour_example(rng: random.Random) -> Example:
    """The colour must be bound to the asked kind. Colours are distinct: with shared ones, "a colour in
    the image" is often right, a shortcut that stalls learning."""
    shapes = _distinct_shapes(rng)
    return _example("colour", shapes, shapes[0].kind, shapes[0].colour)


def _shape_example(rng: random.Random) -> Example:
    """The kind must be bound to the asked colour."""
    shapes = _distinct_shapes(rng)
    return _example("shape", shapes, shapes[0].colour, shapes[0].kind)


def _count_example(rng: random.Random) -> Example:
    """1-4 shapes of the asked kind among up to ``MAX_DISTRACTORS`` of other kinds, any colours."""
    kind, count = rng.choice(KINDS), rng.randint(1, len(NUMBERS))
    kinds = [kind] * count + [rng.choice([k for k in KINDS if k != kind]) for _ in range(rng.randint(0, MAX_DISTRACTORS))]
    shapes = [Shape(k, rng.choice(list(COLOURS)), cell) for k, cell in zip(kinds, _cells(rng, len(kinds)))]
    return _example("count", shapes, kind, NUMBERS[count - 1])


_MAKERS = {"colour": _colour_example, "shape": _shape_example, "count": _count_example}


def make_examples(seed: int, num_train: int, num_eval: int) -> Tuple[List[Example], List[Example]]:
    """Train and held-out examples, question types in turn; no (scene, question) pair is used twice, so
    the held-out questions are new to the model. The training examples do not depend on ``num_eval``."""
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
                raise ValueError(f"could not find {size} distinct {qtype} questions; ask for fewer examples")
            seen.add(key)
            splits[split].append(example)
    return splits[0], splits[1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    left, top = shape.cell[0] * CELL + MARGIN, shape.cell[1] * CELL + MARGIN
    right, bottom = (shape.cell[0] + 1) * CELL - MARGIN - 1, (shape.cell[1] + 1) * CELL - MARGIN - 1
    style = dict(fill=COLOURS[shape.colour], outline=OUTLINE)
    if shape.kind == "circle":
        draw.ellipse([left, top, right, bottom], **style)
    elif shape.kind == "square":
        draw.rectangle([left, top, right, bottom], **style)
    else:
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], **style)


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


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Write the quickstart's synthetic shapes dataset (chatml_dataset "
                                                 "format: train.json, eval.json, images/).")
    parser.add_argument("out", help="directory to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num_eval", type=int, default=DEFAULT_NUM_EVAL)
    args = parser.parse_args(argv)
    for path in write_dataset(Path(args.out), args.seed, args.num_train, args.num_eval):
        print(path)


if __name__ == "__main__":
    main()
