"""Quickstart: fine-tune a small InternLM-XComposer2 on a CPU, offline, in minutes, and watch it learn.

No GPU, no 7B weights, no download::

    paddlemix-ixc2-quickstart            # or: python -m paddlemix.examples.internlm_xcomposer2.quickstart

1. writes a synthetic visual-question dataset (coloured shapes; "What colour is the circle?") in the
   ``chatml_dataset`` format users write (``shapes_data.py``);
2. builds a small InternLM-XComposer2 (same architecture: ViT → projector → InternLM2 with PLoRA; the real
   InternLM2 tokenizer, shipped in the package) with random weights, and fine-tunes it with the real
   fine-tuning code (``supervised_finetune.py``'s ``parse_arguments`` + ``run_sft``, with
   ``config/internlm_xcomposer2/quickstart_argument.json``);
3. reloads the checkpoint, answers every held-out question with ``model.chat`` (greedy) and prints the
   accuracy per question type next to the chance level, and draws the loss curve.

The vision tower stays frozen (``fix_vit``, as in the official recipe) although it is random: random
features keep colours and kinds apart, and training the ViT from scratch as well made learning a matter
of luck (measured, 3000 questions, same budget: with the ViT trained too, 4 of 9 runs learned to bind a
colour to a kind and the rest stayed at chance on colour and shape questions; frozen, seeds 0-4 all
reached 100 % held-out accuracy).

A second run reuses the trained checkpoint (``--retrain`` trains again). Arguments after ``--`` go to the
fine-tuning parser, e.g. ``-- --learning_rate 0.001``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shlex
import sys
import time
from collections import defaultdict
from importlib.resources import files
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from paddlemix.cli_utils import add_logging_args, quiet_native_stderr, run_cli, setup_logging
from paddlemix.cpu_env import configure_allocator
from paddlemix.examples.internlm_xcomposer2 import shapes_data  # absolute: the file also runs by path

DEFAULT_OUTPUT_DIR = "./ixc2_quickstart"
DEFAULT_SEED = 0
DEFAULT_NUM_TRAIN, DEFAULT_NUM_EVAL = shapes_data.DEFAULT_NUM_TRAIN, shapes_data.DEFAULT_NUM_EVAL
ARGUMENT_FILE = Path(__file__).resolve().parents[2] / "config" / "internlm_xcomposer2" / "quickstart_argument.json"
SHOWN_ANSWERS = 6  # question / answer / truth lines printed
MAX_NEW_TOKENS = 8  # answers are 2-3 tokens; room to show a longer wrong one
MANIFEST = "quickstart.json"  # written last: its presence means the checkpoint is complete
LOSS_PNG = "loss_curve.png"
PLOT_SIZE, PLOT_MARGIN = (640, 360), 48
LINE_COLOUR, GRID_COLOUR = (30, 80, 220), (220, 220, 220)
MIN_PLOTTED_LOSS = 1e-4  # log scale: a loss of 0 is drawn here
TRAINER_LOGGER = "paddlemix.finetune.trainer"
LOSS_LINE = re.compile(r"step (\d+)/(\d+): loss ([0-9.eE+-]+)")
# A small model of the same architecture. The token tables (vocab x hidden) hold most of the parameters
# and of the time: the output table's AdamW update and the vocabulary-wide softmax of every labelled token, so
# the language model is narrow (64). ``initializer_range`` 0.05 instead of 0.02: at this width the default
# makes every layer a near-identity at first, and learning starts later.
MODEL_SIZES = dict(
    hidden_size=64, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.05,
    img_size=shapes_data.GRID * shapes_data.CELL,
    vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       patch_size=shapes_data.CELL, image_size=shapes_data.GRID * shapes_data.CELL),
    lora_r=16, lora_alpha=16, lora_dropout=0.0,
)


def bundled_tokenizer_dir() -> Path:
    """The official InternLM2 tokenizer shipped inside the package, so the quickstart needs no download."""
    return Path(str(files("paddlemix.models.internlm_xcomposer2") / "assets"))


def build_initial_checkpoint(directory: Path, seed: int) -> int:
    """Save a randomly initialised small model plus the tokenizer: the starting point of fine-tuning,
    a checkpoint like any other. Returns the parameter count."""
    import paddle

    from paddlemix.models.internlm_xcomposer2 import (InternLMXComposer2Config, InternLMXComposer2ForCausalLM,
                                                      InternLMXComposer2Tokenizer)

    with quiet_native_stderr():
        tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(bundled_tokenizer_dir()))
    paddle.seed(seed)
    model = InternLMXComposer2ForCausalLM(InternLMXComposer2Config(**MODEL_SIZES, vocab_size=len(tokenizer)))
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return sum(int(p.numel()) for p in model.parameters())


class LossRecorder(logging.Handler):
    """Collects the ``step N/M: loss X`` lines the SFT trainer logs, and prints them above the progress bar."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.losses: List[Tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = LOSS_LINE.search(record.getMessage())
        if match:
            from tqdm import tqdm

            step, total, loss = int(match.group(1)), int(match.group(2)), float(match.group(3))
            self.losses.append((step, loss))
            tqdm.write(f"  step {step:>4}/{total}  loss {loss:.4f}", file=sys.stderr)


