"""The quickstart end to end, as a user runs it (``python -m ...quickstart``), on a reduced budget: the
loss falls, held-out answers beat chance by a wide margin, the checkpoint reloads, the loss curve is a
PNG, a second run reuses the checkpoint, and ``chat_demo`` answers from it as the quickstart says."""
from __future__ import annotations

import json
import re
import shlex
import sys
from typing import List

import pytest
from PIL import Image

from conftest import QUICKSTART, QUICKSTART_REDUCED, run_timed

CHANCE = 0.31  # mean of the per-type chance levels (1/3 colour, 1/3 shape, 1/4 count)
MIN_ACCURACY = 0.75


def _losses(stderr: str) -> List[float]:
    return [float(x) for x in re.findall(r"step +\d+/\d+ +loss ([0-9.]+)", stderr)]


def _accuracy(stdout: str) -> float:
    return float(re.search(r"held-out accuracy ([0-9.]+)%", stdout).group(1)) / 100


@pytest.fixture(scope="module")
def first_run(quickstart_run):
    return quickstart_run


def test_loss_falls_and_held_out_answers_beat_chance(first_run):
    _, result, _ = first_run
    losses = _losses(result.stderr)
    assert len(losses) >= 10, result.stderr[-2000:]
    assert sum(losses[-3:]) / 3 < 0.05 * sum(losses[:3]) / 3, losses  # ~10 (ln 92544) down to well below 0.5
    accuracy = _accuracy(result.stdout)
    assert accuracy >= MIN_ACCURACY > 2 * CHANCE, result.stdout
    reported = re.findall(r"^ +(colour|shape|count) +\d+/\d+ .*\(chance \d+%\)$", result.stdout, re.M)
    assert sorted(reported) == ["colour", "count", "shape"], result.stdout  # each type, next to its chance level
    assert "Q: " in result.stdout and "truth:" in result.stdout


def test_checkpoint_reloads_and_the_loss_curve_is_a_png(first_run):
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    out, _, _ = first_run
    checkpoint = out / "checkpoint"
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(checkpoint))
    assert model.config.vocab_size == len(InternLMXComposer2Tokenizer.from_pretrained(str(checkpoint)))
    with Image.open(checkpoint / "loss_curve.png") as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100
    saved = json.loads((checkpoint / "quickstart.json").read_text())
    assert len(saved["losses"]) >= 10


def test_second_run_reuses_the_checkpoint(first_run):
    out, first, first_seconds = first_run
    result, seconds = run_timed(QUICKSTART + ["--output_dir", str(out), *QUICKSTART_REDUCED])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reusing the trained checkpoint" in result.stdout
    assert not _losses(result.stderr) and "fine-tuning" not in result.stdout
    assert seconds < first_seconds / 2
    assert _accuracy(result.stdout) == _accuracy(first.stdout)  # same weights, greedy answers


def test_chat_demo_answers_as_the_quickstart_says(first_run):
    """The command the quickstart prints, run as printed (greedy), answers its held-out colour question."""
    _, result, _ = first_run
    expected = re.search(r"expected answer: '([^']+)'", result.stdout).group(1)
    command = next(line for line in result.stdout.splitlines() if "chat_demo" in line and "python" in line)
    args = shlex.split(command.strip())
    assert args[:3] == ["python", "-m", "paddlemix.examples.internlm_xcomposer2.chat_demo"] and "--no-do_sample" in args
    chat, _ = run_timed([sys.executable, *args[1:], "--max_new_tokens", "8"])
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.strip() == expected


def test_shapes_data_is_deterministic_disjoint_and_answers_read_off_the_scene():
    from paddlemix.examples.internlm_xcomposer2 import shapes_data as sd

    train, held_out = sd.make_examples(seed=5, num_train=300, num_eval=60)
    assert (train, held_out) == sd.make_examples(seed=5, num_train=300, num_eval=60)
    assert sd.make_examples(seed=5, num_train=300, num_eval=10)[0] == train  # train does not depend on num_eval
    keys = [(frozenset(e.scene.shapes), e.question) for e in train + held_out]
    assert len(set(keys)) == len(keys)  # held-out questions are new
    for example in train + held_out:
        shapes = example.scene.shapes
        key, value = example.answer.split()
        assert sd.question_type(example.question) == example.qtype and key in example.question
        if example.qtype == "colour":
            assert [s.colour for s in shapes if s.kind == key] == [value]
        elif example.qtype == "shape":
            assert [s.kind for s in shapes if s.colour == key] == [value]
        else:
            assert sd.NUMBERS.index(value) + 1 == sum(s.kind == key for s in shapes)
    image = sd.render(train[0].scene)
    assert image.size == (sd.GRID * sd.CELL,) * 2
    for shape in train[0].scene.shapes:  # the centre of each cell shows its shape's fill colour
        centre = (shape.cell[0] * sd.CELL + sd.CELL // 2, shape.cell[1] * sd.CELL + sd.CELL // 2 + 2)
        assert image.getpixel(centre) == sd.COLOURS[shape.colour]