def fine_tune(initial: Path, train_json: Path, out: Path, args: argparse.Namespace) -> List[Tuple[int, float]]:
    """Run the real SFT path (arguments file + overrides → ``run_sft``); return ``(step, loss)`` pairs."""
    from paddlemix.finetune.arguments import parse_arguments
    from paddlemix.finetune.run import run_sft

    dataset = {"train": [{"name": "chatml_dataset", "data_files": str(train_json)}]}
    overrides = ["--model_name_or_path", str(initial), "--output_dir", str(out), "--dataset", json.dumps(dataset),
                 "--seed", str(args.seed)]
    overrides += ["--max_steps", str(args.steps)] if args.steps else []
    overrides += ["--num_train_epochs", str(args.epochs)] if args.epochs else []
    recorder, trainer_logger = LossRecorder(), logging.getLogger(TRAINER_LOGGER)
    trainer_logger.setLevel(logging.INFO)
    trainer_logger.addHandler(recorder)
    trainer_logger.propagate = args.verbose  # without -v, only the recorder's concise lines
    try:
        run_sft(*parse_arguments([str(ARGUMENT_FILE), *overrides, *args.sft_overrides]))
    finally:
        trainer_logger.removeHandler(recorder)
        trainer_logger.propagate = True
    return recorder.losses


def answer_held_out(checkpoint: Path, eval_json: Path) -> List[Tuple[str, str, str]]:
    """Reload the checkpoint from disk and answer every held-out question greedily with ``model.chat``:
    ``(question, answer, truth)``. Without a system prompt, as in training (the fine-tuning format has
    none): a model this small has never seen the default one and does not generalise to it."""
    from paddlemix.datasets.chatml_dataset import read_chatml
    from paddlemix.finetune.evaluation import answer_samples
    from paddlemix.models.internlm_xcomposer2 import InternLMXComposer2ForCausalLM, InternLMXComposer2Tokenizer

    with quiet_native_stderr():
        tokenizer = InternLMXComposer2Tokenizer.from_pretrained(str(checkpoint))
    model = InternLMXComposer2ForCausalLM.from_pretrained(str(checkpoint))
    return answer_samples(model, tokenizer, read_chatml(str(eval_json), strict=True), meta_instruction="",
                          max_new_tokens=MAX_NEW_TOKENS)


def accuracy_by_type(results: Sequence[Tuple[str, str, str]]) -> Dict[str, Tuple[int, int]]:
    """``{question type: (correct, total)}``; answers compared after normalising case and punctuation."""
    from paddlemix.finetune.evaluation import normalise_answer

    counts: Dict[str, List[int]] = defaultdict(lambda: [0, 0])
    for question, answer, truth in results:
        entry = counts[shapes_data.question_type(question)]
        entry[0] += normalise_answer(answer) == normalise_answer(truth)
        entry[1] += 1
    return {qtype: (c[0], c[1]) for qtype, c in counts.items()}


def report(results: Sequence[Tuple[str, str, str]]) -> float:
    """Print a few answers and the accuracy per type with its chance level; return the overall accuracy."""
    for question, answer, truth in results[:SHOWN_ANSWERS]:
        print(f"  Q: {question.replace('<ImageHere>', ''):<46} A: {answer!r:<9} truth: {truth}")
    chance = shapes_data.chance_levels()
    for qtype, (correct, total) in sorted(accuracy_by_type(results).items()):
        print(f"  {qtype:<9} {correct:>4}/{total:<4} = {correct / total:6.1%}   (chance {chance[qtype]:.0%})")
    overall = sum(c for c, _ in accuracy_by_type(results).values()) / max(len(results), 1)
    print(f"  held-out accuracy {overall:.1%} on {len(results)} questions")
    return overall


def plot_losses(losses: Sequence[Tuple[int, float]], path: Path) -> None:
    """Training loss against step as a PNG, drawn with PIL (no plotting dependency). Log scale: the part
    that matters, the fall below the answer-prior plateau, would be a flat line on a linear one."""
    from PIL import Image, ImageDraw

    width, height = PLOT_SIZE
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = PLOT_MARGIN, PLOT_MARGIN // 2, width - PLOT_MARGIN // 2, height - PLOT_MARGIN
    values = [max(v, MIN_PLOTTED_LOSS) for _, v in losses] or [1.0]
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    high += high == low
    last_step = max([s for s, _ in losses] or [1])

    def y(value: float) -> float:
        return bottom - (bottom - top) * (math.log10(max(value, MIN_PLOTTED_LOSS)) - low) / (high - low)

    for decade in range(low, high + 1):
        draw.line([(left, y(10.0**decade)), (right, y(10.0**decade))], fill=GRID_COLOUR)
        draw.text((4, y(10.0**decade) - 6), f"{10.0**decade:g}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    if losses:
        draw.line([(left + (right - left) * s / last_step, y(v)) for s, v in losses], fill=LINE_COLOUR, width=2)
    draw.text((left, bottom + 6), "0", fill="black")
    draw.text((right - PLOT_MARGIN, bottom + 6), f"step {last_step}", fill="black")
    draw.text((left + 8, top + 4), "training loss (log scale)", fill="black")
    image.save(path)


def print_chat_hint(checkpoint: Path, eval_json: Path) -> None:
    """The chat_demo command for a held-out colour question: the same checkpoint, from the command line."""
    rows = json.loads(eval_json.read_text(encoding="utf-8"))
    question, answer = next(r["conversations"][0] for r in rows
                            if shapes_data.question_type(r["conversations"][0][0]) == "colour")
    image = eval_json.parent / question[len("<img>"):question.index("</img>")]
    text = "<ImageHere>" + question.split("</img>")[-1]
    command = ["python", "-m", "paddlemix.examples.internlm_xcomposer2.chat_demo", "--no-do_sample",
               "--meta_instruction", "", "--from_pretrained", str(checkpoint), "--image_path", str(image), "--text", text]
    print(f"ask it yourself (expected answer: {answer!r}); greedy like above, and without the default system prompt "
          f"it never saw (the default, sampling with top_p 0.8, may vary):\n  {shlex.join(command)}")


def _manifest(args: argparse.Namespace) -> Dict[str, object]:
    """What the checkpoint depends on; a second run with the same values reuses it."""
    return {"seed": args.seed, "num_train": args.num_train, "steps": args.steps, "epochs": args.epochs,
            "sft_overrides": args.sft_overrides}


def _reusable(checkpoint: Path, args: argparse.Namespace) -> Optional[dict]:
    path = checkpoint / MANIFEST
    if args.retrain or not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("settings") != _manifest(args):
        print(f"the checkpoint in {checkpoint} was trained with other settings: training again")
        return None
    return saved


def train_fresh(out: Path, data: Tuple[Path, Path], args: argparse.Namespace) -> dict:
    """Build the starting checkpoint, fine-tune it, save the manifest and the loss curve."""
    checkpoint = out / "checkpoint"
    (checkpoint / MANIFEST).unlink(missing_ok=True)
    params = build_initial_checkpoint(out / "initial", args.seed)
    print(f"[2/4] model: InternLM-XComposer2, {params:,} parameters, random init -> {out / 'initial'}")
    print(f"[3/4] fine-tuning with supervised_finetune's run_sft and {ARGUMENT_FILE.name}")
    started = time.perf_counter()
    losses = fine_tune(out / "initial", data[0], checkpoint, args)
    if not losses:
        raise RuntimeError("no loss was logged; check logging_steps in the argument file")
    print(f"  loss {losses[0][1]:.3f} -> {losses[-1][1]:.3f} in {time.perf_counter() - started:.0f} s")
    plot_losses(losses, checkpoint / LOSS_PNG)
    saved = {"settings": _manifest(args), "losses": losses}
    (checkpoint / MANIFEST).write_text(json.dumps(saved), encoding="utf-8")
    return saved


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to the fine-tuning argument parser.")
    p.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help="data, checkpoints and the loss curve go here")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the data and of the initial weights")
    p.add_argument("--retrain", action="store_true", help="train again even if a trained checkpoint exists")
    p.add_argument("--steps", type=int, help="training steps (default: the argument file's epochs)")
    p.add_argument("--epochs", type=float, help="training epochs (overrides the argument file)")
    p.add_argument("--num_train", type=int, default=DEFAULT_NUM_TRAIN, help="training questions")
    p.add_argument("--num_eval", type=int, default=DEFAULT_NUM_EVAL, help="held-out questions")
    add_logging_args(p)
    return p


@run_cli
def main(argv: Optional[List[str]] = None) -> int:
    configure_allocator()  # it trains: see paddlemix/cpu_env.py
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    args.sft_overrides = argv[split + 1:]
    started = time.perf_counter()
    setup_logging(args.verbose)
    out = Path(args.output_dir).resolve()
    data = shapes_data.write_dataset(out / "data", args.seed, args.num_train, args.num_eval)
    print(f"[1/4] data: {args.num_train} training and {args.num_eval} held-out questions -> {out / 'data'}")
    checkpoint = out / "checkpoint"
    saved = _reusable(checkpoint, args)
    if saved:
        print(f"[2-3/4] reusing the trained checkpoint {checkpoint} (pass --retrain to train again)")
    else:
        saved = train_fresh(out, data, args)
    print(f"[4/4] answering {args.num_eval} held-out questions with the reloaded checkpoint (greedy)")
    report(answer_held_out(checkpoint, data[1]))
    print(f"loss curve: {checkpoint / LOSS_PNG}")
    print_chat_hint(checkpoint, data[1])
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    main()
